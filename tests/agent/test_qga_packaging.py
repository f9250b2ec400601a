"""conf/ and packaging/: the sample configuration, the fsfreeze hook and its
per-application directory, the systemd unit and the udev rule."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
PACKAGING = ROOT / "packaging"
QGA = [sys.executable, "-m", "agent"]


def dump(command, conf: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "QGA_CONF": str(conf)}
    return subprocess.run([*command, "-D"], capture_output=True, env=env, timeout=30)


@pytest.mark.oracle
def test_sample_conf_reads_the_same_in_qga_and_qemu_ga(qemu_ga):
    ours = dump(QGA, CONF / "qemu-ga.conf")
    ref = dump([qemu_ga], CONF / "qemu-ga.conf")
    assert (ours.returncode, ours.stdout, ours.stderr) == (ref.returncode, ref.stdout, ref.stderr)
    assert ours.stdout.startswith(b"[general]\ndaemon=false\nmethod=virtio-serial\n")


@pytest.mark.oracle
def test_qga_only_keys_are_read_by_qga_and_ignored_by_qemu_ga(qemu_ga, tmp_path):
    text = (CONF / "qemu-ga.conf").read_text()
    for key in ("fsfreeze-hook-timeout", "fsfreeze-hook-log", "fsfreeze-watchdog"):
        text = text.replace(f"#{key}=", f"{key}=")
    conf = tmp_path / "qga.conf"
    conf.write_text(text)
    ours, ref = dump(QGA, conf), dump([qemu_ga], conf)
    assert ref.returncode == 0 and ours.returncode == 0
    assert ours.stdout == ref.stdout + (b"fsfreeze-hook-timeout=60\nfsfreeze-hook-log=true\n"
                                        b"fsfreeze-watchdog=300\n")


# ---------------------------------------------------------------- the hook

@pytest.fixture
def hook_dir(tmp_path):
    directory = tmp_path / "fsfreeze-hook.d"
    directory.mkdir()
    trace = tmp_path / "trace"

    def script(name: str, fail_on: str = "", executable: bool = True) -> None:
        path = directory / name
        path.write_text(f'#!/bin/sh\necho "{name} $1" >> {trace}\n'
                        f'[ "$1" = "{fail_on}" ] && exit 7\nexit 0\n')
        path.chmod(0o755 if executable else 0o644)

    return directory, trace, script


def run_hook(directory: Path, action: str, log: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "FSFREEZE_HOOK_DIR": str(directory), "FSFREEZE_HOOK_LOG": str(log)}
    return subprocess.run([str(CONF / "fsfreeze-hook"), action], capture_output=True, env=env,
                          timeout=30)


def test_hook_runs_scripts_in_order_and_skips_samples(hook_dir, tmp_path):
    directory, trace, script = hook_dir
    for name in ("10-a", "20-b", "30-c.sample", "40-d~", "50-e.dpkg-old", "60-f.disabled"):
        script(name)
    script("70-not-executable", executable=False)
    log = tmp_path / "hook.log"
    assert run_hook(directory, "freeze", log).returncode == 0
    assert run_hook(directory, "thaw", log).returncode == 0
    assert trace.read_text() == "10-a freeze\n20-b freeze\n20-b thaw\n10-a thaw\n"
    assert "execute" in log.read_text() and "finished with status=0" in log.read_text()


def test_failed_freeze_thaws_what_was_frozen_and_fails(hook_dir, tmp_path):
    directory, trace, script = hook_dir
    script("10-a")
    script("20-b", fail_on="freeze")
    script("30-c")
    result = run_hook(directory, "freeze", tmp_path / "hook.log")
    assert result.returncode == 7
    assert trace.read_text() == "10-a freeze\n20-b freeze\n10-a thaw\n"
    assert b"freeze failed in" in result.stdout


def test_thaw_runs_every_script_and_reports_a_failure(hook_dir, tmp_path):
    directory, trace, script = hook_dir
    script("10-a")
    script("20-b", fail_on="thaw")
    result = run_hook(directory, "thaw", tmp_path / "hook.log")
    assert result.returncode == 7
    assert trace.read_text() == "20-b thaw\n10-a thaw\n"


def test_hook_without_directory_or_with_bad_argument(tmp_path):
    assert run_hook(tmp_path / "missing", "freeze", tmp_path / "log").returncode == 0
    assert run_hook(tmp_path, "bogus", tmp_path / "log").returncode == 2


def test_hook_survives_an_unwritable_log(hook_dir):
    directory, trace, script = hook_dir
    script("10-a")
    assert run_hook(directory, "freeze", Path("/nonexistent/dir/log")).returncode == 0
    assert trace.read_text() == "10-a freeze\n"


@pytest.mark.parametrize("sample", sorted((CONF / "fsfreeze-hook.d").glob("*.sample")),
                         ids=lambda p: p.name)
def test_samples_are_valid_shell_and_harmless_without_their_database(sample, tmp_path):
    if shutil.which("sh") is None:
        pytest.skip("no sh")
    assert subprocess.run(["sh", "-n", str(sample)]).returncode == 0
    env = {"PATH": str(tmp_path), "HOME": str(tmp_path)}        # no mysql/psql on PATH
    for action in ("freeze", "thaw"):
        assert subprocess.run(["/bin/sh", str(sample), action], env=env, timeout=30).returncode == 0


# ---------------------------------------------------------------- systemd, udev

def test_systemd_unit():
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str
    unit.read(PACKAGING / "qga.service")
    device = r"dev-virtio\x2dports-org.qemu.guest_agent.0.device"
    assert unit["Unit"]["BindsTo"] == device and unit["Unit"]["After"] == device
    assert unit["Service"]["Type"] == "notify"
    assert unit["Service"]["Restart"] == "on-failure"
    assert unit["Service"]["ExecStart"] == "/usr/bin/qga"
    analyze = shutil.which("systemd-analyze")
    if analyze:
        result = subprocess.run([analyze, "verify", "--man=no", str(PACKAGING / "qga.service")],
                                capture_output=True, text=True, timeout=60)
        problems = [line for line in result.stderr.splitlines()
                    if "qga.service" in line and "/usr/bin/qga" not in line
                    and "dev-virtio" not in line]
        assert not problems, result.stderr


def test_udev_rule_wants_the_unit():
    rule = " ".join((PACKAGING / "60-qga.rules").read_text().replace("\\\n", " ").split())
    assert 'SUBSYSTEM=="virtio-ports"' in rule
    assert 'ATTR{name}=="org.qemu.guest_agent.0"' in rule
    assert 'TAG+="systemd"' in rule and 'ENV{SYSTEMD_WANTS}+="qga.service"' in rule
