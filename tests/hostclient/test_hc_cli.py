"""The ``quiesce`` command line: agent, list, verify, restore, usage errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hc_engine_double import QemuImgEngine
from hostclient.backup import run_backup
from hostclient.cli import main
from hostclient.config import BackupConfig


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hostclient", *argv], capture_output=True,
                          text=True, timeout=60)


# ----------------------------------------------------------------- agent


@pytest.mark.oracle
def test_agent_command_prints_the_answer(host_qemu_ga):
    out = run_cli("agent", host_qemu_ga, "guest-ping")
    assert (out.returncode, out.stdout, out.stderr) == (0, '{"return": {}}\n', "")
    out = run_cli("agent", host_qemu_ga, "guest-sync", '{"id": 1234}')
    assert json.loads(out.stdout) == {"return": 1234}
    out = run_cli("agent", "--pretty", host_qemu_ga, "guest-info")
    assert json.loads(out.stdout)["return"]["version"].startswith("7.2")
    assert out.stdout.startswith("{\n")


@pytest.mark.oracle
def test_agent_command_errors_are_one_line(host_qemu_ga, sockdir):
    out = run_cli("agent", host_qemu_ga, "guest-nothing")
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr == ("quiesce: guest-nothing: The command guest-nothing has not been found "
                          "(CommandNotFound)\n")
    out = run_cli("agent", host_qemu_ga, "guest-sync", "{id: 1}")
    assert out.returncode == 2 and out.stderr.startswith("quiesce agent: JSON-ARGS is not valid JSON")
    out = run_cli("agent", host_qemu_ga, "guest-sync", "[1]")
    assert out.returncode == 2 and "must be a JSON object" in out.stderr
    out = run_cli("agent", str(sockdir / "missing.sock"), "guest-ping")
    assert out.returncode == 1
    assert out.stderr == f"quiesce: no guest agent socket at {sockdir}/missing.sock\n"


def test_backup_usage_errors_are_one_line(tmp_path):
    out = run_cli("backup", str(tmp_path))
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "say which VM" in out.stderr
    out = run_cli("backup", "--qmp", "/x", "--freeze-timeout", "0", str(tmp_path))
    assert out.returncode == 2 and "must be more than 0 seconds" in out.stderr
    out = run_cli("backup", "--qmp", str(tmp_path / "none.sock"), "--on-agent-failure",
                  "crash-consistent", str(tmp_path))
    assert out.returncode == 1 and out.stderr.startswith("quiesce: cannot connect to QMP socket")
    assert "Traceback" not in out.stderr


# ------------------------------------------------ list, verify, restore


@pytest.fixture
def backups(paused_vm, qemu_img, tmp_path, monkeypatch):
    """A target directory with one complete and one failed stopped-VM backup."""
    engine = QemuImgEngine(qemu_img).install(monkeypatch)
    a = paused_vm.image("a", "qcow2", "8M", b"A" * 4096)
    b = paused_vm.image("b", "raw", "4M", b"B" * 4096)
    target = tmp_path / "target"
    good = run_backup(BackupConfig(target_dir=target, images=(a, b)))
    engine.fail_copy = "disk full"
    bad = run_backup(BackupConfig(target_dir=target, images=(a,)))
    engine.fail_copy = None
    assert (good.exit_code, bad.exit_code) == (0, 1)
    return target, good.directory, bad.directory, engine


def test_list(backups, capsys):
    target, good, bad, _ = backups
    (target / "half-made").mkdir()
    assert main(["list", str(target)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["BACKUP", "STATUS", "CONSISTENCY"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows[good.name][1:4] == ["complete", "offline", "2"]
    assert rows[bad.name][1:4] == ["failed", "offline", "0"]
    assert rows["half-made"][1] == "unfinished"
    assert main(["list", "--json", str(target)]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["status"] for r in listed if r["backup_id"] == good.name] == ["complete"]


def test_verify_finds_a_changed_image(backups, capsys, qemu_img):
    _, good, bad, _ = backups
    assert main(["verify", str(good)]) == 0
    assert capsys.readouterr().out.splitlines() == ["a: ok", "b: ok", f"backup {good.name}: ok"]
    # change one byte of guest data in the copy of b: its checksum no longer matches
    raw = good / "b.raw.tmp"
    subprocess.run([qemu_img, "convert", "-O", "raw", str(good / "b.qcow2"), str(raw)], check=True)
    with open(raw, "r+b") as f:
        f.seek(1 << 20)
        f.write(b"C")
    subprocess.run([qemu_img, "convert", "-O", "qcow2", str(raw), str(good / "b.qcow2")], check=True)
    raw.unlink()
    assert main(["verify", "--json", str(good)]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    assert [d["ok"] for d in report["disks"]] == [True, False]
    assert "sha256" in report["disks"][1]["problem"]
    assert main(["verify", str(bad)]) == 1
    assert "is failed; it holds no images" in capsys.readouterr().err


def test_restore_raw_and_qcow2(backups, tmp_path, qemu_img, capsys):
    _, good, _, _ = backups
    dest = tmp_path / "restored"
    assert main(["restore", "-O", "raw", str(good), str(dest)]) == 0
    assert capsys.readouterr().out.split() == [str(dest / "a.raw"), str(dest / "b.raw")]
    with open(dest / "b.raw", "rb") as f:
        f.seek(1 << 20)
        assert f.read(4) == b"BBBB"
    assert main(["restore", str(good), str(dest)]) == 0           # qcow2: new names, fine
    assert main(["restore", "--disk", "a", "-O", "raw", str(good), str(dest)]) == 1
    assert "exists; pass --force" in capsys.readouterr().err
    assert main(["restore", "--disk", "a", "--force", "-O", "raw", str(good), str(dest)]) == 0
    assert main(["restore", "--disk", "zzz", str(good), str(dest)]) == 1
    assert "no disk 'zzz'" in capsys.readouterr().err


def test_restore_force_onto_the_backup_itself_is_refused(backups, capsys):
    _, good, _, _ = backups
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    assert main(["restore", "--force", str(good), str(good)]) == 1
    assert capsys.readouterr().err == (f"quiesce: {good}/a.qcow2 is a file of the backup itself; "
                                       "restore to another directory\n")
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert main(["verify", str(good)]) == 0


def test_a_failed_restore_leaves_the_existing_disk_alone(backups, tmp_path, capsys, monkeypatch):
    import hostclient.restore as restore
    _, good, _, engine = backups
    dest = tmp_path / "vm"
    dest.mkdir()
    (dest / "a.raw").write_bytes(b"the disk in use")
    (dest / "b.raw").write_bytes(b"the other disk")
    monkeypatch.setattr(restore, "content_sha256", lambda path, fmt, check=None: "0" * 64)
    assert main(["restore", "--force", "-O", "raw", str(good), str(dest)]) == 1
    assert "restored a does not match the backup's checksum" in capsys.readouterr().err
    assert (dest / "a.raw").read_bytes() == b"the disk in use"
    assert (dest / "b.raw").read_bytes() == b"the other disk"
    assert sorted(p.name for p in dest.iterdir()) == ["a.raw", "b.raw"]     # no temporary left


def test_an_interrupted_restore_leaves_the_existing_disk_alone(backups, tmp_path):
    from hostclient.config import RestoreConfig
    from hostclient.errors import Interrupted
    from hostclient.interrupt import CancelToken
    from hostclient.restore import restore
    _, good, _, engine = backups
    dest = tmp_path / "vm"
    dest.mkdir()
    (dest / "a.raw").write_bytes(b"the disk in use")
    token = CancelToken()
    engine.during_copy = lambda source: token.cancel()
    with pytest.raises(Interrupted):
        restore(RestoreConfig(good, dest, "raw", force=True), token)
    assert sorted(p.name for p in dest.iterdir()) == ["a.raw"]
    assert (dest / "a.raw").read_bytes() == b"the disk in use"


def test_restore_refuses_a_backup_image_that_names_another_file(backups, tmp_path, qemu_img,
                                                                 capsys):
    """A backup image is self-contained; one edited to name a backing file
    (here: a host file) is not followed by restore or verify."""
    _, good, _, _ = backups
    secret = tmp_path / "secret"
    secret.write_bytes(b"s" * (8 << 20))
    subprocess.run([qemu_img, "rebase", "-q", "-u", "-b", str(secret), "-F", "raw",
                    str(good / "a.qcow2")], check=True)
    assert main(["restore", "--disk", "a", "-O", "raw", str(good), str(tmp_path / "r")]) == 1
    assert f"names another file ('{secret}')" in capsys.readouterr().err
    assert not (tmp_path / "r" / "a.raw").exists()
    assert main(["verify", str(good)]) == 1
    assert "a: FAILED" in capsys.readouterr().out
