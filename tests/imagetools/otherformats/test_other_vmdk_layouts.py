"""vmdk layouts qemu-img does not create: descriptors with several extents of mixed
kinds (flat with a start offset, hosted sparse, VMFS sparse "COWD"), judged by
QEMU reading the same files."""

from __future__ import annotations

import json
import struct

import pytest

from of_helpers import MiB, our_map, qemu_map, qemu_raw, run
from imagetools.image import open_image

pytestmark = pytest.mark.oracle


def _cowd(path, data: bytes, grain_sectors: int = 8, present=lambda i: i % 3 == 0) -> None:
    """A VMFS sparse (COWD) extent holding ``data``; grains where ``present``."""
    sectors = len(data) // 512
    grains = -(-sectors // grain_sectors)
    gd_entries = -(-grains // 4096)
    gd_sector = 4                                   # after the 2 KiB header
    gt_sector = gd_sector + 1
    first_grain = gt_sector + 32 * gd_entries
    header = b"COWD" + struct.pack("<10I", 1, 3, sectors, grain_sectors, gd_sector, gd_entries,
                                   0, 0, 0, 0)
    image = bytearray(header.ljust(2048, b"\0"))
    image += struct.pack(f"<{gd_entries}I", *(gt_sector + 32 * i for i in range(gd_entries)))
    image = image.ljust(gt_sector * 512, b"\0")
    gt = [0] * (4096 * gd_entries)
    grain_data = bytearray()
    next_sector = first_grain
    for g in range(grains):
        chunk = data[g * grain_sectors * 512:(g + 1) * grain_sectors * 512]
        if present(g) and any(chunk):
            gt[g] = next_sector
            grain_data += chunk.ljust(grain_sectors * 512, b"\0")
            next_sector += grain_sectors
    image += struct.pack(f"<{len(gt)}I", *gt)
    image = image.ljust(first_grain * 512, b"\0") + grain_data
    path.write_bytes(bytes(image))


def _pattern(n: int, seed: int) -> bytes:
    return bytes((i // 512 * 7 + seed) & 0xFF for i in range(n))


def test_mixed_extent_descriptor(tmp_path):
    # extent 1: flat, starting 3 sectors into its file; extent 2: a QEMU-made
    # sparse file; extent 3: COWD; a read-only line and a ZERO line are skipped
    flat = tmp_path / "part-flat.bin"
    flat.write_bytes(b"\xee" * 1536 + _pattern(MiB, 1))
    sparse = tmp_path / "part-s.vmdk"
    run("qemu-img", "create", "-q", "-f", "vmdk", str(sparse), "1M")
    run("qemu-io", "-f", "vmdk", "-c", "write -P 0x42 65536 100000", str(sparse))
    cowd = tmp_path / "part-cowd.vmdk"
    _cowd(cowd, _pattern(MiB, 3))
    desc = tmp_path / "multi.vmdk"
    desc.write_text(
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n"
        'createType="vmfsSparse"\n\n# Extent description\n'
        'RW 2048 FLAT "part-flat.bin" 3\n'
        'RDONLY 2048 FLAT "part-flat.bin" 0\n'
        'RW 2048 SPARSE "part-s.vmdk"\n'
        'RW 2048 ZERO "nothing"\n'
        'RW 2048 VMFSSPARSE "part-cowd.vmdk"\n\n'
        '# The Disk Data Base\n#DDB\n\nddb.adapterType = "ide"\n')
    expected = qemu_raw(str(desc), "vmdk", tmp_path / "expected.raw")
    drv = open_image(str(desc), "vmdk")
    try:
        assert drv.size == 3 * MiB == len(expected)
        assert drv.read(0, drv.size) == expected
        assert drv.read(MiB - 100, 300) == expected[MiB - 100:MiB + 200]
        assert our_map(drv) == qemu_map(str(desc), "vmdk")
        info = json.loads(run("qemu-img", "info", "--output=json", str(desc)).stdout)
        assert drv.format_specific() == info["format-specific"]
        # mixed extent kinds: QEMU has no driver info, hence no cluster size or dirty flag
        assert drv.cluster_size is None and "cluster-size" not in info
        assert drv.is_dirty() is None and "dirty-flag" not in info
    finally:
        drv.close()


def test_cowd_writes_are_refused(tmp_path):
    cowd = tmp_path / "c.vmdk"
    _cowd(cowd, _pattern(MiB, 5))
    desc = tmp_path / "d.vmdk"
    desc.write_text("# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\n"
                    'createType="vmfsSparse"\nRW 2048 VMFSSPARSE "c.vmdk"\n')
    from imagetools.errors import ImageError
    drv = open_image(str(desc), "vmdk", read_only=False)
    try:
        with pytest.raises(ImageError, match="COWD"):
            drv.write(0, b"x" * 512)
    finally:
        drv.close()
