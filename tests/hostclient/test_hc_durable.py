"""Backups and restored disks are on disk before anyone is told they are.

The engine copies without flushing (qemu-img's -t unsafe). Each copied image
(and its directory entry) must be fsynced before it is verified and before
the manifest calls the backup complete; a restored disk before it is renamed
into place. Judged twice: by recording the calls in-process, and by strace
watching a real `quiesce` process.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import hostclient.backup as backup
import hostclient.restore as restore
from hostclient.backup import run_backup
from hostclient.config import BackupConfig, ImageSpec, RestoreConfig


def make_raw(path: Path, fill: bytes) -> Path:
    with open(path, "wb") as f:
        f.truncate(4 << 20)
        f.seek(1 << 20)
        f.write(fill * 65536)
    return path


@pytest.fixture
def events(monkeypatch) -> list[tuple[str, str]]:
    """Every fsync (with the path of the file synced), verify, manifest write
    and rename, in order."""
    seen: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        seen.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst, **kw) -> None:
        real_replace(src, dst, **kw)
        seen.append(("rename", str(dst)))

    def wrap(module, name: str, label: str, arg: int) -> None:
        real = getattr(module, name)

        def call(*args, **kw):
            seen.append((label, str(Path(args[arg]).resolve())))
            return real(*args, **kw)
        monkeypatch.setattr(module, name, call)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    wrap(backup, "verify_copy", "verify", 2)
    wrap(backup, "write_manifest", "manifest", 0)
    wrap(restore, "content_sha256", "checksum", 0)
    return seen


def test_each_copy_is_synced_before_it_is_verified_and_before_the_manifest(tmp_path, events):
    images = (make_raw(tmp_path / "a.raw", b"a"), make_raw(tmp_path / "b.raw", b"b"))
    result = run_backup(BackupConfig(target_dir=tmp_path / "t",
                                     images=tuple(ImageSpec(i, "raw") for i in images)))
    assert result.exit_code == 0
    where = str(result.directory.resolve())
    manifest = events.index(("manifest", where))
    for name in ("a", "b"):
        copy = f"{where}/{name}.qcow2"
        verify = events.index(("verify", copy))
        synced = events.index(("fsync", copy))
        assert synced < verify < manifest
        assert ("fsync", where) in events[synced:verify]           # its directory entry
    after = events[manifest:]
    assert ("fsync", f"{where}/.manifest.json.tmp") in after
    assert after.index(("rename", f"{where}/manifest.json")) < after.index(("fsync", where))
    assert ("fsync", str((tmp_path / "t").resolve())) in after      # the backup's own entry


def test_a_restored_disk_is_synced_and_checked_before_it_replaces_the_target(tmp_path, events):
    image = make_raw(tmp_path / "a.raw", b"a")
    done = run_backup(BackupConfig(target_dir=tmp_path / "t", images=(ImageSpec(image, "raw"),)))
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "a.raw").write_bytes(b"old disk")
    events.clear()
    restore.restore(RestoreConfig(done.directory, dest, "raw", force=True))
    target = str((dest / "a.raw").resolve())
    renamed = events.index(("rename", target))
    temp = [p for kind, p in events[:renamed] if kind == "fsync" and ".quiesce-restore-" in p]
    assert len(temp) == 1 and Path(temp[0]).parent == dest.resolve()
    assert events.index(("fsync", temp[0])) < events.index(("checksum", temp[0])) < renamed
    assert ("fsync", str(dest.resolve())) in events[renamed:]
    assert not [p for p in dest.iterdir() if p.name != "a.raw"]


@pytest.mark.timeout(120)
@pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed (Debian package strace)")
def test_strace_sees_the_image_fsynced_before_it_is_reopened_and_before_the_manifest(tmp_path):
    image = make_raw(tmp_path / "disk.raw", b"z")
    trace = tmp_path / "trace"
    out = subprocess.run(["strace", "-f", "-y", "-qq", "-o", str(trace), "-e",
                          "trace=openat,fsync,fdatasync,rename,renameat,renameat2",
                          sys.executable, "-m", "hostclient", "backup", "--format", "raw",
                          "--image", str(image), str(tmp_path / "t")],
                         capture_output=True, text=True, timeout=100)
    assert out.returncode == 0, out.stderr
    where = Path(out.stdout.strip()).resolve()
    copy = f"{where}/disk.qcow2"
    lines = trace.read_text().splitlines()

    def first(pattern: str) -> int:
        for i, line in enumerate(lines):
            if re.search(pattern, line):
                return i
        raise AssertionError(f"strace saw no {pattern!r}")

    created = first(rf'openat\(.*"{re.escape(copy)}".*O_CREAT')
    synced = first(rf'fsync\(\d+<{re.escape(copy)}>\)')
    dir_synced = first(rf'fsync\(\d+<{re.escape(str(where))}>\)')
    manifest = first(r'openat\(.*\.manifest\.json\.tmp".*O_CREAT')
    read_only = [i for i, line in enumerate(lines)
                 if re.search(rf'openat\(.*"{re.escape(copy)}", O_RDONLY', line)]
    # copied, synced (file, then directory), only then reopened to be verified
    assert created < synced < dir_synced < manifest
    fd = re.search(r"fsync\((\d+)<", lines[synced]).group(1)
    own_open = max(i for i in read_only if i < synced and lines[i].endswith(f"= {fd}<{copy}>"))
    assert [i for i in read_only if i < synced] == [own_open]       # the fsync's own open
    assert [i for i in read_only if dir_synced < i < manifest]      # the verification
