"""bochs, cloop and dmg: read-only, and dmg variants QEMU's build here cannot read.

The committed fixtures are covered by test_read_oracle.py. Here: write
attempts fail as in QEMU, creation is refused, and dmg images with bzip2,
LZFSE and resource-fork tables (made by a small UDIF writer below) read
back the bytes they were made from.
"""

from __future__ import annotations

import base64
import bz2
import struct
import zlib

import pytest

from of_helpers import DATA, MiB, qemu_raw, run
from imagetools.errors import ImageError, ImageOpenError
from imagetools.image import create_image, open_image



def _reference() -> bytes:
    ref = bytearray(4 * MiB)
    ref[0:65536] = b"\xaa" * 65536
    ref[1049088:1053184] = b"\xbb" * 4096
    ref[4190208:] = b"\xcc" * 4096
    return bytes(ref)


@pytest.mark.parametrize("name, fmt", [("bochs-growing.img", "bochs"), ("cloop.cloop", "cloop"),
                                       ("udif.dmg", "dmg")])
def test_fixture_reads_reference_and_refuses_writes(tmp_path, name, fmt):
    drv = open_image(str(DATA / name), fmt)
    try:
        assert drv.read(0, drv.size) == _reference()
        assert drv.is_dirty() is None and drv.cluster_size is None
    finally:
        drv.close()
    with pytest.raises(ImageOpenError, match="Image is read-only"):
        open_image(str(DATA / name), fmt, read_only=False)
    with pytest.raises(ImageError, match="does not support image creation"):
        create_image(str(tmp_path / "x"), fmt, MiB, {})


# -- a small UDIF writer -------------------------------------------------------------------

def _chunks(raw: bytes, sectors: int, codec: str):
    """(type, first sector, count, payload) chunks of ``raw``: zero runs and codec chunks."""
    out = []
    total = len(raw) // 512
    for first in range(0, total, sectors):
        count = min(sectors, total - first)
        data = raw[first * 512:(first + count) * 512]
        if not any(data):
            out.append((0x00000000, first, count, b""))
        elif codec == "bzip2":
            out.append((0x80000006, first, count, bz2.compress(data)))
        elif codec == "lzfse":
            import lzfse as lz
            out.append((0x80000007, first, count, lz.compress(data)))
        elif codec == "raw":
            out.append((0x00000001, first, count, data))
        else:
            out.append((0x80000005, first, count, zlib.compress(data)))
    return out


def udif(raw: bytes, codec: str = "zlib", resource_fork: bool = False,
         sectors: int = 256) -> bytes:
    fork = bytearray()
    entries = []
    for kind, first, count, payload in _chunks(raw, sectors, codec):
        entries.append(struct.pack(">IIQQQQ", kind, 0, first, count, len(fork), len(payload)))
        fork += payload
    entries.append(struct.pack(">IIQQQQ", 0xFFFFFFFF, 0, len(raw) // 512, 0, len(fork), 0))
    mish = bytearray(204)
    struct.pack_into(">4sIQQQII", mish, 0, b"mish", 1, 0, len(raw) // 512, 0, 0, len(entries))
    struct.pack_into(">I", mish, 200, len(entries))
    mish += b"".join(entries)
    tables = bytes(fork)
    koly = bytearray(512)
    struct.pack_into(">4sIII", koly, 0, b"koly", 4, 512, 1)
    struct.pack_into(">QQ", koly, 0x18, 0, len(fork))
    if resource_fork:
        # resource data offset, map offset, data length; then [u32 size][mish]
        res = struct.pack(">I", len(mish)) + bytes(mish)
        head = struct.pack(">IIII", 256, 256 + len(res), len(res), 0)
        block = head + bytes(256 - len(head)) + res
        struct.pack_into(">QQ", koly, 0x28, len(tables), len(block))
        tables += block
    else:
        text = base64.b64encode(bytes(mish))
        xml = (b"<plist><dict><key>blkx</key><array><dict><key>Data</key><data>\n"
               + b"\n".join(text[i:i + 60] for i in range(0, len(text), 60))
               + b"\n</data></dict></array></dict></plist>\n")
        struct.pack_into(">QQ", koly, 0xD8, len(tables), len(xml))
        tables += xml
    struct.pack_into(">IQ", koly, 0x1E8, 1, len(raw) // 512)
    return tables + bytes(koly)


@pytest.mark.parametrize("codec, fork", [("zlib", True), ("raw", False), ("bzip2", False),
                                         ("lzfse", False)])
def test_dmg_variants(tmp_path, codec, fork):
    if codec == "lzfse":
        pytest.importorskip("lzfse", reason="the optional lzfse package is not installed",
                            exc_type=ImportError)
    raw = _reference()
    path = tmp_path / "v.dmg"
    path.write_bytes(udif(raw, codec, fork))
    drv = open_image(str(path))                 # probed by the .dmg suffix
    try:
        assert drv.format_name == "dmg"
        assert drv.read(0, drv.size) == raw
        assert drv.read(1049000, 5000) == raw[1049000:1054000]
    finally:
        drv.close()
    if codec in ("zlib", "raw"):                # this QEMU build reads only these
        assert qemu_raw(str(path), "dmg", tmp_path / "q.raw") == raw


def test_dmg_uncovered_sectors_fail_reads(tmp_path):
    raw = _reference()
    data = bytearray(udif(raw, "zlib"))
    path = tmp_path / "h.dmg"
    path.write_bytes(bytes(data))
    drv = open_image(str(path))
    drv.close()
    # a trailer claiming a bigger disk than the tables cover
    struct.pack_into(">Q", data, len(data) - 512 + 0x1EC, 2 * len(raw) // 512)
    path.write_bytes(bytes(data))
    drv = open_image(str(path))
    try:
        assert drv.read(0, 512) == raw[:512]
        with pytest.raises(ImageError, match="not covered"):
            drv.read(len(raw), 512)
    finally:
        drv.close()
    proc = run("qemu-io", "-f", "dmg", "-r", "-c", f"read {len(raw)} 512", str(path), check=False)
    assert "Input/output error" in proc.stdout + proc.stderr
