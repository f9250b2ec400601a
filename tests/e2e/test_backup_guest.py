"""Issue 6's real proof: `quiesce backup` of a real guest under write load.

The guest runs the agent (the project's qga, and qemu-ga as the reference),
an ext4 data disk on qcow2 and a writer (temporary name, fsync, rename, with
checksums). The backup must pass qemu-img check and e2fsck -fn, every
complete file in it must match its checksum, and the guest must keep running
on its original image with no overlay left.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from guest import AGENTS
from e2e_proof import run_proof

pytestmark = [pytest.mark.qemu, pytest.mark.slow, pytest.mark.oracle]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("agent_name", AGENTS)
def test_backup_of_a_real_guest_under_write_load(agent_name, guest_image, tmp_path,
                                                 qemu_system, qemu_img):
    report = run_proof(tmp_path, agent=agent_name, disk_size="64M", image=guest_image,
                       qemu=qemu_system, qemu_img=qemu_img)
    m = report.manifest
    assert m["status"] == "complete" and m["errors"] == []
    assert m["quiesced"] is True and m["consistency"] == "application"
    assert m["frozen_filesystems"] == 1
    assert 0 < m["freeze_window_ms"] < 5000
    assert report.fs.files_verified >= 5 and report.fs.bad_files == []
    assert report.files_after > report.files_before
    for line in report.checks:
        print(line)


@pytest.mark.timeout(180)
def test_no_agent_in_the_guest(guest_image, ext4_qcow2, tmp_path, qemu_system):
    """Agent silent (not running in the guest): the default refuses quickly and
    leaves the guest as it was; crash-consistent goes on and says so."""
    import json
    import time

    from e2e_proof import quiesce
    from guest import DataDisk, GuestSpec, boot_guest, raw_qmp

    spec = GuestSpec(agent=None, disks=(DataDisk(ext4_qcow2),), writer_dir="/data/w")
    with boot_guest(spec, qemu=qemu_system, image=guest_image) as guest:
        guest.wait_writer(2)
        started = time.monotonic()
        out = quiesce("backup", "--qmp", str(guest.qmp_socket), "--agent", str(guest.agent_socket),
                      "--freeze-timeout", "5", str(tmp_path / "b"))
        assert out.returncode == 1
        assert time.monotonic() - started < 30
        assert "did not answer guest-sync-delimited" in out.stderr
        assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())
        top = raw_qmp(guest.qmp_socket, [{"execute": "query-block"}])[0]["return"]
        assert [b["inserted"]["node-name"] for b in top if b.get("inserted")] == ["data0"]
        out = quiesce("backup", "--qmp", str(guest.qmp_socket), "--agent", str(guest.agent_socket),
                      "--on-agent-failure", "crash-consistent", "--json", str(tmp_path / "c"))
        assert out.returncode == 0, out.stderr
        m = json.loads(out.stdout)
        assert m["quiesced"] is False and m["consistency"] == "crash"
        assert m["errors"][0]["step"] == "connect"
        guest.wait_writer(guest.writer_progress() + 2)


@pytest.mark.timeout(180)
def test_ctrl_c_during_the_copy_of_a_real_guest(guest_image, tmp_path, qemu_system, qemu_img):
    """SIGINT while the engine copies: the overlay is committed back, the guest
    keeps running on its image, exit 130, no images kept."""
    import json
    import signal
    import subprocess
    import sys
    import time

    from guest import DataDisk, GuestSpec, boot_guest, make_ext4_qcow2, raw_qmp

    disk = make_ext4_qcow2(tmp_path / "big.qcow2", "1G", qemu_img)
    spec = GuestSpec(agent="qemu-ga", disks=(DataDisk(disk),), writer_dir="/data/w")
    with boot_guest(spec, qemu=qemu_system, image=guest_image) as guest:
        guest.wait_writer(3)
        proc = subprocess.Popen([sys.executable, "-m", "hostclient", "backup", "--qmp",
                                 str(guest.qmp_socket), "--agent", str(guest.agent_socket),
                                 "--no-progress", str(tmp_path / "b")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not list((tmp_path / "b").glob("*/*.qcow2")):     # the copy has started
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, err
        manifest = json.loads((Path(out.strip()) / "manifest.json").read_text())
        assert manifest["status"] == "interrupted" and manifest["disks"] == []
        assert not list(Path(out.strip()).glob("*.qcow2"))
        top = raw_qmp(guest.qmp_socket, [{"execute": "query-block"}])[0]["return"]
        assert [b["inserted"]["node-name"] for b in top if b.get("inserted")] == ["data0"]
        assert not list(tmp_path.glob("*.quiesce-*"))
        guest.wait_writer(guest.writer_progress() + 2)


HOOK = """#!/bin/sh
# fsfreeze hook for the test: fails on demand, like an application that
# refuses to quiesce (freeze) or to resume (thaw)
case "$1" in
    freeze) [ -e /run/guest/fail-freeze ] && exit 1 ;;
    thaw) [ -e /run/guest/fail-thaw ] && exit 1 ;;
