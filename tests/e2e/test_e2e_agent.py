"""The agent client against an agent running in a real guest (qemu-ga and qga):
freeze really stops the guest's writes to its data disk, thaw lets them go on."""

from __future__ import annotations

import time

import pytest

from guest import AGENTS, DataDisk, GuestSpec, boot_guest
from hostclient.agentclient import AgentClient, AgentTimeouts
from hostclient.errors import AgentCommandError

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("agent_name", AGENTS)
def test_freeze_thaw_in_a_real_guest(agent_name, guest_image, ext4_qcow2, qemu_system):
    spec = GuestSpec(agent=agent_name, disks=(DataDisk(ext4_qcow2),), writer_dir="/data/w",
                     writer_args=("--pause", "0.02"))
    with boot_guest(spec, qemu=qemu_system, image=guest_image) as guest:
        guest.wait_writer(3)
        timeouts = AgentTimeouts(freeze=30, thaw=30)
        with AgentClient(str(guest.agent_socket), timeouts) as agent:
            agent.ping()
            assert agent.info().supports("guest-fsfreeze-freeze")
            assert agent.fsfreeze_status() == "thawed"
            started = time.monotonic()
            assert agent.fsfreeze_freeze() == 1            # only the ext4 data disk
            freeze_ms = (time.monotonic() - started) * 1000
            try:
                assert agent.fsfreeze_status() == "frozen"
                with pytest.raises(AgentCommandError, match="frozen state"):
                    agent.execute("guest-get-osinfo")
                before = guest.writer_progress()
                time.sleep(1.0)
                assert guest.writer_progress() <= before + 1   # blocked on the frozen fs
            finally:
                assert agent.fsfreeze_thaw() == 1
            assert agent.fsfreeze_status() == "thawed"
            after = guest.writer_progress()
            guest.wait_writer(after + 3, timeout=30)
            assert agent.fsfreeze_freeze(["/data"]) == 1
            assert agent.fsfreeze_thaw() == 1
            assert agent.fsfreeze_freeze(["/nowhere"]) == 0
            assert agent.fsfreeze_status() == "thawed"
        print(f"{agent_name}: boot {guest.boot_seconds:.1f} s, freeze {freeze_ms:.0f} ms")


@pytest.mark.timeout(240)
def test_client_survives_an_agent_restart(guest_image, ext4_qcow2, qemu_system):
    spec = GuestSpec(agent="qemu-ga", disks=(DataDisk(ext4_qcow2),))
    with boot_guest(spec, qemu=qemu_system, image=guest_image) as guest:
        with AgentClient(str(guest.agent_socket), AgentTimeouts(sync=3, ping=3)) as agent:
            agent.ping()
            guest.run("kill $(cat /run/guest/agent.pid)", check=True)
            guest.run("sh /run/guest/agent.sh > /run/guest/agent.log 2>&1 &"
                      " echo $! > /run/guest/agent.pid", check=True)
            deadline = time.monotonic() + 30
            while True:
                try:
                    agent.sync()
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
            agent.ping()
            assert agent.fsfreeze_status() == "thawed"
