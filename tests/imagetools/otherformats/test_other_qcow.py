"""qcow (v1) specifics: compressed clusters written by us, rewrites of compressed
clusters, copy-on-write over a backing file, refused encryption."""

from __future__ import annotations

import struct

import pytest

from of_helpers import MiB, qemu_compare, qemu_info, qemu_map, our_map, run
from imagetools.errors import ImageError, ImageOpenError
from imagetools.image import create_image, open_image

pytestmark = pytest.mark.oracle


def test_compressed_clusters_and_partial_rewrite(tmp_path):
    path = tmp_path / "c.qcow"
    size = MiB + 1024                         # the last cluster is partial
    create_image(str(path), "qcow", size, {})
    expected = bytearray(size)
    drv = open_image(str(path), "qcow", read_only=False)
    try:
        compress = drv.compressor()
        for index in range(0, size // 4096 + 1, 3):
            off = index * 4096
            n = min(4096, size - off)
            data = bytes([index & 0xFF]) * n
            drv.write_compressed_blob(off, compress(data), n, data)
            expected[off:off + n] = data
        noisy = bytes(range(256)) * 16        # does not compress: stored plain
        drv.write_compressed_blob(4096, compress(noisy), 4096, noisy)
        expected[4096:8192] = noisy
        drv.write(12288 + 100, b"\x77" * 50)  # into a compressed cluster
        expected[12288 + 100:12288 + 150] = b"\x77" * 50
        assert drv.read(0, size) == expected
    finally:
        drv.close()
    ref = tmp_path / "ref.raw"
    ref.write_bytes(bytes(expected))
    assert qemu_compare(str(ref), "raw", str(path), "qcow").returncode == 0
    drv = open_image(str(path), "qcow")
    try:
        assert our_map(drv) == qemu_map(str(path), "qcow")
    finally:
        drv.close()


def test_backing_copy_on_write(tmp_path):
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(range(256)) * 8192)            # 2 MiB
    top = tmp_path / "top.qcow"
    create_image(str(top), "qcow", None, {"backing_file": "base.raw", "backing_fmt": "raw"})
    info = qemu_info(str(top))
    assert info["cluster-size"] == 512 and info["backing-filename"] == "base.raw"
    assert "backing-filename-format" not in info           # qcow cannot record it
    drv = open_image(str(top), "qcow", read_only=False, backing_fmt="raw")
    try:
        drv.write(1000, b"\x01" * 10)          # inside a 512-byte cluster
    finally:
        drv.close()
    expected = bytearray(base.read_bytes())
    expected[1000:1010] = b"\x01" * 10
    ref = tmp_path / "ref.raw"
    ref.write_bytes(bytes(expected))
    assert qemu_compare(str(ref), "raw", str(top), "qcow").returncode == 0


def test_encrypted_and_broken_headers(tmp_path):
    path = tmp_path / "e.qcow"
    run("qemu-img", "create", "-q", "-f", "qcow", str(path), "1M")
    with open(path, "r+b") as f:
        f.seek(36)
        f.write(struct.pack(">I", 1))          # crypt_method AES
    with pytest.raises(ImageError, match="encrypted qcow"):
        open_image(str(path), "qcow")
    with open(path, "r+b") as f:
        f.seek(36)
        f.write(struct.pack(">I", 0))
        f.seek(32)
        f.write(bytes([20]))                   # cluster_bits
    proc = run("qemu-img", "info", "-f", "qcow", str(path), check=False)
    with pytest.raises(ImageOpenError) as err:
        open_image(str(path), "qcow")
    assert proc.stderr == f"qemu-img: {err.value}\n"
    with pytest.raises(ImageError, match="not supported"):
        create_image(str(tmp_path / "n.qcow"), "qcow", MiB, {"encryption": "on"})
