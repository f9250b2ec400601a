"""raw driver: data, sparseness and block status, judged by qemu-img / qemu-io."""

from __future__ import annotations

import os

import pytest
from fmt_helpers import io_cmds, our_map, qemu_map, run

from imagetools.errors import ImageError, ImageIOError, ImageOpenError
from imagetools.image import create_image, open_image

pytestmark = pytest.mark.oracle


def test_qemu_written_sparse_file_reads_and_maps_like_qemu(qemu_img, qemu_io, tmp_path):
    path = str(tmp_path / "s.raw")
    run(qemu_img, "create", "-f", "raw", path, "4M")
    io_cmds(qemu_io, path, "write -P 0xab 1234 5678", "write -P 0xcd 1m 64k",
            "write -z 1056768 4096", "write -P 0xee 4190208 4096", fmt="raw")
    with open_image(path, "raw") as drv:
        assert drv.size == 4 << 20
        assert drv.read(0, drv.size) == open(path, "rb").read()
        assert our_map(drv) == qemu_map(qemu_img, path, "raw")
        assert drv.allocated_size() == os.stat(path).st_blocks * 512


@pytest.mark.parametrize("length", [0, 35, 1000, 10000])
def test_size_rounds_up_to_sector_and_tail_reads_zero(qemu_img, tmp_path, length):
    path = tmp_path / "odd.img"
    path.write_bytes(b"\x11" * length)
    with open_image(str(path)) as drv:
        assert drv.format_name == "raw"
        assert drv.size == (length + 511) // 512 * 512
        assert drv.read(0, drv.size) == b"\x11" * length + bytes(drv.size - length)
        if length:
            assert our_map(drv) == qemu_map(qemu_img, str(path), "raw")


@pytest.mark.parametrize("prealloc", ["off", "falloc", "full"])
@pytest.mark.parametrize("size", [0, 1000, 1 << 20])
def test_create_matches_qemu_img(qemu_img, tmp_path, prealloc, size):
    ours = str(tmp_path / "ours.raw")
    theirs = str(tmp_path / "theirs.raw")
    create_image(ours, "raw", size, {"preallocation": prealloc})
    run(qemu_img, "create", "-f", "raw", "-o", f"preallocation={prealloc}", theirs, str(size))
    assert os.path.getsize(ours) == os.path.getsize(theirs)
    assert os.stat(ours).st_blocks == os.stat(theirs).st_blocks
    if size:
        with open_image(ours, "raw") as drv:
            assert our_map(drv) == qemu_map(qemu_img, theirs, "raw")


def test_create_truncates_existing_file(tmp_path):
    path = tmp_path / "existing.img"
    path.write_bytes(b"hello" * 1000000)
    create_image(str(path), "raw", 1 << 20, {})
    assert path.stat().st_size == 1 << 20
    assert path.read_bytes() == bytes(1 << 20)


def test_write_zero_discard_then_qemu_agrees(qemu_img, tmp_path):
    path = str(tmp_path / "w.raw")
    create_image(path, "raw", 8 << 20, {})
    model = bytearray(8 << 20)
    with open_image(path, "raw", read_only=False) as drv:
        for off, data in ((0, b"\x01" * 70000), (3 << 20, b"\x02" * (1 << 20)),
                          ((8 << 20) - 513, b"\x03" * 513)):
            drv.write(off, data)
            model[off:off + len(data)] = data
        drv.write_zeroes(3 << 20, 65536)
        model[3 << 20:(3 << 20) + 65536] = bytes(65536)
        drv.write_zeroes((3 << 20) + 131072, 131072, unmap=True)
        model[(3 << 20) + 131072:(3 << 20) + 262144] = bytes(131072)
        drv.discard(0, 65536)
        model[0:65536] = bytes(65536)
        drv.flush()
        assert drv.read(0, drv.size) == bytes(model)
        assert our_map(drv) == qemu_map(qemu_img, path, "raw")
    assert open(path, "rb").read() == bytes(model)


def test_out_of_range_and_read_only_are_errors(tmp_path):
    path = str(tmp_path / "r.raw")
    create_image(path, "raw", 4096, {})
    with open_image(path, "raw") as drv:
        with pytest.raises(ImageIOError):
            drv.write(0, b"x")
        with pytest.raises(ImageError):
            drv.read(4000, 200)


def test_probed_raw_refuses_a_first_sector_that_probes_as_qcow2(tmp_path):
    path = str(tmp_path / "guest.img")
    create_image(path, "raw", 1 << 20, {})
    header = b"QFI\xfb\x00\x00\x00\x03" + bytes(504)
    warnings = []
    import imagetools.image as image
    old = image.warning_handler
    image.warning_handler = warnings.append
    try:
        with open_image(path, read_only=False) as drv:
            with pytest.raises(ImageIOError, match="Operation not permitted"):
                drv.write(0, header)
            drv.write(512, header)          # only the first sector is guarded
        with open_image(path, "raw", read_only=False) as drv:
            drv.write(0, header)            # -f raw lifts the restriction
    finally:
        image.warning_handler = old
    assert len(warnings) == 1
    assert warnings[0].startswith("WARNING: Image format was not specified for "
                                  f"'{path}' and probing guessed raw.")


def test_missing_file_and_directory_messages(tmp_path):
    with pytest.raises(ImageOpenError) as err:
        open_image("nonexistent.raw")
    assert str(err.value) == ("Could not open 'nonexistent.raw': Could not open "
                              "'nonexistent.raw': No such file or directory")
    with pytest.raises(ImageOpenError) as err:
        open_image(str(tmp_path))
    assert str(err.value) == (f"Could not open '{tmp_path}': 'file' driver requires "
                              f"'{tmp_path}' to be a regular file")


@pytest.mark.root
def test_block_device_via_loop(qemu_img, tmp_path):
    backing = tmp_path / "loop.img"
    backing.write_bytes(b"\x5a" * (1 << 20))
    proc = run("losetup", "--find", "--show", str(backing), check=False)
    if proc.returncode != 0:
        pytest.skip(f"no loop device: {proc.stderr.strip()}")
    dev = proc.stdout.strip()
    try:
        with open_image(dev, "raw", read_only=False) as drv:
            assert drv.size == 1 << 20
            assert not drv.has_zero_init()
            drv.write_zeroes(4096, 8192)
            drv.write(0, b"\x01" * 512)
            drv.flush()
            data = drv.read(0, 16384)
        assert data == b"\x01" * 512 + b"\x5a" * 3584 + bytes(8192) + b"\x5a" * 4096
    finally:
        run("losetup", "-d", dev, check=False)
