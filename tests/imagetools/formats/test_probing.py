"""Format probing names every format qemu-img 7.2 knows, as qemu-img does."""

from __future__ import annotations

import json
import struct
import zlib

import pytest
from fmt_helpers import run

from imagetools.errors import ImageError, ImageOpenError
from imagetools.formats import driver, magic, probe
from imagetools.image import create_image, open_image, read_probe_header

pytestmark = pytest.mark.oracle

CREATABLE = ["raw", "qcow2", "qcow", "qed", "vdi", "vmdk", "vpc", "vhdx", "parallels"]


def make_bochs(path) -> None:
    """A tiny valid Bochs 'growing' redolog image (64 KiB, nothing allocated)."""
    header = bytearray(512)
    header[0:22] = b"Bochs Virtual HD Image"
    header[32:39] = b"Redolog"
    header[48:55] = b"Growing"
    struct.pack_into("<IIIIII", header, 64, 0x00020000, 512, 8, 2, 8192, 0)
    struct.pack_into("<Q", header, 88, 65536)
    path.write_bytes(bytes(header) + b"\xff" * 32)


def make_cloop(path) -> None:
    """A tiny valid cloop V2.0 image: one 64 KiB block of zeros."""
    preamble = (b"#!/bin/sh\n#V2.0 Format\n"
                b"modprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\nexit $?\n")
    block = zlib.compress(bytes(65536))
    start = 128 + 8 + 16
    path.write_bytes(preamble.ljust(128, b"\0") + struct.pack(">II", 65536, 1)
                     + struct.pack(">QQ", start, start + len(block)) + block)


def qemu_format(qemu_img: str, path: str) -> str:
    proc = run(qemu_img, "info", "--output=json", path)
    return json.loads(proc.stdout)["format"]


@pytest.fixture(scope="module")
def luks_image(qemu_img, tmp_path_factory):
    """A LUKS1 header with eight inactive key slots (qemu-img info opens it).

    Made by hand: qemu-img create -f luks spends seconds on its PBKDF.
    """
    hdr = bytearray(592)
    hdr[0:8] = b"LUKS\xba\xbe\x00\x01"
    hdr[8:11] = b"aes"
    hdr[40:51] = b"xts-plain64"
    hdr[72:78] = b"sha256"
    struct.pack_into(">II", hdr, 104, 4096, 64)          # payload offset, key bytes
    struct.pack_into(">I", hdr, 164, 1000)               # master key digest iterations
    hdr[168:204] = b"12345678-1234-1234-1234-123456789abc"
    for i in range(8):
        struct.pack_into(">II", hdr, 208 + 48 * i, 0x0000DEAD, 0)
        struct.pack_into(">II", hdr, 208 + 48 * i + 40, 8 + 512 * i, 4000)
    path = tmp_path_factory.mktemp("luks") / "img.luks"
    with open(path, "wb") as f:
        f.write(hdr)
        f.truncate(4096 * 512 + (1 << 20))
    assert qemu_format(qemu_img, str(path)) == "luks"
    return str(path)


@pytest.mark.parametrize("fmt", CREATABLE + ["luks"])
def test_probe_agrees_with_qemu_img(qemu_img, tmp_path, fmt, request):
    if fmt == "luks":
        path = request.getfixturevalue("luks_image")
        expected = "luks"
    else:
        path = str(tmp_path / f"img.{fmt}")
        run(qemu_img, "create", "-f", fmt, path, "1M")
        expected = qemu_format(qemu_img, path)
    assert expected == fmt
    assert read_probe_header(path)[0] == fmt


@pytest.mark.parametrize("maker,fmt", [(make_bochs, "bochs"), (make_cloop, "cloop")])
def test_probe_read_only_formats(qemu_img, tmp_path, maker, fmt):
    path = tmp_path / f"img.{fmt}"
    maker(path)
    assert qemu_format(qemu_img, str(path)) == fmt
    assert read_probe_header(str(path))[0] == fmt


