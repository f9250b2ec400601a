"""vhdx specifics: the metadata log (refused read-only, replayed read-write, written by
us and replayed by QEMU), header selection, truncated images, differencing images."""

from __future__ import annotations

import json
import shutil
import struct

import pytest

from of_helpers import MiB, io_run, qemu_check, qemu_compare, qemu_raw, run
from imagetools.errors import ImageOpenError
from imagetools.formats.vhdx import log as vlog
from imagetools.formats.vhdx.structs import (HEADER1_OFFSET, HEADER2_OFFSET, HEADER_SIZE,
                                             VhdxHeader)
from imagetools.image import open_image

pytestmark = pytest.mark.oracle

BAT_OFFSET = 2 * MiB          # where qemu-img puts the BAT with the default 1 MiB log


def _set_log_guid(path, guid: bytes) -> None:
    """Put ``guid`` into both headers (keeping them valid), as a crash mid-update leaves it."""
    with open(path, "r+b") as f:
        for offset in (HEADER1_OFFSET, HEADER2_OFFSET):
            f.seek(offset)
            hdr = VhdxHeader(f.read(HEADER_SIZE))
            hdr.log_guid = guid
            f.seek(offset)
            f.write(hdr.pack())


def _pending_log_image(tmp_path):
    """An image whose second block is only reachable by replaying the log.

    QEMU writes two blocks; we then put the first BAT sector back as it was
    before the second block existed and record the real sector in a log
    entry (made by our log writer), with the log GUID set in both headers.
    """
    path = tmp_path / "pending.vhdx"
    run("qemu-img", "create", "-q", "-f", "vhdx", "-o", "block_size=1M", str(path), "4M")
    io_run(str(path), "vhdx", "write -P 0x11 0 1M")
    with open(path, "rb") as f:
        f.seek(BAT_OFFSET)
        before = f.read(4096)
    io_run(str(path), "vhdx", "write -P 0x22 2M 1M")
    expected = qemu_raw(str(path), "vhdx", tmp_path / "expected.raw")
    with open(path, "r+b") as f:
        f.seek(BAT_OFFSET)
        after = f.read(4096)
        assert after != before
        guid = bytes(range(1, 17))
        entry = vlog.build_entry(guid, 7, [(BAT_OFFSET, after)], path.stat().st_size)
        f.seek(MiB)
        f.write(entry)
        f.seek(BAT_OFFSET)
        f.write(before)
    _set_log_guid(path, guid)
    return path, expected


def test_pending_log_is_refused_read_only_like_qemu(tmp_path):
    path, _ = _pending_log_image(tmp_path)
    proc = run("qemu-img", "info", str(path), check=False)
    assert proc.returncode == 1
    with pytest.raises(ImageOpenError) as err:
        open_image(str(path), "vhdx")
    assert f"qemu-img: {err.value}\n" == proc.stderr


def test_pending_log_is_replayed_read_write(tmp_path):
    path, expected = _pending_log_image(tmp_path)
    theirs = tmp_path / "theirs.vhdx"
    shutil.copy(path, theirs)
    proc = run("qemu-img", "check", "-r", "all", "--output=json", str(theirs), check=False)
    assert json.loads(proc.stdout)["corruptions-fixed"] == 1
    drv = open_image(str(path), "vhdx", read_only=False)
    try:
        assert drv.check().corruptions_fixed == 1
        assert drv.read(0, drv.size) == expected
    finally:
        drv.close()
    assert qemu_check(str(path), "vhdx")["rc"] == 0
    assert qemu_compare(str(theirs), "vhdx", str(path), "vhdx").returncode == 0
    ref = tmp_path / "ref.raw"
    ref.write_bytes(expected)
    assert qemu_compare(str(ref), "raw", str(path), "vhdx").returncode == 0


def test_our_bat_updates_go_through_the_log(tmp_path):
    """After our writes the log holds our last entry; QEMU accepts it when asked to
    replay it again (a crash right after the log write)."""
    path = tmp_path / "w.vhdx"
    run("qemu-img", "create", "-q", "-f", "vhdx", "-o", "block_size=1M", str(path), "4M")
    drv = open_image(str(path), "vhdx", read_only=False)
    try:
        drv.write(3 * MiB + 100, b"\x33" * 5000)
    finally:
        drv.close()
    with open(path, "rb") as f:
        f.seek(MiB)
        head = f.read(64)
    sig, _crc, _length, _tail, seq, count, _r, guid, _flushed, _last = \
        vlog.LOG_HEADER.unpack_from(head)
    assert sig == b"loge" and seq == 1 and count == 1
    _set_log_guid(path, guid)                 # as if we had crashed before the replay
    proc = run("qemu-img", "check", "-r", "all", "--output=json", str(path), check=False)
    assert json.loads(proc.stdout).get("corruptions-fixed") == 1
    io_run(str(path), "vhdx", "read -P 0x33 3145828 5000")


def test_header_selection(tmp_path):
    path = tmp_path / "h.vhdx"
    run("qemu-img", "create", "-q", "-f", "vhdx", str(path), "4M")
    io_run(str(path), "vhdx", "write -P 0x44 0 64k")
    with open(path, "r+b") as f:               # break the checksum of header 1
        f.seek(HEADER1_OFFSET + 100)
        f.write(b"\x01")
    drv = open_image(str(path), "vhdx")
    try:
        assert drv.read(0, 65536) == b"\x44" * 65536
    finally:
        drv.close()
    with open(path, "r+b") as f:               # and of header 2
        f.seek(HEADER2_OFFSET + 100)
        f.write(b"\x01")
    proc = run("qemu-img", "info", str(path), check=False)
    with pytest.raises(ImageOpenError) as err:
        open_image(str(path), "vhdx")
    assert f"qemu-img: {err.value}\n" == proc.stderr


def test_truncated_image_check_matches_qemu(tmp_path):
    path = tmp_path / "t.vhdx"
    run("qemu-img", "create", "-q", "-f", "vhdx", "-o", "block_size=1M", str(path), "4M")
    io_run(str(path), "vhdx", "write -P 1 0 1M", "write -P 2 2M 1M")
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 512 * 1024)
    qemu = qemu_check(str(path), "vhdx")
    drv = open_image(str(path), "vhdx")        # QEMU refuses to open it; we still can
    try:
        result = drv.check()
        with pytest.raises(Exception, match="truncated"):
            drv.read(2 * MiB, 512)
        assert drv.read(0, 512) == b"\x01" * 512
    finally:
        drv.close()
    assert qemu["rc"] == 2 and qemu["corruptions"] == result.corruptions == 1
    ours = {m.split(": ", 1)[1] for m in result.messages}
    theirs = {line.split(": ", 1)[1] for line in qemu["stderr"].splitlines()}
    assert ours == theirs


def test_differencing_image_is_refused(tmp_path):
    path = tmp_path / "d.vhdx"
    run("qemu-img", "create", "-q", "-f", "vhdx", str(path), "4M")
    with open(path, "rb") as f:
        f.seek(3 * MiB)                        # metadata region of a fresh image
        table = f.read(64 * 1024)
    offset = struct.unpack_from("<I", table, 32 + 16)[0]      # file parameters item
    with open(path, "r+b") as f:
        f.seek(3 * MiB + offset + 4)
        f.write(struct.pack("<I", 2))                        # HasParent, no locator
    proc = run("qemu-img", "info", str(path), check=False)
    with pytest.raises(ImageOpenError) as err:
        open_image(str(path), "vhdx")
    assert f"qemu-img: {err.value}\n" == proc.stderr
