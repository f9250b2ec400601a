"""qga on a real virtio-serial port, in a QEMU guest (tests/e2e's guest).

What only a real port shows: with no host attached the port reads EOF at
once, so the agent must wait without spinning; the host may come back at
any time and must find the agent in sync, even if it left half a request
behind.  qemu-ga swallows the next requests in that case; qga does not.
"""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


@pytest.fixture(scope="module")
def guest_kit(qemu_system):
    """(image, boot_guest, GuestSpec) from tests/e2e's guest helpers."""
    try:
        from guest import GuestSpec, boot_guest
        from guest_build import GuestUnavailable, ensure_guest_image
    except ImportError as exc:
        pytest.skip(f"the e2e guest helpers are not available: {exc}")
    try:
        return ensure_guest_image(), boot_guest, GuestSpec
    except GuestUnavailable as exc:
        pytest.skip(f"test guest unavailable: {exc}")


def host_connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(path))
    return sock


def read_line(sock: socket.socket, timeout: float) -> bytes | None:
    sock.settimeout(timeout)
    buf = b""
    try:
        while not buf.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                return None
            buf += chunk
    except (socket.timeout, TimeoutError):
        return None
    return buf


def agent_cpu_ticks(guest) -> int:
    stat = guest.run("cat /proc/$(cat /run/guest/agent.pid)/stat", check=True).output
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])        # utime + stime


@pytest.mark.timeout(240)
def test_host_absence_and_return_over_virtio_serial(guest_kit, qemu_system):
    image, boot_guest, GuestSpec = guest_kit
    with boot_guest(GuestSpec(agent="qga"), qemu=qemu_system, image=image) as guest:
        guest.wait_agent()
        host = host_connect(guest.agent_socket)
        host.sendall(b'\xff{"execute":"guest-sync-delimited","arguments":{"id":11}}')
        deadline = time.monotonic() + 10
        buf = b""
        while not buf.endswith(b'\xff{"return": 11}\n'):
            assert time.monotonic() < deadline
            buf += host.recv(4096)
        # the host leaves half a request behind and goes away
        host.sendall(b'{"execute": "guest-ping", "id": "left-over"')
        time.sleep(0.3)
        host.close()
        time.sleep(1.0)
        before = agent_cpu_ticks(guest)
        time.sleep(3.0)
        spent = agent_cpu_ticks(guest) - before
        assert spent < 30, f"agent used {spent} ticks in 3 s with no host: spinning"
        # the host comes back: its first request is answered, no resync needed
        host = host_connect(guest.agent_socket)
        host.sendall(b'{"execute":"guest-ping","id":"fresh"}')
        assert read_line(host, 10) == b'{"return": {}, "id": "fresh"}\n'
        host.sendall(b'{"execute":"guest-fsfreeze-status"}')
        assert read_line(host, 10) == b'{"return": "thawed"}\n'
        host.close()
        print(f"agent CPU with the host away: {spent} ticks in 3 s")
