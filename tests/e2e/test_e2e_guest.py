"""The test guest itself: it boots, runs an agent, a writer and commands."""

from __future__ import annotations

import pytest

from guest import DataDisk, GuestSpec, boot_guest, raw_agent_sync, raw_qmp

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


@pytest.mark.timeout(180)
def test_guest_boots_with_real_qemu_ga_and_writer(guest_image, ext4_qcow2, qemu_system):
    spec = GuestSpec(agent="qemu-ga", disks=(DataDisk(ext4_qcow2),), writer_dir="/data/w")
    with boot_guest(spec, qemu=qemu_system, image=guest_image) as guest:
        assert guest.boot_seconds < 60
        assert raw_agent_sync(guest.agent_socket, 5.0)
        mounts = guest.run("cat /proc/mounts", check=True).output
        assert " /data ext4 " in mounts
        assert guest.run("exit 3").rc == 3
        assert guest.wait_writer(3) >= 3
        nodes = raw_qmp(guest.qmp_socket, [{"execute": "query-named-block-nodes"}])[0]["return"]
        assert {"data0", "data0-file"} <= {n["node-name"] for n in nodes}
        pid = guest.process.pid
    # teardown really stopped QEMU
    assert guest.process.poll() is not None, f"QEMU {pid} outlived the fixture"