esac
exit 0
"""


@pytest.mark.timeout(240)
@pytest.mark.parametrize("agent_name", AGENTS)
def test_freeze_and_thaw_failing_in_a_real_guest(agent_name, guest_image, ext4_qcow2, tmp_path,
                                                 qemu_system):
    """The guest's fsfreeze hook refuses the freeze, then the thaw."""
    import json

    from e2e_proof import quiesce
    from guest import DataDisk, GuestSpec, boot_guest, raw_qmp

    hook = tmp_path / "fsfreeze-hook"
    hook.write_text(HOOK)
    hook.chmod(0o755)
    spec = GuestSpec(agent=agent_name, agent_args=(f"-F{hook}",), disks=(DataDisk(ext4_qcow2),),
                     writer_dir="/data/w")

    def backup(*extra: str) -> tuple[int, dict | None, str]:
        out = quiesce("backup", "--qmp", str(guest.qmp_socket), "--agent", str(guest.agent_socket),
                      "--json", *extra, str(tmp_path / "b"))
        return out.returncode, json.loads(out.stdout) if out.stdout.strip() else None, out.stderr

    def assert_guest_fine() -> None:
        top = raw_qmp(guest.qmp_socket, [{"execute": "query-block"}])[0]["return"]
        assert [b["inserted"]["node-name"] for b in top if b.get("inserted")] == ["data0"]
        assert not list(ext4_qcow2.parent.glob("*.quiesce-*"))
        guest.wait_writer(guest.writer_progress() + 2, timeout=30)     # not frozen

    with boot_guest(spec, qemu=qemu_system, image=guest_image) as guest:
        guest.wait_writer(2)
        guest.run("touch /run/guest/fail-freeze", check=True)
        code, m, err = backup()
        assert code == 1, err
        assert m["status"] == "failed" and not m["quiesced"] and m["disks"] == []
        assert m["errors"][0]["step"] == "freeze"
        assert "hook has failed with status 1" in m["errors"][0]["message"]
        assert_guest_fine()

        code, m, err = backup("--on-agent-failure", "crash-consistent")
        assert code == 0, err
        assert m["consistency"] == "crash" and len(m["disks"]) == 1
        assert_guest_fine()

        guest.run("rm /run/guest/fail-freeze; touch /run/guest/fail-thaw", check=True)
        code, m, err = backup()
        # the agent thaws the filesystems before running the thaw hook: the
        # backup is consistent, the hook's failure is recorded, the guest runs
        assert code == 0, err
        assert m["quiesced"] and m["status"] == "complete"
        assert [e["step"] for e in m["errors"]] == ["thaw"]
        assert "hook has failed" in m["errors"][0]["message"]
        assert_guest_fine()


@pytest.mark.timeout(180)
def test_a_guest_disk_qemu_names_by_a_relative_path(guest_image, tmp_path, qemu_system, qemu_img):
    """QEMU started in the VM's directory with `file=data.qcow2`; quiesce run
    from another directory that holds a data.qcow2 of its own. The backup is
    the guest's disk (its writer's files are in it), the namesake is untouched,
    and the overlay lived and died next to the guest's image."""
    import hashlib
    import json

    from e2e_proof import quiesce
    from guest import DataDisk, GuestSpec, boot_guest, make_ext4_qcow2, raw_qmp, \
        verify_ext4_backup

    vmdir, user = tmp_path / "vm", tmp_path / "user"
    vmdir.mkdir()
    user.mkdir()
    make_ext4_qcow2(vmdir / "data.qcow2", "64M", qemu_img)
    namesake = make_ext4_qcow2(user / "data.qcow2", "64M", qemu_img)
    namesake_sum = hashlib.sha256(namesake.read_bytes()).hexdigest()
    spec = GuestSpec(agent="qemu-ga", disks=(DataDisk(Path("data.qcow2")),), writer_dir="/data/w",
                     qemu_cwd=vmdir)
    with boot_guest(spec, qemu=qemu_system, image=guest_image) as guest:
        guest.wait_writer(5)
        out = quiesce("backup", "--qmp", str(guest.qmp_socket), "--agent", str(guest.agent_socket),
                      "--json", "--no-progress", "backups", cwd=user)
        assert out.returncode == 0, out.stderr
        m = json.loads(out.stdout)
        assert m["quiesced"] and m["disks"][0]["source"] == str(vmdir / "data.qcow2")
        top = raw_qmp(guest.qmp_socket, [{"execute": "query-block"}])[0]["return"]
        assert [(b["inserted"]["node-name"], b["inserted"]["file"])
                for b in top if b.get("inserted")] == [("data0", "data.qcow2")]
        assert not [p for d in (vmdir, user) for p in d.iterdir() if ".quiesce-" in p.name]
        guest.wait_writer(guest.writer_progress() + 2)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    fs = verify_ext4_backup(user / "backups" / m["backup_id"] / m["disks"][0]["file"], "/w",
                            scratch, qemu_img)
    assert fs.files_verified >= 5 and fs.bad_files == []
    assert hashlib.sha256(namesake.read_bytes()).hexdigest() == namesake_sum
