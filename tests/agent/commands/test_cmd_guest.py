"""The machine-changing commands for real, inside a QEMU guest (tests/e2e/guest.py).

For each agent, qemu-ga and then ours, one guest is booted and told to take
a CPU offline and back, set root's password, set the clock and the RTC,
trim its data disk, suspend to RAM (woken over QMP) and finally power
itself off. What the guest shows afterwards must be what was asked, and
both agents must leave the same traces; their read-only answers about the
guest's hardware must be identical.
"""

from __future__ import annotations

import base64
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "e2e"))

from guest import DataDisk, GuestSpec, boot_guest, make_ext4_qcow2, raw_qmp  # noqa: E402
from guest_build import GuestUnavailable, ensure_guest_image  # noqa: E402

from qga_helpers import AgentClient  # noqa: E402

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

CRYPTED = "$6$qgatest$0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ01234567"
HARDWARE = ("guest-get-vcpus", "guest-get-disks", "guest-get-memory-block-info",
            "guest-get-memory-blocks", "guest-get-osinfo", "guest-get-users")


@pytest.fixture(scope="module")
def guest_image(qemu_system):
    try:
        return ensure_guest_image()
    except GuestUnavailable as exc:
        pytest.skip(f"test guest unavailable: {exc}")


def wait_status(guest, wanted: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        status = raw_qmp(guest.qmp_socket, [{"execute": "query-status"}])[-1]["return"]["status"]
        if status == wanted:
            return
        assert time.monotonic() < deadline, f"guest still {status}, not {wanted}"
        time.sleep(0.1)


def exercise(guest, agent: AgentClient) -> dict:
    """Every change, checked from inside the guest; returns what to compare."""
    seen = {name: agent.request(name) for name in HARDWARE}
    seen["guest-get-fsinfo"] = [{k: v for k, v in fs.items() if not k.endswith("-bytes")}
                                for fs in agent.request("guest-get-fsinfo")["return"]]

    # a CPU offline and back
    assert agent.request("guest-set-vcpus", vcpus=[{"logical-id": 1, "online": False}]) == \
        {"return": 1}
    assert guest.run("cat /sys/devices/system/cpu/cpu1/online", check=True).output.strip() == "0"
    assert {"logical-id": 1, "online": False, "can-offline": True} in \
        agent.request("guest-get-vcpus")["return"]
    assert agent.request("guest-set-vcpus", vcpus=[{"logical-id": 1, "online": True}]) == \
        {"return": 1}
    assert guest.run("cat /sys/devices/system/cpu/cpu1/online", check=True).output.strip() == "1"

    # root's password, already crypted, then raw (checked with crypt in the guest)
    assert agent.request("guest-set-user-password", username="root",
                         password=base64.b64encode(CRYPTED.encode()).decode(),
                         crypted=True) == {"return": {}}
    shadow = guest.run("grep '^root:' /etc/shadow", check=True).output
    assert shadow.split(":")[1] == CRYPTED
    assert agent.request("guest-set-user-password", username="root",
                         password=base64.b64encode(b"s3cret pass").decode(),
                         crypted=False) == {"return": {}}
    check = guest.run("python3 -W ignore -c \"import crypt; h=open('/etc/shadow').read()"
                      ".split('root:')[1].split(':')[0]; print(crypt.crypt('s3cret pass', h) == h)\"",
                      check=True)
    assert check.output.strip() == "True"
    seen["password-errors"] = [agent.request("guest-set-user-password", username=user,
                                             password="eA==", crypted=False)
                               for user in ("no-such-user", "a:b")]

    # the clock: set (and written to the RTC), then read back from the RTC
    target = int(time.time()) + 3 * 86400
    assert agent.request("guest-set-time", time=target * 10**9) == {"return": {}}
    guest_now = int(guest.run("date +%s", check=True).output)
    assert abs(guest_now - target) < 30
    assert agent.request("guest-set-time", time=int(time.time() * 1e9)) == {"return": {}}
    guest.run("date -s @1000000000", check=True)  # the system clock wrong again...
    assert agent.request("guest-set-time") == {"return": {}}  # ...until read from the RTC
    assert abs(int(guest.run("date +%s", check=True).output) - time.time()) < 30

    # trim: the data disk only (9p, overlay and tmpfs are not local filesystems)
    guest.run("dd if=/dev/urandom of=/data/x bs=1M count=4 && sync && rm /data/x && sync",
              check=True, timeout=60)
    seen["fstrim-too-large"] = agent.request("guest-fstrim", minimum=1 << 40)
    assert seen["fstrim-too-large"] == {"return": {"paths": [
        {"path": "/data", "error": "failed to trim: Invalid argument"}]}}
    paths = agent.request("guest-fstrim")["return"]["paths"]
    assert [p["path"] for p in paths] == ["/data"]
    assert "error" not in paths[0] and paths[0]["trimmed"] > 0
    seen["fstrim-keys"] = sorted(paths[0])

    # suspend to RAM: no answer; the guest sleeps until QMP wakes it
    agent.send({"execute": "guest-suspend-ram"})
    wait_status(guest, "suspended")
    raw_qmp(guest.qmp_socket, [{"execute": "system_wakeup"}])
    wait_status(guest, "running")
    agent.sock.settimeout(60)
    assert agent.request("guest-sync", id=77) == {"return": 77}  # nothing came before it

    # power off: no answer either; QEMU (-no-reboot) exits when the guest is down
    agent.send({"execute": "guest-shutdown"})
    guest.process.wait(timeout=60)
    agent.sock.settimeout(5)
    assert agent.sock.recv(4096) == b""  # the VM went away without a reply
    return seen


@pytest.mark.timeout(600)
def test_machine_changes_in_a_real_guest(guest_image, qemu_system, qemu_img, tmp_path):
    seen = {}
    for name in ("qemu-ga", "qga"):
        image = make_ext4_qcow2(tmp_path / f"{name}.qcow2", "64M", qemu_img)
        spec = GuestSpec(agent=name, smp=2, disks=(DataDisk(image),))
        with boot_guest(spec, qemu=qemu_system, image=guest_image) as guest:
            agent = AgentClient(str(guest.agent_socket), timeout=30)
            try:
                seen[name] = exercise(guest, agent)
            finally:
                agent.close()
    assert seen["qga"] == seen["qemu-ga"]
