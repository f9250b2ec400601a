"""QMP through qemu.qmp against a real (paused) QEMU: disks, snapshot, commit."""

from __future__ import annotations

import os
import subprocess

import pytest

from hostclient.errors import BackupError, BlockJobError, QmpCommandError, QmpUnavailable
from hc_helpers import hmp_write, read_at
from hostclient.qmp import Monitor, Overlay, choose_disks, commit_back, list_disks, nodes_using, \
    snapshot, top_node

pytestmark = pytest.mark.oracle


@pytest.fixture
def three_disks(paused_vm):
    a = paused_vm.image("a", "qcow2", "8M", b"A" * 4096)
    b = paused_vm.image("b", "raw", "4M")
    ro = paused_vm.image("ro", "qcow2", "4M")
    paused_vm.start([*paused_vm.blockdev("a", a, "qcow2", "disk-a"),
                     "-drive", f"file={b},format=raw,if=none,id=drive-b",
                     "-device", "virtio-blk-pci,drive=drive-b,id=disk-b",
                     "-drive", f"file={ro},format=qcow2,if=none,id=drive-ro,readonly=on",
                     "-device", "virtio-blk-pci,drive=drive-ro"])
    return paused_vm


def test_list_and_choose_disks(three_disks):
    with Monitor(three_disks.qmp) as mon:
        disks = {d.name: d for d in list_disks(mon)}
        assert set(disks) == {"disk-a", "disk-b", "drive-ro"}
        a, b = disks["disk-a"], disks["disk-b"]
        assert (a.node, a.device, a.format, a.virtual_size) == ("a", "", "qcow2", 8 << 20)
        assert (b.device, b.format, b.filename) == ("drive-b", "raw", str(three_disks.images["b"]))
        assert a.target == {"node-name": "a"} and b.target == {"device": "drive-b"}
        chosen, skipped = choose_disks(mon)
        assert [d.name for d in chosen] == ["disk-b", "disk-a"] or \
            sorted(d.name for d in chosen) == ["disk-a", "disk-b"]
        assert skipped == ["drive-ro: read-only"]
        assert [d.name for d in choose_disks(mon, ["a"])[0]] == ["disk-a"]
        assert [d.name for d in choose_disks(mon, ["drive-b", "disk-b"])[0]] == ["disk-b"]
        with pytest.raises(BackupError, match="no disk named 'nope'.*disk-a"):
            choose_disks(mon, ["nope"])
        with pytest.raises(BackupError, match="'drive-ro' cannot be backed up: read-only"):
            choose_disks(mon, ["drive-ro"])


def test_snapshot_then_commit_back_moves_new_writes_into_the_base(three_disks, qemu_img):
    vm = three_disks
    with Monitor(vm.qmp) as mon:
        chosen, _ = choose_disks(mon)
        overlays = [Overlay(d, str(vm.workdir / f"{d.name}.ovl.qcow2"), f"quiesce-t-{i}")
                    for i, d in enumerate(chosen)]
        snapshot(mon, overlays, timeout=10)
        for o in overlays:
            assert top_node(mon, o.disk) == o.node
            assert os.path.exists(o.path)
        # the guest keeps writing: into the overlay, the base stays as it was
        hmp_write(mon, "/machine/peripheral/disk-a/virtio-backend", 0x5A, 2 << 20, 65536)
        assert read_at(qemu_img, vm.images["a"], 2 << 20, 4) == b"\0\0\0\0"
        assert read_at(qemu_img, vm.images["a"], 1 << 20, 4) == b"AAAA"
        for i, o in enumerate(overlays):
            commit_back(mon, o, job_id=f"quiesce-commit-{i}", timeout=30)
            assert top_node(mon, o.disk) == o.disk.node
            assert nodes_using(mon, o.path) == []
    assert read_at(qemu_img, vm.images["a"], 2 << 20, 4) == b"\x5a" * 4
    assert read_at(qemu_img, vm.images["a"], 1 << 20, 4) == b"AAAA"


def test_failing_transaction_switches_no_disk(three_disks):
    vm = three_disks
    with Monitor(vm.qmp) as mon:
        chosen, _ = choose_disks(mon)
        overlays = [Overlay(chosen[0], str(vm.workdir / "ok.qcow2"), "quiesce-ok"),
                    Overlay(chosen[1], "/nonexistent-dir/x.qcow2", "quiesce-bad")]
        with pytest.raises(QmpCommandError) as err:
            snapshot(mon, overlays, timeout=10)
        assert err.value.command == "transaction" and err.value.error_class == "GenericError"
        for d in chosen:
            assert top_node(mon, d) == d.node


@pytest.fixture
def tiny_fs(tmp_path):
    """A 1 MiB tmpfs: a base image on it cannot take a commit of more data."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


@pytest.mark.root
def test_commit_that_cannot_write_the_base_fails_and_the_vm_stays_on_the_overlay(paused_vm, tiny_fs):
    vm = paused_vm
    base = tiny_fs / "a.qcow2"
    subprocess.run([vm.qemu_img, "create", "-q", "-f", "qcow2", str(base), "8M"], check=True)
    vm.start(vm.blockdev("a", base, "qcow2", "disk-a"))
    with Monitor(vm.qmp) as mon:
        disk = list_disks(mon)[0]
        overlay = Overlay(disk, str(vm.workdir / "a.ovl.qcow2"), "quiesce-ovl-a")
        snapshot(mon, [overlay], timeout=10)
        hmp_write(mon, disk.qdev, 0x33, 0, 4 << 20)           # more than the base's fs holds
        with pytest.raises(BlockJobError, match="commit job quiesce-commit-x failed: No space"):
            commit_back(mon, overlay, job_id="quiesce-commit-x", timeout=20)
        assert top_node(mon, disk) == "quiesce-ovl-a"          # still running on the overlay
        assert "quiesce-ovl-a" in nodes_using(mon, overlay.path)


def test_monitor_errors(three_disks, sockdir):
    with pytest.raises(QmpUnavailable, match="cannot connect"):
        Monitor(str(sockdir / "none.sock")).connect()
    with Monitor(three_disks.qmp) as mon:
        with pytest.raises(QmpCommandError) as err:
            mon.execute("no-such-command")
        assert err.value.error_class == "CommandNotFound"
        three_disks.stop()
        with pytest.raises(QmpUnavailable):
            mon.execute("query-status")
