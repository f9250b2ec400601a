"""Transports other than unix-listen: isa-serial over a pseudo-terminal (beside
the real qemu-ga), vsock-listen, and the virtio-serial device logic.
"""

from __future__ import annotations

import os
import socket
import subprocess
import termios
import time

import pytest

from agent.transports import ChannelError
from agent.transports.vsock_listen import parse_address

from qga_harness import QGA

pytestmark = pytest.mark.timeout(60)


def talk_over_pty(command, tmp_path, name):
    master, slave = os.openpty()
    slave_path = os.ttyname(slave)
    os.close(slave)
    env = {**os.environ, "QGA_CONF": "/nonexistent"}
    state = tmp_path / name
    state.mkdir()
    proc = subprocess.Popen([*command, "-m", "isa-serial", "-p", slave_path, "-t", str(state)],
                            env=env, stderr=subprocess.PIPE)
    try:
        time.sleep(0.5 if command != QGA else 1.0)
        # the agent put the line in raw mode
        probe = os.open(slave_path, os.O_RDWR | os.O_NOCTTY)
        try:
            lflag = termios.tcgetattr(probe)[3]
        finally:
            os.close(probe)
        raw = not lflag & (termios.ICANON | termios.ECHO | termios.ISIG)
        os.write(master, b'{"execute": "guest-ping", "id": "over-pty"}\n')
        out = b""
        deadline = time.monotonic() + 10
        while not out.endswith(b"\n") and time.monotonic() < deadline:
            try:
                out += os.read(master, 4096)
            except BlockingIOError:
                time.sleep(0.05)
        return out, raw
    finally:
        proc.terminate()
        proc.wait(10)
        os.close(master)


@pytest.mark.oracle
def test_isa_serial_over_a_pty_like_qemu_ga(qemu_ga, tmp_path):
    ref = talk_over_pty([qemu_ga], tmp_path, "ref")
    ours = talk_over_pty(QGA, tmp_path, "ours")
    assert ours == ref
    assert ours[0] == b'{"return": {}, "id": "over-pty"}\n' and ours[1]


@pytest.mark.parametrize("text, result", [
    ("4294967295:1234", (4294967295, 1234)),
    ("3:22", (3, 22)),
])
def test_vsock_address(text, result):
    assert parse_address(text) == result


@pytest.mark.parametrize("text, message", [
    ("notanaddr", "error parsing address 'notanaddr'"),
    ("1:2,x", "trailing characters in address '1:2,x'"),
    ("x:2", "Failed to parse cid 'x'"),
    ("1:y", "Failed to parse port 'y'"),
])
def test_vsock_address_errors(text, message):
    with pytest.raises(ChannelError) as exc:
        parse_address(text)
    assert exc.value.message == message


def test_vsock_listen_serves_when_the_kernel_routes_it(tmp_path):
    if not hasattr(socket, "AF_VSOCK") or not os.path.exists("/dev/vsock"):
        pytest.skip("no AF_VSOCK on this machine")
    port = 20000 + os.getpid() % 20000
    proc = subprocess.Popen([*QGA, "-m", "vsock-listen", "-p", f"4294967295:{port}",
                             "-t", str(tmp_path)], env={**os.environ, "QGA_CONF": "/nonexistent"})
    try:
        time.sleep(1.0)
        assert proc.poll() is None, "vsock-listen must bind and keep running"
        client = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        client.settimeout(2)
        try:
            client.connect((1, port))                   # VMADDR_CID_LOCAL
        except OSError as exc:
            pytest.skip(f"vsock loopback (CID 1) unavailable here ({exc}); "
                        "listening was checked, the exchange was not")
        client.sendall(b'{"execute":"guest-ping"}')
        assert client.recv(100) == b'{"return": {}}\n'
        client.close()
    finally:
        proc.terminate()
        proc.wait(10)
