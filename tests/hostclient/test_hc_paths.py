"""Image names as QEMU knows them, resolved on the host as QEMU resolved them.

QEMU keeps a relative ``-drive file=`` name as given, relative to its own
working directory; quiesce must back up (and put overlays next to) the file
QEMU has open, never a file of the same name in quiesce's working directory,
and must refuse when it cannot tell which file QEMU has open.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from hc_engine_double import QemuImgEngine
from hc_helpers import read_at
from hostclient.backup import run_backup
from hostclient.config import BackupConfig, Timeouts
from hostclient.errors import BackupError
from hostclient.qmp import Monitor, list_disks

pytestmark = pytest.mark.oracle

FAST = Timeouts(connect=2, ping=1, freeze=1, thaw=1, snapshot=5, commit=30, qmp=10)
RELATIVE_DRIVE = ["-drive", "file=a.qcow2,format=qcow2,if=none,id=drive-a",
                  "-device", "virtio-blk-pci,drive=drive-a,id=disk-a"]


def make_image(qemu_img: str, path: Path, fill: bytes) -> Path:
    raw = path.with_suffix(".raw")
    with open(raw, "wb") as f:
        f.truncate(8 << 20)
        f.seek(1 << 20)
        f.write(fill * 4096)
    subprocess.run([qemu_img, "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(path)],
                   check=True)
    raw.unlink()
    return path


@pytest.fixture
def elsewhere(tmp_path, monkeypatch, qemu_img) -> Path:
    """quiesce's working directory: not QEMU's, and holding a decoy a.qcow2."""
    where = tmp_path / "elsewhere"
    where.mkdir()
    make_image(qemu_img, where / "a.qcow2", b"D")
    monkeypatch.chdir(where)
    return where


def backup_config(vm, agent, target: Path, **kw) -> BackupConfig:
    return BackupConfig(target_dir=target, qmp=vm.qmp, agent=agent.path, timeouts=FAST, **kw)


def no_overlay_left(*dirs: Path) -> bool:
    return not [p for d in dirs for p in d.iterdir() if ".quiesce-" in p.name]


def test_relative_drive_is_read_from_qemus_working_directory(paused_vm, fake_agent, elsewhere,
                                                            qemu_img):
    make_image(qemu_img, paused_vm.workdir / "a.qcow2", b"A")
    paused_vm.start(RELATIVE_DRIVE, cwd=paused_vm.workdir)
    decoy_before = (elsewhere / "a.qcow2").read_bytes()
    with Monitor(paused_vm.qmp) as mon:
        [disk] = list_disks(mon)
    assert disk.filename == "a.qcow2"                          # QEMU's name, as given
    assert disk.path == str(paused_vm.workdir / "a.qcow2")     # the file QEMU has open
    result = run_backup(backup_config(paused_vm, fake_agent, Path("backups")))
    assert result.exit_code == 0, result.manifest.errors
    [record] = result.manifest.disks
    assert record.source == str(paused_vm.workdir / "a.qcow2")
    copy = elsewhere / result.directory / record.file
    assert read_at(qemu_img, copy, 1 << 20, 4) == b"AAAA"       # not the decoy's DDDD
    assert (elsewhere / "a.qcow2").read_bytes() == decoy_before
    assert no_overlay_left(paused_vm.workdir, elsewhere)
    with Monitor(paused_vm.qmp) as mon:
        assert [d.node for d in list_disks(mon)] == [disk.node]


def test_relative_overlay_dir_is_quiesces_not_qemus(paused_vm, fake_agent, elsewhere, qemu_img,
                                                   monkeypatch):
    """``--overlay-dir ovl`` means ovl in the user's directory; QEMU gets it absolute."""
    engine = QemuImgEngine(qemu_img).install(monkeypatch)
    make_image(qemu_img, paused_vm.workdir / "a.qcow2", b"A")
    paused_vm.start(RELATIVE_DRIVE, cwd=paused_vm.workdir)
    (elsewhere / "ovl").mkdir()
    seen: list[str] = []
    engine.during_copy = lambda source: seen.extend(p.name for p in (elsewhere / "ovl").iterdir())
    result = run_backup(backup_config(paused_vm, fake_agent, Path("backups"),
                                      overlay_dir=Path("ovl")))
    assert result.exit_code == 0, result.manifest.errors
    assert len(seen) == 1 and seen[0].startswith("a.qcow2.quiesce-")
    assert engine.copies == [str(paused_vm.workdir / "a.qcow2")]
    assert no_overlay_left(paused_vm.workdir, elsewhere, elsewhere / "ovl")


