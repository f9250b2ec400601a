"""Hostile qcow2 images: one clear ImageError line, quickly, with bounded memory.

Where qemu-img 7.2 has a message for the case, ours is the same.
"""

from __future__ import annotations

import json
import struct

import pytest
from fmt_helpers import io_cmds, run

from imagetools.errors import ImageError, ImageIOError, ImageOpenError
from imagetools.image import MAX_BACKING_DEPTH, create_image, open_image

pytestmark = [pytest.mark.oracle, pytest.mark.timeout(60)]


def poke(path, offset, fmt, value):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


@pytest.fixture
def image(qemu_img, qemu_io, tmp_path):
    path = str(tmp_path / "h.qcow2")
    run(qemu_img, "create", "-q", "-f", "qcow2", path, "64M")
    io_cmds(qemu_io, path, "write -P 1 0 128k")
    return path


def qemu_error(qemu_img, path):
    proc = run(qemu_img, "info", path, check=False)
    assert proc.returncode == 1
    return proc.stderr.strip().removeprefix("qemu-img: ")


@pytest.mark.parametrize("offset,fmt,value", [
    (4, ">I", 5),                       # version
    (20, ">I", 8),                      # cluster_bits too small
    (20, ">I", 22),                     # cluster_bits too big
    (36, ">I", 0x7FFFFFFF),             # l1_size huge
    (56, ">I", 0x7FFFFFFF),             # refcount_table_clusters huge
    (48, ">Q", 0x10001),                # refcount table unaligned
    (40, ">Q", 12345),                  # L1 unaligned
    (60, ">I", 1000000),                # nb_snapshots huge
    (72, ">Q", 1 << 5),                 # unknown incompatible feature
    (72, ">Q", 1 << 31),
    (96, ">I", 7),                      # refcount_order too large
    (100, ">I", 80),                    # header_length too short
    (100, ">I", 1 << 20),               # header_length past the cluster
    (8, ">Q", 1 << 20),                 # backing file offset past the cluster
    (36, ">I", 0),                      # L1 too small for the size
])
def test_bad_header_fields_give_qemus_message(qemu_img, image, offset, fmt, value):
    poke(image, offset, fmt, value)
    expected = qemu_error(qemu_img, image)
    with pytest.raises(ImageOpenError) as err:
        open_image(image, "qcow2")
    assert str(err.value) == expected


def test_truncated_header(qemu_img, image):
    with open(image, "r+b") as f:
        f.truncate(50)
    expected = qemu_error(qemu_img, image)
    with pytest.raises(ImageOpenError) as err:
        open_image(image)
    assert str(err.value) == expected == f"Could not open '{image}': qcow2 header too short"


@pytest.mark.parametrize("offset", [40, 48])        # L1 table, refcount table
def test_tables_past_end_of_file(qemu_img, image, offset):
    """QEMU opens the image (zeros are read past the end of the file) and its
    check reports the damage; so do we, without reading a terabyte."""
    poke(image, offset, ">Q", 1 << 40)
    proc = run(qemu_img, "check", image, check=False)
    assert proc.returncode == 2
    with open_image(image) as drv:
        res = drv.check()
    assert res.messages == proc.stderr.splitlines()
    assert res.exit_code == proc.returncode


def test_snapshot_table_past_end_of_file(qemu_img, image):
    """QEMU reads zeros there; its check calls the entries incomplete."""
    poke(image, 60, ">I", 3)
    poke(image, 64, ">Q", 1 << 30)
    info = json.loads(run(qemu_img, "info", "--output=json", image).stdout)
    proc = run(qemu_img, "check", image, check=False)
    with open_image(image) as drv:
        assert [s.to_json() for s in drv.snapshots()] == info["snapshots"]
        res = drv.check()
    assert res.messages == proc.stderr.splitlines()
    assert res.exit_code == proc.returncode == 2


def test_write_onto_metadata_marks_corrupt_like_qemu(qemu_img, qemu_io, image, tmp_path):
    """An L2 entry pointing at the refcount block (transcript's corruption E)."""
    l1 = struct.unpack(">Q", open(image, "rb").read()[40:48])[0]
    with open(image, "rb") as f:
        f.seek(l1)
        l2 = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
    poke(image, l2 + 8, ">Q", 0x8000000000020000)
    twin = str(tmp_path / "twin.qcow2")
    with open(image, "rb") as a, open(twin, "wb") as b:
        b.write(a.read())
    warnings = []
    import imagetools.image as img
    old, img.warning_handler = img.warning_handler, warnings.append
    try:
        with open_image(image, "qcow2", read_only=False) as drv:
            with pytest.raises(ImageIOError, match="Input/output error"):
                drv.write(65536, b"\x77" * 4096)
    finally:
        img.warning_handler = old
    proc = run(qemu_io, "-f", "qcow2", "-c", "write -P 0x77 64k 4k", twin, check=False)
    assert warnings == [proc.stderr.strip()]
    ours = json.loads(run(qemu_img, "info", "--output=json", image).stdout)
    theirs = json.loads(run(qemu_img, "info", "--output=json", twin).stdout)
    assert ours["format-specific"] == theirs["format-specific"]
    assert ours["format-specific"]["data"]["corrupt"] is True
    with pytest.raises(ImageOpenError) as err:
        open_image(image, "qcow2", read_only=False)
    assert str(err.value).endswith("qcow2: Image is corrupt; cannot be opened read/write")
    with open_image(image, "qcow2") as drv:           # read-only still works
        drv.read(0, 65536)


