"""``check`` finds what qemu-img check finds, on clean and on damaged images.

Each case makes an image with qemu-img / qemu-io, damages it the way a
crash or a bug would, and compares our result with ``qemu-img check
--output=json`` (every counter) and its per-problem lines on stderr.
"""

from __future__ import annotations

import struct

import pytest

from of_helpers import check_json_counters, io_run, our_check, qemu_check, run
from imagetools.image import open_image

pytestmark = pytest.mark.oracle


def _patch(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _vdi(path, damage):
    run("qemu-img", "create", "-q", "-f", "vdi", str(path), "4M")
    io_run(str(path), "vdi", "write -P 1 0 4k", "write -P 2 1M 4k", "write -P 3 3M 4k")
    bmap = 0x200
    if damage == "duplicate":
        _patch(path, bmap + 4, struct.pack("<I", 0))
    elif damage == "too-large":
        _patch(path, bmap + 8, struct.pack("<I", 77))
    elif damage == "count":
        _patch(path, 0x184, struct.pack("<I", 9))


def _qed(path, damage):
    run("qemu-img", "create", "-q", "-f", "qed", str(path), "4M")
    io_run(str(path), "qed", "write -P 1 0 64k", "write -P 2 1M 64k", "write -P 3 2M 4k")
    with open(path, "rb") as f:
        f.seek(65536)
        l2 = struct.unpack("<Q", f.read(8))[0]
    if damage == "double":
        _patch(path, l2 + 16 * 8, struct.pack("<Q", 65536))      # points into the L1 table
    elif damage == "invalid":
        _patch(path, l2 + 16 * 8, struct.pack("<Q", 64 << 20))   # past the end of the file
    elif damage == "leak":
        with open(path, "ab") as f:
            f.write(bytes(3 * 65536))


def _parallels(path, damage):
    run("qemu-img", "create", "-q", "-f", "parallels", "-o", "cluster_size=64k", str(path), "4M")
    io_run(str(path), "parallels", "write -P 1 0 64k", "write -P 2 1M 4k", "write -P 3 2M 4k")
    if damage == "unclean":
        _patch(path, 44, struct.pack("<I", 0x746F6E59))
    elif damage == "outside":
        _patch(path, 64 + 4 * 40, struct.pack("<I", 4000))
    elif damage == "leak":
        with open(path, "ab") as f:
            f.write(bytes(100_000))


CASES = [("vdi", d, _vdi) for d in ("clean", "duplicate", "too-large", "count")] + \
        [("qed", d, _qed) for d in ("clean", "double", "invalid", "leak")] + \
        [("parallels", d, _parallels) for d in ("clean", "unclean", "outside", "leak")]


@pytest.mark.parametrize("fmt, damage, make", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_check_matches_qemu(tmp_path, fmt, damage, make):
    path = tmp_path / f"img.{fmt}"
    make(path, damage)
    qemu = qemu_check(str(path), fmt)
    drv = open_image(str(path), fmt)
    try:
        result = drv.check()
        ours = our_check(drv)
    finally:
        drv.close()
    assert ours == check_json_counters(qemu)
    assert [m for m in result.messages] == qemu["stderr"].splitlines()
    assert qemu["rc"] == (2 if result.corruptions else 3 if result.leaks else 0)


def test_unclean_parallels_opens_read_only_only(tmp_path):
    path = tmp_path / "u.hds"
    _parallels(path, "unclean")
    proc = run("qemu-io", "-f", "parallels", "-c", "read 0 512", str(path), check=False)
    drv = open_image(str(path), "parallels")
    drv.close()
    with pytest.raises(Exception) as err:
        open_image(str(path), "parallels", read_only=False)
    assert str(err.value).split(": ", 1)[1] in proc.stderr


def test_qed_need_check_is_repaired_on_read_write_open(tmp_path):
    """A read-write open of an image marked NEED_CHECK repairs it as QEMU's does."""
    import shutil
    path = tmp_path / "n.qed"
    _qed(path, "invalid")
    with open(path, "r+b") as f:               # mark the image as not closed cleanly
        f.seek(16)
        features = struct.unpack("<Q", f.read(8))[0]
        f.seek(16)
        f.write(struct.pack("<Q", features | 2))
    theirs = tmp_path / "theirs.qed"
    shutil.copy(path, theirs)
    io_run(str(theirs), "qed", "read 0 512")   # QEMU's read-write open repairs
    drv = open_image(str(path), "qed", read_only=False)
    drv.close()
    ours_after = qemu_check(str(path), "qed")
    theirs_after = qemu_check(str(theirs), "qed")
    assert check_json_counters(ours_after) == check_json_counters(theirs_after)
    assert "corruptions" not in ours_after
    with open(path, "rb") as f:
        f.seek(16)
        assert not struct.unpack("<Q", f.read(8))[0] & 2