def test_a_renamed_image_is_refused_not_guessed(paused_vm, fake_agent, elsewhere, qemu_img):
    """QEMU's relative name no longer leads to the file it has open: refuse."""
    make_image(qemu_img, paused_vm.workdir / "a.qcow2", b"A")
    paused_vm.start(RELATIVE_DRIVE, cwd=paused_vm.workdir)
    os.rename(paused_vm.workdir / "a.qcow2", paused_vm.workdir / "moved.qcow2")
    make_image(qemu_img, paused_vm.workdir / "a.qcow2", b"X")
    with pytest.raises(BackupError, match=r"disk disk-a: QEMU names the image by the relative path "
                                          r"'a\.qcow2'.*start QEMU with absolute image paths"):
        run_backup(backup_config(paused_vm, fake_agent, elsewhere / "backups"))
    assert not (elsewhere / "backups").exists() or not any((elsewhere / "backups").iterdir())
    assert fake_agent.received == [] or "guest-fsfreeze-freeze" not in fake_agent.received
    assert no_overlay_left(paused_vm.workdir, elsewhere)


def test_an_absolute_name_that_is_no_longer_qemus_file_is_refused(paused_vm, fake_agent, elsewhere,
                                                                  qemu_img):
    image = make_image(qemu_img, paused_vm.workdir / "a.qcow2", b"A")
    paused_vm.start(paused_vm.blockdev("a", image, "qcow2", "disk-a"))
    os.rename(image, paused_vm.workdir / "moved.qcow2")
    make_image(qemu_img, image, b"X")
    with pytest.raises(BackupError, match=f"disk-a: {image} is not the file QEMU has open"):
        run_backup(backup_config(paused_vm, fake_agent, elsewhere / "backups"))
    assert "guest-fsfreeze-freeze" not in fake_agent.received


@pytest.mark.timeout(60)
def test_a_daemonized_qemu_with_relative_names_is_refused(qemu_system, fake_agent, elsewhere,
                                                          tmp_path, sockdir, qemu_img):
    """-daemonize moves QEMU to / after it opened its images: the relative
    name cannot be resolved with certainty any more."""
    vmdir = tmp_path / "vm"
    vmdir.mkdir()
    make_image(qemu_img, vmdir / "a.qcow2", b"A")
    qmp, pidfile = sockdir / "d.sock", tmp_path / "qemu.pid"
    subprocess.run([qemu_system, "-machine", "q35", "-accel", "tcg", "-S", "-nodefaults",
                    "-display", "none", "-qmp", f"unix:{qmp},server=on,wait=off",
                    *RELATIVE_DRIVE, "-daemonize", "-pidfile", str(pidfile)],
                   cwd=vmdir, check=True, timeout=30)
    pid = int(pidfile.read_text())
    try:
        assert os.readlink(f"/proc/{pid}/cwd") == "/"
        cfg = BackupConfig(target_dir=elsewhere / "backups", qmp=str(qmp), agent=fake_agent.path,
                           timeouts=FAST)
        with pytest.raises(BackupError, match=r"relative path 'a\.qcow2'.*working directory now "
                                              r"\(/\).*-daemonize"):
            run_backup(cfg)
        assert "guest-fsfreeze-freeze" not in fake_agent.received
    finally:
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.fixture
def vm_on_a_chain(paused_vm, qemu_img):
    """A running disk top.qcow2 on base.qcow2 (B at 1 MiB), and bas2.qcow2 (N)."""
    base = make_image(qemu_img, paused_vm.workdir / "base.qcow2", b"B")
    make_image(qemu_img, paused_vm.workdir / "bas2.qcow2", b"N")
    top = paused_vm.workdir / "top.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2",
                    str(top)], check=True)
    paused_vm.start(paused_vm.blockdev("t", top, "qcow2", "disk-t"))
    return paused_vm


