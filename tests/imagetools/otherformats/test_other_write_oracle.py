"""Images qimg creates and writes are what qemu-img would make, and QEMU reads them.

For each writable format and create option set:

* a fresh image has the same file length and ``qemu-img info`` (apart from
  random ids and host allocation) as one ``qemu-img create`` makes;
* after a reproducible mix of writes and zero writes at odd offsets through
  our driver, ``qemu-img compare`` finds it equal to the expected bytes and
  ``qemu-img check`` (where the format has one) finds no errors or leaks;
* QEMU can write into the image afterwards (``qemu-io``) and we read that.
"""

from __future__ import annotations

import importlib
import re

import pytest

from of_helpers import (MiB, apply_ops, io_run, qemu_check, qemu_compare, qemu_info, qemu_raw,
                        random_ops, run)
from imagetools.image import create_image, open_image

pytestmark = pytest.mark.oracle

#: (format, -o options, virtual size)
CASES = [
    ("vdi", {}, 5 * MiB),
    ("vdi", {"static": "on"}, 3 * MiB + 512),
    ("vpc", {}, 5 * MiB),
    ("vpc", {"subformat": "fixed"}, 5 * MiB),
    ("vpc", {"force_size": "on"}, 5 * MiB + 1536),
    ("qed", {}, 5 * MiB),
    ("qed", {"cluster_size": "4096", "table_size": "2"}, 5 * MiB),
    ("qcow", {}, 5 * MiB),
    ("vhdx", {}, 5 * MiB),
    ("vhdx", {"block_size": "1M", "block_state_zero": "off"}, 5 * MiB),
    ("vhdx", {"subformat": "fixed", "block_size": "1M"}, 3 * MiB),
    ("vmdk", {}, 5 * MiB),
    ("vmdk", {"zeroed_grain": "on"}, 5 * MiB),
    ("vmdk", {"subformat": "monolithicFlat"}, 5 * MiB),
    ("vmdk", {"subformat": "twoGbMaxExtentSparse"}, 5 * MiB),
    ("vmdk", {"subformat": "twoGbMaxExtentFlat"}, 5 * MiB),
    ("vmdk", {"adapter_type": "lsilogic", "hwversion": "7"}, 5 * MiB),
    ("parallels", {}, 5 * MiB),
    ("parallels", {"cluster_size": "64k"}, 5 * MiB),
]
CHECKABLE = ("qed", "vdi", "vhdx", "vmdk", "parallels")
#: members of qemu-img info that differ between two fresh images by design
RANDOM = ("actual-size", "filename")


def _have(fmt: str) -> bool:
    try:
        module = importlib.import_module(f"imagetools.formats.{fmt}")
    except ImportError:
        return False
    return getattr(module, "DRIVER", None) is not None and \
        getattr(module.DRIVER, "create", None) is not None


def _ids(case):
    fmt, opts, _ = case
    return fmt + "".join(f"-{k}={v}" for k, v in opts.items())


def _o(opts: dict) -> list[str]:
    return ["-o", ",".join(f"{k}={v}" for k, v in opts.items())] if opts else []


def _cid_free(text: str) -> str:
    return re.sub(r"\nCID=[0-9a-f]+\n", "\nCID=?\n", text)


def _normalise(info: dict) -> dict:
    info = {k: v for k, v in info.items() if k not in RANDOM}
    spec = info.get("format-specific")
    if spec and spec["type"] == "vmdk":
        data = dict(spec["data"])
        data.pop("cid")
        data["extents"] = [{k: v for k, v in e.items() if k != "filename"}
                           for e in data["extents"]]
        info["format-specific"] = {"type": "vmdk", "data": data}
    return info


@pytest.mark.parametrize("case", [c for c in CASES if _have(c[0])], ids=_ids)
def test_create_matches_qemu_img(tmp_path, case):
    fmt, opts, size = case
    (tmp_path / "ours").mkdir()
    (tmp_path / "theirs").mkdir()
    ours = tmp_path / "ours" / f"img.{fmt}"
    theirs = tmp_path / "theirs" / f"img.{fmt}"
    create_image(str(ours), fmt, size, dict(opts))
    run("qemu-img", "create", "-q", "-f", fmt, *_o(opts), str(theirs), str(size))
    assert sorted(p.name for p in ours.parent.iterdir()) == \
        sorted(p.name for p in theirs.parent.iterdir())
    for mine in ours.parent.iterdir():
        other = theirs.parent / mine.name
        if mine.read_bytes()[:21] == b"# Disk DescriptorFile":
            assert _cid_free(mine.read_text()) == _cid_free(other.read_text())
        else:
            assert mine.stat().st_size == other.stat().st_size, mine.name
    assert _normalise(qemu_info(str(ours), fmt)) == _normalise(qemu_info(str(theirs), fmt))
    if fmt in CHECKABLE:
        result = qemu_check(str(ours), fmt)
        assert result["rc"] == 0, result


@pytest.mark.parametrize("case", [c for c in CASES if _have(c[0])], ids=_ids)
def test_writes_are_read_back_by_qemu(tmp_path, case):
    fmt, opts, size = case
    path = tmp_path / f"img.{fmt}"
    create_image(str(path), fmt, size, dict(opts))
    drv = open_image(str(path), fmt, read_only=False)
    try:
        ref = bytearray(drv.size)
        apply_ops(drv, random_ops(drv.size, seed=len(fmt) * 7 + len(opts)), ref)
        assert drv.read(0, drv.size) == ref
    finally:
        drv.close()
    expected = tmp_path / "expected.raw"
    expected.write_bytes(bytes(ref))
    cmp = qemu_compare(str(expected), "raw", str(path), fmt)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    if fmt in CHECKABLE:
        result = qemu_check(str(path), fmt)
        assert result["rc"] == 0 and not result.get("leaks"), result
    # QEMU writes on top of what we wrote; we read its result
    io_run(str(path), fmt, "write -P 0x77 12345 70000", "write -P 0x78 2m 64k")
    want = qemu_raw(str(path), fmt, tmp_path / "after.raw")
    drv = open_image(str(path), fmt)
    try:
        assert drv.read(0, drv.size) == want
    finally:
        drv.close()


@pytest.mark.parametrize("creator", [b"win ", b"qemu", b"d2v ", b"vpc "])
def test_vpc_size_rules_follow_the_creator(tmp_path, creator):
    """QEMU takes the footer's size for Hyper-V and friends, CHS for the others."""
    import struct
    path = tmp_path / "c.vhd"
    run("qemu-img", "create", "-q", "-f", "vpc", "-o", "force_size=on", str(path), "5000000")
    with open(path, "r+b") as f:
        footer = bytearray(f.read(512))
        footer[28:32] = creator
        footer[56:60] = struct.pack(">HBB", 100, 4, 17)      # a CHS smaller than the size
        footer[64:68] = bytes(4)
        footer[64:68] = struct.pack(">I", ~sum(footer) & 0xFFFFFFFF)
        for where in (0, path.stat().st_size - 512):
            f.seek(where)
            f.write(footer)
    drv = open_image(str(path), "vpc")
    try:
        assert drv.size == qemu_info(str(path), "vpc")["virtual-size"]
        assert drv.size == (5000192 if creator in (b"win ", b"d2v ") else 100 * 4 * 17 * 512)
    finally:
        drv.close()
