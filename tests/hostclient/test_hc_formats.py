"""Stopped-VM images: formats stated with --format, or guessed with care.

A guest owns every byte of a raw disk, so it can write a qcow2 header there
that names a host file as backing file (or data file). Guessing the format
from the content would then make the backup read that host file. quiesce
refuses a guessed format that names other files, warns about any guess that
is not raw, and copies exactly what ``--format`` says.
"""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from hostclient.backup import run_backup
from hostclient.cli import build_parser
from hostclient.config import BackupConfig, ImageSpec
from hostclient.errors import BackupError
from hc_helpers import read_at

pytestmark = pytest.mark.oracle

SECRET = b"host secret! " * 80


def run_cli(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hostclient", *argv], capture_output=True,
                          text=True, timeout=60, cwd=cwd)


@pytest.fixture
def secret(tmp_path) -> Path:
    path = tmp_path / "host-secret"
    path.write_bytes(SECRET.ljust(1 << 20, b"\0"))
    return path


def hostile_raw_disk(qemu_img: str, path: Path, *extra: str) -> Path:
    """A raw disk whose guest wrote a qcow2 header (made by qemu-img) into it."""
    header = path.with_suffix(".hdr")
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", *extra, str(header), "1M"],
                   check=True)
    data = header.read_bytes()
    header.unlink()
    path.write_bytes(data.ljust(4 << 20, b"\0"))
    return path


def test_a_guest_written_qcow2_header_cannot_make_the_backup_read_host_files(
        tmp_path, secret, qemu_img):
    disk = hostile_raw_disk(qemu_img, tmp_path / "vm.img", "-b", str(secret), "-F", "raw")
    # the reference would indeed read the secret through it
    assert read_at(qemu_img, disk, 0, len(SECRET)) == SECRET
    out = run_cli("backup", "--image", str(disk), str(tmp_path / "b"))
    assert out.returncode == 1, out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert (f"quiesce: {disk} looks like a qcow2 image, but its content names the backing file "
            f"'{secret}'") in out.stderr
    assert "--format raw" in out.stderr
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())
    # stated raw, the disk is copied as the bytes it is
    out = run_cli("backup", "--format", "raw", "--image", str(disk), "--json", str(tmp_path / "b"))
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout)
    assert m["warnings"] == [] and m["disks"][0]["source_format"] == "raw"
    assert m["disks"][0]["sha256"] == hashlib.sha256(disk.read_bytes()).hexdigest()
    copy = tmp_path / "b" / m["backup_id"] / m["disks"][0]["file"]
    assert SECRET[:64] not in _guest_bytes(qemu_img, copy)


def _guest_bytes(qemu_img: str, image: Path) -> bytes:
    raw = image.with_suffix(".check.raw")
    subprocess.run([qemu_img, "convert", "-O", "raw", str(image), str(raw)], check=True)
    try:
        return raw.read_bytes()
    finally:
        raw.unlink()


def test_a_guessed_data_file_is_refused(tmp_path, secret, qemu_img):
    disk = hostile_raw_disk(qemu_img, tmp_path / "vm.img", "-o", f"data_file={secret}")
    with pytest.raises(BackupError, match=f"names the data file '{secret}'"):
        run_backup(BackupConfig(target_dir=tmp_path / "b", images=(disk,)))