def test_a_replaced_backing_file_is_refused(vm_on_a_chain, fake_agent, elsewhere):
    """The base was replaced on disk after QEMU opened it: the guest still
    reads the old one; a copy following the header would hold the new one."""
    work = vm_on_a_chain.workdir
    os.rename(work / "base.qcow2", work / "old-base.qcow2")
    os.rename(work / "bas2.qcow2", work / "base.qcow2")
    with pytest.raises(BackupError, match=r"disk disk-t's backing file: .*/base\.qcow2 is not the "
                                          r"file QEMU has open"):
        run_backup(backup_config(vm_on_a_chain, fake_agent, elsewhere / "backups"))
    assert "guest-fsfreeze-freeze" not in fake_agent.received


def test_a_backing_chain_qemu_does_not_read_is_refused(vm_on_a_chain, fake_agent, elsewhere):
    """The top's header was changed to name another base while QEMU runs on
    the first: the guest reads base.qcow2, the header leads to bas2.qcow2."""
    top = vm_on_a_chain.workdir / "top.qcow2"
    header = top.read_bytes()[:65536]
    at = header.index(str(vm_on_a_chain.workdir / "base.qcow2").encode())
    with open(top, "r+b") as f:
        f.seek(at)
        f.write(str(vm_on_a_chain.workdir / "bas2.qcow2").encode())
    with pytest.raises(BackupError, match=r"disk disk-t: QEMU reads it through the backing chain "
                                          r".*/base\.qcow2 \(qcow2\), but the image headers lead "
                                          r"to .*/bas2\.qcow2 \(qcow2\); .* refusing"):
        run_backup(backup_config(vm_on_a_chain, fake_agent, elsewhere / "backups"))
    assert "guest-fsfreeze-freeze" not in fake_agent.received


def test_a_relative_backing_chain_is_the_one_qemu_reads(paused_vm, fake_agent, elsewhere, qemu_img):
    make_image(qemu_img, paused_vm.workdir / "base.qcow2", b"B")
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                    "a.qcow2"], check=True, cwd=paused_vm.workdir)
    make_image(qemu_img, elsewhere / "base.qcow2", b"D")
    paused_vm.start(RELATIVE_DRIVE, cwd=paused_vm.workdir)
    result = run_backup(backup_config(paused_vm, fake_agent, Path("backups")))
    assert result.exit_code == 0, result.manifest.errors
    copy = elsewhere / result.directory / result.manifest.disks[0].file
    assert read_at(qemu_img, copy, 1 << 20, 4) == b"BBBB"


def test_recover_removes_the_overlay_qemu_used_not_a_namesake(paused_vm, elsewhere, qemu_img,
                                                              capsys):
    """An overlay QEMU knows by a relative name (as older quiesce versions made
    them): recover commits it and deletes that file, in QEMU's directory; a
    file of the same name in the user's directory is left alone."""
    from hostclient.cli import main
    make_image(qemu_img, paused_vm.workdir / "a.qcow2", b"A")
    paused_vm.start(RELATIVE_DRIVE, cwd=paused_vm.workdir)
    name = "a.qcow2.quiesce-old-0.qcow2"
    with Monitor(paused_vm.qmp) as mon:
        mon.execute("blockdev-snapshot-sync", {"device": "drive-a", "snapshot-file": name,
                                               "snapshot-node-name": "quiesce-old-0",
                                               "format": "qcow2"})
    assert (paused_vm.workdir / name).exists()
    (elsewhere / name).write_bytes(b"not an overlay: the user's file")
    assert main(["recover", "--qmp", paused_vm.qmp]) == 0
    assert "removed" in capsys.readouterr().err
    assert not (paused_vm.workdir / name).exists()
    assert (elsewhere / name).read_bytes() == b"not an overlay: the user's file"
    with Monitor(paused_vm.qmp) as mon:
        assert not list_disks(mon)[0].node.startswith("quiesce-")