def test_backing_loop_is_one_error(tmp_path):
    a, b = str(tmp_path / "a.qcow2"), str(tmp_path / "b.qcow2")
    create_image(a, "qcow2", 1 << 20, {"backing_file": "b.qcow2", "backing_fmt": "qcow2"},
                 unsafe=True)
    create_image(b, "qcow2", 1 << 20, {"backing_file": "a.qcow2", "backing_fmt": "qcow2"},
                 unsafe=True)
    with pytest.raises(ImageOpenError) as err:
        open_image(a)
    assert str(err.value) == f"Could not open '{a}': Backing file '{a}' creates an infinite loop."


def test_self_backing_is_a_loop(tmp_path):
    a = str(tmp_path / "self.qcow2")
    create_image(a, "qcow2", 1 << 20, {})
    with open_image(a, "qcow2", read_only=False) as drv:
        drv.header.backing_file = "self.qcow2"
        drv._write_header()
    with pytest.raises(ImageOpenError, match="infinite loop"):
        open_image(a)


def test_missing_backing_file_message_matches_qemu(qemu_img, tmp_path):
    top = str(tmp_path / "orphan.qcow2")
    run(qemu_img, "create", "-q", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2", top, "1M")
    proc = run(qemu_img, "map", top, check=False)
    with pytest.raises(ImageOpenError) as err:
        open_image(top)
    assert f"qemu-img: {err.value}\n" == proc.stderr


@pytest.mark.slow
def test_over_deep_chain_is_one_error(tmp_path):
    prev = None
    for i in range(MAX_BACKING_DEPTH + 2):
        path = str(tmp_path / f"l{i}.qcow2")
        opts = {"backing_file": prev, "backing_fmt": "qcow2"} if prev else {}
        create_image(path, "qcow2", 1 << 20, opts, unsafe=True)
        prev = f"l{i}.qcow2"
    with pytest.raises(ImageOpenError, match="deeper than"):
        open_image(path)
    ok = str(tmp_path / f"l{MAX_BACKING_DEPTH}.qcow2")
    with open_image(ok) as drv:
        assert len(list(drv.chain())) == MAX_BACKING_DEPTH + 1
        assert drv.read(0, 4096) == bytes(4096)


def test_bad_compressed_data_is_an_error(qemu_img, qemu_io, tmp_path):
    path = str(tmp_path / "c.qcow2")
    run(qemu_img, "create", "-q", "-f", "qcow2", path, "1M")
    io_cmds(qemu_io, path, "write -c -P 0x33 0 64k")
    l1 = struct.unpack(">Q", open(path, "rb").read()[40:48])[0]
    with open(path, "rb") as f:
        f.seek(l1)
        l2 = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        f.seek(l2)
        entry = struct.unpack(">Q", f.read(8))[0]
    coffset = entry & ((1 << 54) - 1)
    with open(path, "r+b") as f:
        f.seek(coffset)
        f.write(b"\xff" * 64)
    with open_image(path) as drv:
        with pytest.raises(ImageError, match="decompress"):
            drv.read(0, 4096)


def test_unaligned_data_cluster_is_signalled_like_qemu(qemu_img, qemu_io, image, tmp_path):
    l1 = struct.unpack(">Q", open(image, "rb").read()[40:48])[0]
    with open(image, "rb") as f:
        f.seek(l1)
        l2 = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
    poke(image, l2 + 8, ">Q", 0x8000000000060200)
    twin = str(tmp_path / "twin.qcow2")
    open(twin, "wb").write(open(image, "rb").read())
    import imagetools.image as img
    warnings = []
    old, img.warning_handler = img.warning_handler, warnings.append
    try:
        with open_image(image) as drv:                    # read-only: reported only
            with pytest.raises(ImageIOError, match="Input/output error"):
                list(drv.block_status())
        proc = run(qemu_img, "map", image, check=False)
        assert warnings[0] == proc.stderr.splitlines()[0]
        assert not json.loads(run(qemu_img, "info", "--output=json", image).stdout)[
            "format-specific"]["data"]["corrupt"]
        warnings.clear()
        with open_image(image, "qcow2", read_only=False) as drv:   # writable: marked
            with pytest.raises(ImageIOError):
                drv.read(65536, 4096)
        proc = run(qemu_io, "-f", "qcow2", "-c", "read 64k 4k", twin, check=False)
        assert warnings == [proc.stderr.strip()]
    finally:
        img.warning_handler = old
    assert json.loads(run(qemu_img, "info", "--output=json", image).stdout)[
        "format-specific"]["data"]["corrupt"]
