"""``quiesce backup`` orchestration against a real QEMU (paused, disks attached)
and a scriptable fake agent: the normal flow and every failure path, each
leaving the VM on its own disks, thawed, with no overlay behind.

The copy goes through engine_double (qemu-img) so a test can make it fail
or act mid-copy; the real-guest tests in tests/e2e use the project's engine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hc_engine_double import QemuImgEngine
from hc_fake_agent import FakeAgent
from hostclient.backup import run_backup
from hostclient.config import BackupConfig, Timeouts
from hostclient.errors import BackupError, ConfigError
from hostclient.interrupt import CancelToken
from hostclient.manifest import read_manifest
from hostclient.qmp import Monitor, list_disks
from hc_helpers import hmp_write, read_at

pytestmark = pytest.mark.oracle

FAST = Timeouts(connect=2, ping=1, freeze=1, thaw=1, snapshot=5, commit=30, qmp=10)


@pytest.fixture
def engine(qemu_img, monkeypatch) -> QemuImgEngine:
    return QemuImgEngine(qemu_img).install(monkeypatch)


@pytest.fixture
def vm(paused_vm):
    a = paused_vm.image("a", "qcow2", "8M", b"A" * 4096)
    b = paused_vm.image("b", "raw", "4M", b"B" * 4096)
    paused_vm.start([*paused_vm.blockdev("a", a, "qcow2", "disk-a"),
                     "-drive", f"file={b},format=raw,if=none,id=drive-b",
                     "-device", "virtio-blk-pci,drive=drive-b,id=disk-b"])
    return paused_vm


def config(vm, agent: FakeAgent | None, target: Path, **kw) -> BackupConfig:
    kw.setdefault("timeouts", FAST)
    return BackupConfig(target_dir=target, qmp=vm.qmp, agent=agent.path if agent else None, **kw)


def assert_vm_clean(vm) -> None:
    """On its own nodes, no quiesce node or overlay file left, QEMU alive."""
    assert vm.proc.poll() is None
    with Monitor(vm.qmp) as mon:
        assert {d.name: d.node for d in list_disks(mon)}["disk-a"] == "a"
        nodes = [n["node-name"] for n in mon.execute("query-named-block-nodes", {"flat": True})]
        assert not [n for n in nodes if n.startswith("quiesce-")]
        assert mon.execute("query-block-jobs") == []
    leftovers = [p.name for p in vm.workdir.iterdir() if ".quiesce-" in p.name]
    assert leftovers == []


# ---------------------------------------------------------------- success


def test_backup_of_a_running_vm(vm, fake_agent, engine, tmp_path, qemu_img):
    target = tmp_path / "backups"

    def guest_writes(source: str) -> None:        # the guest keeps writing during the copy
        with Monitor(vm.qmp2) as mon:
            hmp_write(mon, "/machine/peripheral/disk-a/virtio-backend", 0x77, 1 << 20, 4096)

    engine.during_copy = guest_writes
    result = run_backup(config(vm, fake_agent, target))
    assert result.exit_code == 0, result.manifest.errors
    m = result.manifest
    assert m.status == "complete" and m.quiesced and m.consistency == "application"
    assert m.frozen_filesystems == 2 and m.errors == []
    assert 0 < m.freeze_window_ms < 1000
    assert fake_agent.received.count("guest-fsfreeze-freeze") == 1
    assert fake_agent.thaw_calls == 1 and not fake_agent.frozen
    assert fake_agent.frozen_seconds * 1000 <= m.freeze_window_ms + 1
    assert {d.name for d in m.disks} == {"disk-a", "disk-b"}
    on_disk = read_manifest(result.directory)
    assert on_disk.to_json() == m.to_json()
    raw = json.loads((result.directory / "manifest.json").read_text())
    for key in ("disks", "quiesced", "frozen_filesystems", "freeze_window_ms", "started",
                "finished", "errors", "format_version"):
        assert key in raw
    for d in m.disks:
        copy = result.directory / d.file
        assert subprocess.run([qemu_img, "check", str(copy)], capture_output=True).returncode == 0
        assert d.verified and len(d.sha256) == 64 and d.virtual_size in (8 << 20, 4 << 20)
    # the backup holds the content of the snapshot instant, the VM the new write
    a = result.directory / "disk-a.qcow2"
    assert read_at(qemu_img, a, 1 << 20, 4) == b"AAAA"
    assert read_at(qemu_img, vm.images["a"], 1 << 20, 4) == b"\x77" * 4
    assert read_at(qemu_img, result.directory / "disk-b.qcow2", 1 << 20, 4) == b"BBBB"
    assert_vm_clean(vm)


def test_only_chosen_disks_and_mountpoints(vm, fake_agent, engine, tmp_path):
    result = run_backup(config(vm, fake_agent, tmp_path, disks=("drive-b",),
                               mountpoints=("/data",)))
    assert result.exit_code == 0
    assert [d.name for d in result.manifest.disks] == ["disk-b"]
    assert "guest-fsfreeze-freeze-list" in fake_agent.received
    assert result.manifest.frozen_filesystems == 1
    assert engine.copies == [str(vm.images["b"])]
    assert_vm_clean(vm)


def test_zero_filesystems_frozen_is_not_quiesced(vm, fake_agent, engine, tmp_path):
    fake_agent.faults.freeze_count = 0
    result = run_backup(config(vm, fake_agent, tmp_path, on_agent_failure="crash-consistent"))
    assert result.exit_code == 0
    assert result.manifest.quiesced is False and result.manifest.frozen_filesystems == 0
    assert any("froze no filesystem" in w for w in result.manifest.warnings)


# ----------------------------------------------------------- agent faults


def test_agent_missing_fails_without_touching_the_vm(vm, engine, tmp_path, sockdir):
    cfg = BackupConfig(target_dir=tmp_path / "t", qmp=vm.qmp, agent=str(sockdir / "none.sock"),
                       timeouts=FAST)
    with pytest.raises(BackupError, match="guest agent unusable.*no guest agent socket"):
        run_backup(cfg)
    assert not (tmp_path / "t").exists() or not any((tmp_path / "t").iterdir())
    assert engine.copies == []
    assert_vm_clean(vm)


def test_agent_missing_crash_consistent_goes_on_and_records_it(vm, engine, tmp_path, sockdir):
    cfg = BackupConfig(target_dir=tmp_path, qmp=vm.qmp, agent=str(sockdir / "none.sock"),
                       on_agent_failure="crash-consistent", timeouts=FAST)
    result = run_backup(cfg)
    assert result.exit_code == 0
    m = result.manifest
    assert m.status == "complete" and not m.quiesced and m.consistency == "crash"
    assert m.freeze_window_ms is None and m.frozen_filesystems is None
    assert [(e.step, e.source) for e in m.errors] == [("connect", "agent")]
    assert len(m.disks) == 2
    assert_vm_clean(vm)


def test_no_agent_given_needs_crash_consistent(vm, tmp_path):
    with pytest.raises(ConfigError, match="no --agent"):
        BackupConfig(target_dir=tmp_path, qmp=vm.qmp)
    cfg = BackupConfig(target_dir=tmp_path, qmp=vm.qmp, on_agent_failure="crash-consistent")
    assert cfg.agent is None


def test_silent_agent(vm, fake_agent, engine, tmp_path):
    fake_agent.faults.silent = True
    started = time.monotonic()
    with pytest.raises(BackupError, match="did not answer guest-sync-delimited.*"
                                          r"\(the VM is prelaunch: its guest agent cannot answer"):
        run_backup(config(vm, fake_agent, tmp_path))
    assert time.monotonic() - started < 5
    result = run_backup(config(vm, fake_agent, tmp_path, on_agent_failure="crash-consistent"))
    assert result.exit_code == 0 and not result.manifest.quiesced
    assert result.manifest.errors[0].step == "connect"
    assert_vm_clean(vm)


def test_freeze_partly_failing_fails_and_thaws(vm, fake_agent, engine, tmp_path):
    fake_agent.faults.freeze_error = "failed to freeze /srv: Input/output error"
    result = run_backup(config(vm, fake_agent, tmp_path))
    assert result.exit_code == 1
    m = result.manifest
    assert m.status == "failed" and m.disks == [] and not m.quiesced
    assert m.errors[0].step == "freeze" and "failed to freeze /srv" in m.errors[0].message
    assert m.errors[0].error_class == "GenericError"
    assert fake_agent.thaw_calls == 1 and not fake_agent.frozen
    assert engine.copies == []
    assert list(result.directory.iterdir()) == [result.directory / "manifest.json"]
    assert_vm_clean(vm)


def test_freeze_partly_failing_crash_consistent(vm, fake_agent, engine, tmp_path):
    fake_agent.faults.freeze_error = "failed to freeze /srv: Input/output error"
    result = run_backup(config(vm, fake_agent, tmp_path, on_agent_failure="crash-consistent"))
    assert result.exit_code == 0
    assert result.manifest.consistency == "crash" and len(result.manifest.disks) == 2
    assert result.manifest.errors[0].step == "freeze"
    assert_vm_clean(vm)


def test_freeze_timeout_polls_status_and_thaws_a_late_freeze(vm, fake_agent, engine, tmp_path):
    fake_agent.faults.freeze_delay = 1.6               # freeze timeout is 1 s
    timeouts = Timeouts(connect=2, ping=1, freeze=1, thaw=3, snapshot=5, commit=30, qmp=10)
    result = run_backup(config(vm, fake_agent, tmp_path, timeouts=timeouts))
    assert result.exit_code == 1
    m = result.manifest
    assert m.errors[0].step == "freeze"
    assert "within 1 s" in m.errors[0].message and "'frozen'" in m.errors[0].message
    assert not fake_agent.frozen and fake_agent.thaw_calls >= 1
    assert_vm_clean(vm)


def test_thaw_failing_says_the_guest_may_be_frozen(vm, fake_agent, engine, tmp_path):
    fake_agent.faults.thaw_error = "fsfreeze hook has failed with status 1"
    result = run_backup(config(vm, fake_agent, tmp_path))
    assert result.exit_code == 4
    m = result.manifest
    assert [e.step for e in m.errors].count("thaw") >= 1
    assert any("guest-fsfreeze-thaw" in r for r in m.recovery)
    # the snapshot and the copies were fine: the backup is kept, the VM is on its disks
    assert m.status == "complete" and m.quiesced
    fake_agent.faults.thaw_error = None
    assert_vm_clean(vm)


# ----------------------------------------------------------- QMP / engine


def test_snapshot_failing_thaws_and_leaves_nothing(vm, fake_agent, engine, tmp_path):
    result = run_backup(config(vm, fake_agent, tmp_path / "t",
                               overlay_dir=tmp_path / "no-such-dir"))
    assert result.exit_code == 1
    m = result.manifest
    assert [e.step for e in m.errors] == ["snapshot"] and m.errors[0].source == "qmp"
    assert fake_agent.thaw_calls == 1 and not fake_agent.frozen
    assert m.freeze_window_ms is not None and m.quiesced
    assert engine.copies == [] and m.disks == []
    assert_vm_clean(vm)


def test_copy_failing_still_commits_back(vm, fake_agent, engine, tmp_path, qemu_img):
    engine.fail_copy = "Could not write to target: No space left on device"

    def guest_writes(source: str) -> None:
        with Monitor(vm.qmp2) as mon:
            hmp_write(mon, "/machine/peripheral/disk-a/virtio-backend", 0x42, 0, 65536)

    engine.during_copy = guest_writes
    result = run_backup(config(vm, fake_agent, tmp_path))
    assert result.exit_code == 1
    m = result.manifest
    assert m.status == "failed" and m.disks == []
    assert [(e.step, e.source) for e in m.errors] == [("copy", "engine")]
    assert not list(result.directory.glob("*.qcow2"))
    assert read_at(qemu_img, vm.images["a"], 0, 4) == b"\x42" * 4   # committed back
    assert_vm_clean(vm)


def test_a_bug_in_the_copy_still_commits_back_and_writes_the_manifest(vm, fake_agent, engine,
                                                                      tmp_path):
    engine.crash_copy = True
    result = run_backup(config(vm, fake_agent, tmp_path))
    assert result.exit_code == 1
    assert result.manifest.status == "failed"
    assert "internal error: RuntimeError: simulated bug" in result.manifest.errors[0].message
    assert read_manifest(result.directory).status == "failed"
    assert_vm_clean(vm)


@pytest.mark.root
def test_commit_failing_leaves_the_vm_on_the_overlay_then_recover(paused_vm, fake_agent, engine,
                                                                  tmp_path, qemu_img):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mnt)], check=True)
    try:
        base = mnt / "a.qcow2"
        subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(base), "8M"], check=True)
        paused_vm.start(paused_vm.blockdev("a", base, "qcow2", "disk-a"))

        def fill(source: str) -> None:
            with Monitor(paused_vm.qmp2) as mon:
                hmp_write(mon, "/machine/peripheral/disk-a/virtio-backend", 0x33, 0, 4 << 20)

        engine.during_copy = fill
        result = run_backup(config(paused_vm, fake_agent, tmp_path / "b",
                                   overlay_dir=tmp_path))
        assert result.exit_code == 3
        m = result.manifest
        assert m.status == "complete" and len(m.disks) == 1     # the backup itself is good
        assert [e.step for e in m.errors] == ["commit"]
        assert "quiesce recover" in m.recovery[0]
        with Monitor(paused_vm.qmp) as mon:
            assert list_disks(mon)[0].node.startswith("quiesce-")
        # fix the cause, then recover
        subprocess.run(["mount", "-o", "remount,size=64M", str(mnt)], check=True)
        from hostclient.cli import main
        assert main(["recover", "--qmp", paused_vm.qmp]) == 0
        with Monitor(paused_vm.qmp) as mon:
            assert list_disks(mon)[0].node == "a"
        assert not list(tmp_path.glob("*.quiesce-*"))
        assert read_at(qemu_img, base, 0, 4) == b"\x33" * 4
    finally:
        paused_vm.stop()
        subprocess.run(["umount", "-l", str(mnt)], check=True)


# ---------------------------------------------------------------- Ctrl-C


def test_interrupt_before_anything_happens(vm, fake_agent, engine, tmp_path):
    token = CancelToken()
    token.cancel()
    result = run_backup(config(vm, fake_agent, tmp_path / "t"), cancel=token)
    assert result.exit_code == 130 and result.manifest is None
    assert fake_agent.received == []
    assert_vm_clean(vm)


def test_interrupt_during_freeze_finishes_the_critical_section(vm, fake_agent, engine, tmp_path):
    token = CancelToken()
    fake_agent.faults.on_command = (
        lambda name: token.cancel() if name == "guest-fsfreeze-freeze" else None)
    result = run_backup(config(vm, fake_agent, tmp_path), cancel=token)
    assert result.exit_code == 130
    m = result.manifest
    assert m.status == "interrupted" and m.disks == [] and engine.copies == []
    assert fake_agent.thaw_calls == 1 and not fake_agent.frozen
    assert_vm_clean(vm)


def test_interrupt_during_copy_commits_back(vm, fake_agent, engine, tmp_path):
    token = CancelToken()
    engine.during_copy = lambda source: token.cancel()
    result = run_backup(config(vm, fake_agent, tmp_path), cancel=token)
    assert result.exit_code == 130
    assert result.manifest.status == "interrupted"
    assert not list(result.directory.glob("*.qcow2"))
    assert_vm_clean(vm)


def test_interrupt_during_commit_waits_for_it(vm, fake_agent, engine, tmp_path, monkeypatch):
    import hostclient.backup as backup
    token = CancelToken()
    real_commit = backup.commit_back

    def commit_and_press_ctrl_c(*args, **kw):
        token.cancel()
        return real_commit(*args, **kw)

    monkeypatch.setattr(backup, "commit_back", commit_and_press_ctrl_c)
    result = run_backup(config(vm, fake_agent, tmp_path), cancel=token)
    assert result.exit_code == 0 and result.manifest.status == "complete"
    assert_vm_clean(vm)


def test_interrupt_during_verify(vm, fake_agent, engine, tmp_path, monkeypatch):
    import hostclient.backup as backup
    token = CancelToken()
    real_verify = engine.verify_copy

    def verify_then_ctrl_c(*args):
        real_verify(*args)
        token.cancel()

    monkeypatch.setattr(backup, "verify_copy", verify_then_ctrl_c)
    result = run_backup(config(vm, fake_agent, tmp_path), cancel=token)
    assert result.exit_code == 130 and result.manifest.status == "interrupted"
    assert not list(result.directory.glob("*.qcow2"))
    assert_vm_clean(vm)


def test_interrupt_during_a_stopped_vm_copy(paused_vm, engine, tmp_path):
    a = paused_vm.image("a", "qcow2", "8M", b"A" * 4096)
    token = CancelToken()
    engine.during_copy = lambda source: token.cancel()
    result = run_backup(BackupConfig(target_dir=tmp_path / "t", images=(a,)), cancel=token)
    assert result.exit_code == 130 and result.manifest.status == "interrupted"
    assert not list(result.directory.glob("*.qcow2"))


@pytest.mark.timeout(60)
def test_real_sigint_to_the_cli_during_freeze(vm, fake_agent, tmp_path):
    """A real Ctrl-C (SIGINT) to a `quiesce backup` process while the guest is frozen."""
    proc_box: list[subprocess.Popen] = []

    def on_command(name: str) -> None:
        if name == "guest-fsfreeze-freeze" and proc_box:
            os.kill(proc_box[0].pid, signal.SIGINT)
            time.sleep(0.2)                         # the signal lands mid-freeze

    fake_agent.faults.on_command = on_command
    proc = subprocess.Popen([sys.executable, "-m", "hostclient", "backup", "--qmp", vm.qmp,
                             "--agent", fake_agent.path, str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc_box.append(proc)
    out, err = proc.communicate(timeout=50)
    assert proc.returncode == 130, err
    assert "stopping at the next safe point" in err
    assert fake_agent.thaw_calls == 1 and not fake_agent.frozen
    manifest = json.loads((Path(out.strip()) / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    assert_vm_clean(vm)


# ---------------------------------------------------------------- stopped


def test_stopped_vm_backup(paused_vm, engine, tmp_path, qemu_img):
    a = paused_vm.image("a", "qcow2", "8M", b"A" * 4096)
    b = paused_vm.image("b", "raw", "4M", b"B" * 4096)
    result = run_backup(BackupConfig(target_dir=tmp_path / "t", images=(a, b)))
    assert result.exit_code == 0
    m = result.manifest
    assert m.mode == "stopped" and m.consistency == "offline" and m.freeze_window_ms is None
    assert [(d.name, d.source_format) for d in m.disks] == [("a", "qcow2"), ("b", "raw")]
    assert read_at(qemu_img, result.directory / "b.qcow2", 1 << 20, 4) == b"BBBB"


def test_stopped_vm_refuses_an_image_a_running_qemu_holds(paused_vm, engine, tmp_path):
    a = paused_vm.image("a", "qcow2", "8M")
    paused_vm.start(paused_vm.blockdev("a", a, "qcow2", "disk-a"))
    with pytest.raises(BackupError, match="in use by a running QEMU"):
        run_backup(BackupConfig(target_dir=tmp_path / "t", images=(a,)))
    assert not (tmp_path / "t").exists() or not any((tmp_path / "t").iterdir())


def test_config_errors():
    with pytest.raises(ConfigError, match="either --qmp"):
        BackupConfig(target_dir=Path("/x"), qmp="q", images=(Path("a"),))
    with pytest.raises(ConfigError, match="say which VM"):
        BackupConfig(target_dir=Path("/x"))
    with pytest.raises(ConfigError, match="--agent, --disk and --mountpoint are for a running VM"):
        BackupConfig(target_dir=Path("/x"), images=(Path("a"),), disks=("x",))
    with pytest.raises(ConfigError, match="timeout must be a positive"):
        Timeouts(freeze=0)


def test_overlay_name_taken_leaves_no_backup_directory(vm, fake_agent, engine, tmp_path,
                                                       monkeypatch):
    """Overlay planning fails after the backup directory was made: nothing was
    done, so nothing is left (no directory `quiesce list` would call unfinished)."""
    import hostclient.backup as backup
    from hostclient.restore import list_backups
    from hostclient.config import ListConfig
    real_new_dir = backup.new_backup_dir
    taken: list[Path] = []

    def new_dir_and_take_the_overlay_name(target):
        backup_id, directory = real_new_dir(target)
        taken.append(vm.workdir / f"a.qcow2.quiesce-{backup_id}-0.qcow2")
        taken[-1].write_bytes(b"someone else's file")
        return backup_id, directory

    monkeypatch.setattr(backup, "new_backup_dir", new_dir_and_take_the_overlay_name)
    target = tmp_path / "t"
    with pytest.raises(BackupError, match=r"overlay .*quiesce-.* already exists"):
        run_backup(config(vm, fake_agent, target, disks=("disk-a",)))
    assert list(target.iterdir()) == []
    assert list_backups(ListConfig(target)) == []
    assert "guest-fsfreeze-freeze" not in fake_agent.received
    assert taken[0].read_bytes() == b"someone else's file"
    taken[0].unlink()
    assert_vm_clean(vm)