def test_dmg_is_probed_by_name(qemu_img, tmp_path):
    path = tmp_path / "disk.dmg"
    path.write_bytes(bytes(4096))
    proc = run(qemu_img, "info", str(path), check=False)
    assert "UDIF trailer in dmg file" in proc.stderr     # qemu-img chose the dmg driver
    assert read_probe_header(str(path))[0] == "dmg"
    assert magic.probe_format(bytes(2048), "disk.img") == "raw"


def test_fixed_vpc_is_raw_for_qemu_too(qemu_img, tmp_path):
    path = str(tmp_path / "fixed.vhd")
    run(qemu_img, "create", "-f", "vpc", "-o", "subformat=fixed", path, "1M")
    assert qemu_format(qemu_img, path) == "raw"
    assert read_probe_header(path)[0] == "raw"


@pytest.mark.parametrize("text,expected", [
    (b"# Disk DescriptorFile\nversion=1\nCID=fffffffe\n", "vmdk"),
    (b"\n", "raw"),
    (b"   \r\n# c\nversion=3\r\n", "vmdk"),
    (b"version=4\n", "raw"),
    (b"x version=1\n", "raw"),
])
def test_vmdk_text_descriptor(qemu_img, tmp_path, text, expected):
    path = tmp_path / "desc.vmdk"
    path.write_bytes(text)
    assert read_probe_header(str(path))[0] == expected
    proc = run(qemu_img, "info", "--output=json", str(path), check=False)
    if proc.returncode == 0:
        assert json.loads(proc.stdout)["format"] == expected
    else:
        assert expected == "vmdk"


def _probe_only_formats() -> list[str]:
    """Formats qimg recognises but cannot open (others get real drivers over time)."""
    return [f for f in ("qcow", "vdi", "vmdk", "vhdx", "vpc", "qed", "parallels", "luks")
            if not driver(f).can_open]


def _make(qemu_img: str, fmt: str, path: str, request) -> str:
    if fmt == "luks":
        return request.getfixturevalue("luks_image")
    run(qemu_img, "create", "-f", fmt, path, "1M")
    return path


@pytest.mark.parametrize("fmt", _probe_only_formats())
def test_unsupported_format_is_one_clear_error(qemu_img, tmp_path, fmt, request):
    path = _make(qemu_img, fmt, str(tmp_path / f"img.{fmt}"), request)
    for given in (None, fmt):
        with pytest.raises(ImageOpenError) as err:
            open_image(path, given)
        assert str(err.value) == (f"Could not open '{path}': The '{fmt}' image format is not "
                                  "supported by qimg yet")
    with pytest.raises(ImageError, match="not supported by qimg yet"):
        create_image(str(tmp_path / "new"), fmt, 1 << 20, {})


def test_unknown_driver(tmp_path):
    path = tmp_path / "x.raw"
    path.write_bytes(bytes(512))
    with pytest.raises(ImageOpenError) as err:
        open_image(str(path), "foo")
    assert str(err.value) == f"Could not open '{path}': Unknown driver 'foo'"
    with pytest.raises(ImageError) as err:
        create_image(str(path), "foo", 512, {})
    assert str(err.value) == "Unknown file format 'foo'"


def test_empty_file_is_raw_and_short_files_are_padded(tmp_path):
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert read_probe_header(str(empty))[0] == "raw"
    short = tmp_path / "short"
    short.write_bytes(b"QFI\xfb\x00\x00\x00\x03")     # truncated qcow2 still probes as qcow2
    assert read_probe_header(str(short))[0] == "qcow2"
    assert probe(b"QFI\xfb\x00\x00\x00\x01" + bytes(2040), "x") == "qcow"


def test_every_driver_module_is_discoverable():
    from imagetools.formats import drivers
    names = set(drivers())
    assert {"raw", "qcow2"} <= names
    assert set(magic.FOREIGN_FORMATS) <= names
    for name in names:
        assert driver(name).format_name == name
