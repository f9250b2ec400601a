"""Hostile headers that would make a careless reader allocate or loop without end:
each is one clear ImageError, at once, before any big table is read."""

from __future__ import annotations

import struct

import pytest

from of_helpers import DATA, run
from imagetools.errors import ImageError
from imagetools.image import open_image

pytestmark = [pytest.mark.oracle, pytest.mark.timeout(60)]


def _patch(path, offset: int, fmt: str, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def _qemu_made(tmp_path, fmt, opts=()):
    path = tmp_path / f"h.{fmt}"
    run("qemu-img", "create", "-q", "-f", fmt, *opts, str(path), "4M")
    return path


CASES = {
    # a block map of ~2 GiB announced in a 1 KiB file
    "vdi-huge-map": ("vdi", lambda p: (_patch(p, 0x180, "<I", 0x1FFFFF00),
                                       _patch(p, 0x170, "<Q", 0x1FFFFF00 << 20)),
                     "VDI block map is too large"),
    "vdi-map-past-eof": ("vdi", lambda p: (_patch(p, 0x180, "<I", 0x100000),
                                           _patch(p, 0x170, "<Q", 0x100000 << 20)),
                         "beyond the end of the file"),
    "vdi-bad-block-size": ("vdi", lambda p: _patch(p, 0x178, "<I", 4096),
                           "block size 4096 is not 1048576"),
    "vpc-huge-bat": ("vpc", lambda p: _patch(p, 512 + 28, ">I", 0x1FFFFFFF),
                     "allocation table is too large"),
    "vpc-bat-past-eof": ("vpc", lambda p: _patch(p, 512 + 28, ">I", 0x1000000),
                         "beyond the end of the file"),
    "vpc-bad-checksum": ("vpc", lambda p: _patch(p, 48, ">Q", 1 << 40),
                         "Incorrect header checksum"),
    "qed-l1-past-eof": ("qed", lambda p: _patch(p, 40, "<Q", 1 << 40),
                        "QED table offset is invalid"),
    "qed-unknown-feature": ("qed", lambda p: _patch(p, 16, "<Q", 1 << 40),
                            "Unsupported QED features"),
    "qcow-huge-l1": ("qcow", lambda p: _patch(p, 24, ">Q", 1 << 62), "Image too large"),
    "qcow-l1-past-eof": ("qcow", lambda p: _patch(p, 24, ">Q", 1 << 40),
                         "beyond the end of the file"),
    "parallels-huge-bat": ("parallels", lambda p: _patch(p, 32, "<I", 0x1FFFFFFF),
                           "beyond the end of the file"),
    "parallels-zero-tracks": ("parallels", lambda p: _patch(p, 28, "<I", 0),
                              "Zero sectors per track"),
    "vmdk-huge-gd": ("vmdk", lambda p: _patch(p, 4 + 8, "<Q", 1 << 44), "L1 size too big"),
    "vmdk-gd-past-eof": ("vmdk", lambda p: _patch(p, 4 + 8, "<Q", 1 << 36),
                         "Could not read l1 table"),
    "vmdk-grain-too-big": ("vmdk", lambda p: _patch(p, 4 + 16, "<Q", 0x300000),
                           "Invalid granularity"),
    "vhdx-huge-bat": ("vhdx", None, "Invalid argument"),
}


def _vhdx_huge_bat(path) -> None:
    """A metadata size claiming 64 TiB with the small BAT region of a 4 MiB image."""
    with open(path, "rb") as f:
        f.seek(3 << 20)
        table = f.read(65536)
    offset = struct.unpack_from("<I", table, 32 + 32 + 16)[0]     # virtual disk size item
    _patch(path, (3 << 20) + offset, "<Q", 64 << 40)


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_header_is_one_clear_error(tmp_path, case):
    fmt, damage, message = CASES[case]
    path = _qemu_made(tmp_path, fmt)
    if damage is None:
        _vhdx_huge_bat(path)
    else:
        damage(path)
    with pytest.raises(ImageError, match=message):
        drv = open_image(str(path), fmt)
        drv.close()


@pytest.mark.parametrize("name, fmt, offset, pack, value, message", [
    ("cloop.cloop", "cloop", 132, ">I", 0x1FFFFFFE, "must be|too many offsets|beyond the end"),
    ("cloop.cloop", "cloop", 128, ">I", 1000, "must be a multiple of 512"),
    ("bochs-growing.img", "bochs", 72, "<I", 0xFFFFFF, "Catalog size is too large"),
    ("bochs-growing.img", "bochs", 80, "<I", 3000, "is not a power of two"),
    ("udif.dmg", "dmg", -512 + 0xE0, ">Q", 1 << 40, "Invalid argument"),
])
def test_hostile_read_only_formats(tmp_path, name, fmt, offset, pack, value, message):
    path = tmp_path / name
    data = bytearray((DATA / name).read_bytes())
    struct.pack_into(pack, data, offset % len(data), value)
    path.write_bytes(bytes(data))
    with pytest.raises(ImageError, match=message):
        drv = open_image(str(path), fmt)
        drv.close()


@pytest.mark.parametrize("fmt", ["vdi", "vpc", "qed", "qcow", "vhdx", "vmdk", "parallels"])
def test_truncated_files_open_when_qemu_opens_them(tmp_path, fmt):
    for length in (100, 600, 70000, 300000):
        path = _qemu_made(tmp_path, fmt)
        with open(path, "r+b") as f:
            f.truncate(length)
        qemu_opens = run("qemu-img", "info", "-f", fmt, str(path), check=False).returncode == 0
        try:
            drv = open_image(str(path), fmt)
        except ImageError:
            assert not qemu_opens, (fmt, length)
            continue
        try:
            assert qemu_opens, (fmt, length)
            drv.read(0, min(drv.size, 1 << 20))
        except ImageError:
            pass
        finally:
            drv.close()
