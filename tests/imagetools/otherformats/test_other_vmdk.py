"""vmdk specifics: streamOptimized, zeroed grains, CIDs, backing chains, check, errors."""

from __future__ import annotations

import struct

import pytest

from of_helpers import MiB, io_run, our_map, qemu_check, qemu_compare, qemu_info, qemu_map, run
from imagetools.errors import ImageError, ImageIOError, ImageOpenError
from imagetools.image import create_image, open_image

pytestmark = pytest.mark.oracle


def _pattern(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


def test_stream_optimized_whole_grains(tmp_path):
    path = tmp_path / "s.vmdk"
    size = 3 * MiB + 512               # the last grain is partial
    create_image(str(path), "vmdk", size, {"subformat": "streamOptimized"})
    expected = bytearray(size)
    drv = open_image(str(path), "vmdk", read_only=False)
    try:
        assert drv.needs_compressed_writes
        for grain in (0, 3, 17):
            data = _pattern(65536, grain)
            drv.write(grain * 65536, data)
            expected[grain * 65536:(grain + 1) * 65536] = data
        tail = size - size % 65536
        drv.write(tail, _pattern(size - tail, 9))
        expected[tail:] = _pattern(size - tail, 9)
        with pytest.raises(ImageIOError, match="allocated cluster for streamOptimized"):
            drv.write(0, bytes(65536))
        with pytest.raises(ImageIOError, match="allocated cluster for streamOptimized"):
            drv.write(512, bytes(512))
        # pieces of a grain are collected until the grain is complete ...
        drv.write(5 * 65536 + 30000, _pattern(35536, 5))
        drv.write(5 * 65536, _pattern(30000, 6))
        expected[5 * 65536 + 30000:6 * 65536] = _pattern(35536, 5)
        expected[5 * 65536:5 * 65536 + 30000] = _pattern(30000, 6)
        # ... or until the image is closed
        drv.write(7 * 65536 + 100, b"\x07" * 1000)
        expected[7 * 65536 + 100:7 * 65536 + 1100] = b"\x07" * 1000
        assert drv.read(0, size) == expected
    finally:
        drv.close()
    ref = tmp_path / "ref.raw"
    ref.write_bytes(bytes(expected))
    assert qemu_compare(str(ref), "raw", str(path), "vmdk").returncode == 0
    assert qemu_check(str(path), "vmdk")["rc"] == 0
    assert path.stat().st_size % 512 == 0
    info = qemu_info(str(path))
    assert info["format-specific"]["data"]["create-type"] == "streamOptimized"
    assert info["format-specific"]["data"]["extents"][0]["compressed"] is True
    drv = open_image(str(path), "vmdk")
    try:
        assert our_map(drv) == qemu_map(str(path), "vmdk")
    finally:
        drv.close()


def test_stream_optimized_compressor_interface(tmp_path):
    """convert -c drives compression through compressor()/write_compressed_blob()."""
    path = tmp_path / "c.vmdk"
    create_image(str(path), "vmdk", MiB, {"subformat": "streamOptimized"})
    drv = open_image(str(path), "vmdk", read_only=False)
    try:
        compress = drv.compressor()
        for grain in range(4):
            data = _pattern(65536, grain)
            drv.write_compressed_blob(grain * 65536, compress(data), 65536, data)
    finally:
        drv.close()
    expected = b"".join(_pattern(65536, g) for g in range(4)) + bytes(MiB - 4 * 65536)
    ref = tmp_path / "ref.raw"
    ref.write_bytes(expected)
    assert qemu_compare(str(ref), "raw", str(path), "vmdk").returncode == 0


def test_zeroed_grains_match_qemu(tmp_path):
    ours, theirs = tmp_path / "ours.vmdk", tmp_path / "theirs.vmdk"
    create_image(str(ours), "vmdk", 4 * MiB, {"zeroed_grain": "on"})
    run("qemu-img", "create", "-q", "-f", "vmdk", "-o", "zeroed_grain=on", str(theirs), "4M")
    drv = open_image(str(ours), "vmdk", read_only=False)
    try:
        drv.write(0, b"\x11" * (3 * 65536))
        drv.write_zeroes(65536, 65536)          # an allocated grain becomes a zero grain
        drv.write_zeroes(MiB, 2 * 65536)        # unallocated grains become zero grains
        drv.write_zeroes(2 * MiB + 100, 1000)   # partial: nothing to do without backing
    finally:
        drv.close()
    io_run(str(theirs), "vmdk", "write -P 0x11 0 192k", "write -z 64k 64k", "write -z 1m 128k",
           "write -z 2097252 1000")
    assert qemu_compare(str(theirs), "vmdk", str(ours), "vmdk").returncode == 0
    def below(entries, limit):
        """The map entries of [0, limit), offsets left out."""
        out = []
        for e in entries:
            if e["start"] >= limit:
                break
            e = {k: v for k, v in e.items() if k != "offset"}
            e["length"] = min(e["length"], limit - e["start"])
            out.append(e)
        return out

    mine = qemu_map(str(ours), "vmdk")
    other = qemu_map(str(theirs), "vmdk")
    # QEMU writes an unaligned zero range as zero data; we leave it unallocated
    assert below(mine, 2 * MiB) == below(other, 2 * MiB)
    assert {"start": 65536, "length": 65536, "depth": 0, "present": True, "zero": True,
            "data": False} in mine


def test_first_write_of_a_session_changes_the_cid(tmp_path):
    path = tmp_path / "f.vmdk"
    create_image(str(path), "vmdk", MiB, {"subformat": "monolithicFlat"})
    before = qemu_info(str(path))["format-specific"]["data"]["cid"]
    drv = open_image(str(path), "vmdk", read_only=False)
    try:
        drv.write(0, b"x" * 512)
        first = drv.cid
        drv.write(512, b"y" * 512)
        assert drv.cid == first
    finally:
        drv.close()
    after = qemu_info(str(path))["format-specific"]["data"]["cid"]
    assert after == first and after != before
    assert path.stat().st_size == 512          # the descriptor is padded as QEMU pads it


def test_child_copy_on_write_and_parent_cid(tmp_path):
    base = tmp_path / "base.vmdk"
    child = tmp_path / "child.vmdk"
    run("qemu-img", "create", "-q", "-f", "vmdk", str(base), "2M")
    io_run(str(base), "vmdk", "write -P 0x5a 0 2M")
    create_image(str(child), "vmdk", None, {"backing_file": "base.vmdk", "backing_fmt": "vmdk"})
    info = qemu_info(str(child))
    assert info["backing-filename"] == "base.vmdk"
    assert info["format-specific"]["data"]["parent-cid"] == \
        qemu_info(str(base))["format-specific"]["data"]["cid"]
    drv = open_image(str(child), "vmdk", read_only=False)
    try:
        drv.write(1000, b"\x01" * 3000)         # inside one grain: the rest is copied
    finally:
        drv.close()
    io_run(str(base), "vmdk", "write -P 0x01 1000 3000")   # base now holds the expected bytes
    # the CID of base changed with that write: QEMU then refuses to read through it
    assert run("qemu-img", "compare", str(base), str(child), check=False).returncode != 0
    drv = open_image(str(child), "vmdk")
    try:
        with pytest.raises(ImageIOError, match="parent CID"):
            drv.read(0, 2 * MiB)
        assert drv.read(0, 65536)[1000:4000] == b"\x01" * 3000   # allocated: no CID needed
    finally:
        drv.close()


def test_check_reports_a_grain_past_eof_like_qemu(tmp_path):
    path = tmp_path / "bad.vmdk"
    run("qemu-img", "create", "-q", "-f", "vmdk", str(path), "4M")
    io_run(str(path), "vmdk", "write -P 1 0 64k")
    with open(path, "r+b") as f:
        head = f.read(512)
        gd_sector = struct.unpack_from("<Q", head, 4 + 52)[0]
        f.seek(gd_sector * 512)
        gt_sector = struct.unpack("<I", f.read(4))[0]
        f.seek(gt_sector * 512)
        f.write(struct.pack("<I", 99999))
    qemu = qemu_check(str(path), "vmdk")
    drv = open_image(str(path), "vmdk")
    try:
        result = drv.check()
    finally:
        drv.close()
    assert qemu["rc"] == 1 and "Check failed: Invalid argument" in qemu["stderr"]
    assert result.failed == "Invalid argument"
    assert [line + "\n" for line in result.messages] == \
        [line + "\n" for line in qemu["stderr"].splitlines() if line.startswith("ERROR")]


@pytest.mark.parametrize("text, reason", [
    ('createType="monolithicFlat"\nRW 100 FLAT "nofile.vmdk" 0\n',
     "Could not open '{d}/nofile.vmdk': No such file or directory"),
    ('createType="monolithicFlat"\nRW 100 FLAT "nofile.vmdk"\n',
     'Invalid extent line: RW 100 FLAT "nofile.vmdk"'),
    ('createType="foo"\n', "Unsupported image type 'foo'"),
    ("", "invalid VMDK image descriptor"),
])
def test_descriptor_errors_are_worded_as_qemu(tmp_path, text, reason):
    path = tmp_path / "d.vmdk"
    path.write_text("# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\n" + text)
    proc = run("qemu-img", "info", str(path), check=False)
    want = reason.format(d=tmp_path)
    assert want in proc.stderr
    with pytest.raises(ImageOpenError) as err:
        open_image(str(path), "vmdk")
    assert str(err.value) == f"Could not open '{path}': {want}"


def test_descriptor_without_cid_fails_as_qemu(tmp_path):
    path = tmp_path / "d.vmdk"
    path.write_text('# Disk DescriptorFile\nversion=1\ncreateType="monolithicFlat"\n')
    proc = run("qemu-img", "info", str(path), check=False)
    with pytest.raises(ImageError) as err:
        open_image(str(path), "vmdk")
    assert proc.stderr.strip() == f"qemu-img: {err.value}"


def test_create_errors(tmp_path):
    path = str(tmp_path / "x.vmdk")
    cases = [
        ({"subformat": "monolithicFlat", "zeroed_grain": "on"},
         "Flat image can't enable zeroed grain"),
        ({"compat6": "on", "hwversion": "7"}, "compat6 cannot be enabled with hwversion set"),
        ({"subformat": "foo"}, "invalid parameter value: foo"),
        ({"adapter_type": "foo"}, "invalid parameter value: foo"),
    ]
    for opts, message in cases:
        with pytest.raises(ImageError) as err:
            create_image(path, "vmdk", MiB, opts)
        assert str(err.value) == message


@pytest.mark.parametrize("subformat", ["twoGbMaxExtentSparse", "twoGbMaxExtentFlat"])
def test_split_extents_across_the_2g_boundaries(tmp_path, subformat):
    path = tmp_path / "big.vmdk"
    size = 5 * 1024 * MiB + 512
    create_image(str(path), "vmdk", size, {"subformat": subformat})
    names = sorted(p.name for p in tmp_path.iterdir())
    letter = "s" if "Sparse" in subformat else "f"
    assert names == sorted(["big.vmdk"] + [f"big-{letter}00{i}.vmdk" for i in (1, 2, 3)])
    drv = open_image(str(path), "vmdk", read_only=False)
    try:
        for boundary in (2048 * MiB, 4096 * MiB):
            drv.write(boundary - 300, b"\x5a" * 600)
        drv.write(size - 512, b"\x77" * 512)
    finally:
        drv.close()
    assert qemu_check(str(path), "vmdk")["rc"] == 0
    io_run(str(path), "vmdk", "read -P 0x5a 2147483348 600", "read -P 0x5a 4294966996 600",
           f"read -P 0x77 {size - 512} 512", "read -P 0 0 1m")
    drv = open_image(str(path), "vmdk")
    try:
        assert [e["virtual-size"] for e in drv.format_specific()["data"]["extents"]] == \
            [2048 * MiB, 2048 * MiB, 1024 * MiB + 512]
        assert our_map(drv) == qemu_map(str(path), "vmdk")
    finally:
        drv.close()
