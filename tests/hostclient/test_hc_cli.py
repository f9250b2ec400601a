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