def test_a_guessed_format_with_references_of_another_kind_needs_format(tmp_path, qemu_img, secret):
    """A vmdk descriptor names extent files: guessed, it is not followed at all."""
    disk = tmp_path / "vm.img"
    disk.write_bytes((b'# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
                      b'createType="monolithicFlat"\n\nRW 2048 FLAT "' + str(secret).encode()
                      + b'" 0\n').ljust(1 << 20, b"\0"))
    info = json.loads(subprocess.run([qemu_img, "info", "--output=json", str(disk)],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["format"] == "vmdk"                                   # what a guess gives
    with pytest.raises(BackupError, match=r"looks like a vmdk image, but its format was guessed"):
        run_backup(BackupConfig(target_dir=tmp_path / "b", images=(disk,)))
    result = run_backup(BackupConfig(target_dir=tmp_path / "b", images=(ImageSpec(disk, "raw"),)))
    assert result.exit_code == 0
    assert result.manifest.disks[0].sha256 == hashlib.sha256(disk.read_bytes()).hexdigest()


def test_a_guess_other_than_raw_is_warned_about(tmp_path, qemu_img, capsys):
    image = tmp_path / "vm.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(image), "2M"], check=True)
    raw = tmp_path / "plain.raw"
    raw.write_bytes(b"\x01" * (1 << 20))
    result = run_backup(BackupConfig(target_dir=tmp_path / "b", images=(image, raw)))
    assert result.exit_code == 0
    assert [w.split(":")[0] for w in result.manifest.warnings] == [str(image)]
    assert "format qcow2 guessed from its content" in result.manifest.warnings[0]
    stated = run_backup(BackupConfig(target_dir=tmp_path / "b",
                                     images=(ImageSpec(image, "qcow2"), raw)))
    assert stated.exit_code == 0 and stated.manifest.warnings == []


def test_a_backing_chain_is_followed_only_as_far_as_formats_are_known(tmp_path, secret, qemu_img):
    """A stated qcow2 top may have a backing file; a backing file without a
    recorded format that looks like qcow2 and names a file of its own is not
    followed (it may be a raw base a guest once wrote)."""
    base = hostile_raw_disk(qemu_img, tmp_path / "base.img", "-b", str(secret), "-F", "raw")
    top = tmp_path / "top.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-u", "-b", str(base), "-F", "raw",
                    str(top), "4M"], check=True)
    forget_backing_format(top)            # as images made before backing formats were required
    assert "backing-filename-format" not in json.loads(subprocess.run(
        [qemu_img, "info", "--output=json", str(top)], capture_output=True, check=True).stdout)
    assert read_at(qemu_img, top, 0, len(SECRET)) == SECRET      # what a guess leads to
    with pytest.raises(BackupError, match=r"base\.img, the backing file of .*top\.qcow2, has no "
                                          r"format recorded.*rebase -u -F qcow2"):
        run_backup(BackupConfig(target_dir=tmp_path / "b", images=(ImageSpec(top, "qcow2"),)))
    # with the base's format recorded, the chain is read as stated
    subprocess.run([qemu_img, "rebase", "-q", "-u", "-b", str(base), "-F", "raw", str(top)],
                   check=True)
    result = run_backup(BackupConfig(target_dir=tmp_path / "b", images=(ImageSpec(top, "qcow2"),)))
    assert result.exit_code == 0 and result.manifest.warnings == []
    copy = result.directory / result.manifest.disks[0].file
    assert read_at(qemu_img, copy, 0, 16) == base.read_bytes()[:16]


def forget_backing_format(image: Path) -> None:
    """Turn the qcow2 backing-format header extension into an unknown one
    (which QEMU ignores): the image then has no backing format recorded."""
    with open(image, "r+b") as f:
        header = f.read(4096)
        offset = struct.unpack(">I", header[100:104])[0]          # header_length
        while offset + 8 <= len(header):
            magic, length = struct.unpack(">II", header[offset:offset + 8])
            if magic == 0:
                raise AssertionError("no backing format extension")
            if magic == 0xE2792ACA:
                f.seek(offset)
                f.write(struct.pack(">I", 0x7A7A7A7A))
                return
            offset += 8 + (length + 7) // 8 * 8


def test_format_applies_to_the_images_after_it():
    args = build_parser().parse_args(
        ["backup", "--image", "a", "--format", "raw", "--image", "b", "--image", "c",
         "--format", "qcow2", "--image", "d", "T"])
    assert args.image == [("a", None), ("b", "raw"), ("c", "raw"), ("d", "qcow2")]


def test_format_usage_errors(tmp_path):
    out = run_cli("backup", "--image", "a", "--format", "raw", str(tmp_path))
    assert out.returncode == 2 and "--format raw is followed by no --image" in out.stderr
    out = run_cli("backup", "--format", "raw", "--format", "qcow2", "--image", "a", str(tmp_path))
    assert out.returncode == 2 and "--format raw is followed by no --image" in out.stderr
    image = tmp_path / "a.raw"
    image.write_bytes(bytes(4096))
    out = run_cli("backup", "--format", "nosuch", "--image", str(image), str(tmp_path / "b"))
    assert out.returncode == 1
    assert out.stderr.startswith("quiesce: --format nosuch: not a format the image engine reads")


def test_a_guessed_backing_format_is_warned_about(tmp_path, qemu_img):
    base = tmp_path / "base.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(base), "2M"], check=True)
    top = tmp_path / "top.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2",
                    str(top)], check=True)
    forget_backing_format(top)
    result = run_backup(BackupConfig(target_dir=tmp_path / "b", images=(ImageSpec(top, "qcow2"),)))
    assert result.exit_code == 0
    assert result.manifest.warnings == [
        f"{base}: format qcow2 of this backing file guessed from its content (record it: "
        f"qemu-img rebase -u -F qcow2 -b {base} {top})"]
