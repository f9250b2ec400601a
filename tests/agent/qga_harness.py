"""Running agents for the qga core tests: the real qemu-ga and ours, side by side.

(Helpers live here, fixtures in conftest.py: test modules import this module
by its unique name, never ``conftest``, which other packages have too.)

``spawn_agent(argv0, ...)`` starts an agent on a unix socket in its own
temporary state directory (``-m unix-listen -p SOCK -t STATEDIR``) and
returns an :class:`AgentProc`; the ``agents`` fixture starts both with the
same options.  Machine-changing commands are always blocked with ``-b`` so
nothing a test sends can change this host; fsfreeze tests unblock only
freeze-list, and only ever name loop mounts they created.

Teardown is guaranteed: SIGTERM, then SIGKILL, and the temporary
directory goes away with tmp_path.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

#: never runnable by any agent started here
DANGEROUS = (
    "guest-shutdown", "guest-suspend-disk", "guest-suspend-ram", "guest-suspend-hybrid",
    "guest-set-time", "guest-set-user-password", "guest-set-vcpus",
    "guest-set-memory-blocks", "guest-fsfreeze-freeze", "guest-fsfreeze-freeze-list",
    "guest-fstrim", "guest-ssh-add-authorized-keys", "guest-ssh-remove-authorized-keys",
    "guest-exec", "guest-file-open",
)

QGA = [sys.executable, "-m", "agent"]


def sync_marker(n: int) -> tuple[bytes, bytes]:
    """A resync request and the bytes that end its answer."""
    return (b'\xff{"execute":"guest-sync-delimited","arguments":{"id":%d}}' % n,
            b'\xff{"return": %d}\n' % n)


class Client:
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_until(self, marker: bytes, timeout: float = 10.0) -> bytes:
        deadline = time.monotonic() + timeout
        while marker not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {marker!r} within {timeout}s; got {self.buf[-300:]!r}")
            self.sock.settimeout(left)
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise EOFError(self.buf)
            self.buf += chunk
        end = self.buf.index(marker) + len(marker)
        out, self.buf = self.buf[:end], self.buf[end:]
        return out

    def read_for(self, seconds: float) -> bytes:
        """Whatever arrives within ``seconds`` (for "no answer" checks)."""
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(1 << 20)
            except (socket.timeout, TimeoutError):
                break
            if not chunk:
                break
            self.buf += chunk
        out, self.buf = self.buf, b""
        return out

    def exchange(self, data: bytes, n: int = 0) -> bytes:
        """Send ``data`` followed by a resync; the answers before the resync's."""
        request, answer = sync_marker(n)
        self.send(data + request)
        got = self.read_until(answer)
        return got[:-len(answer)]

    def call(self, request: bytes, timeout: float = 10.0) -> bytes:
        self.send(request)
        return self.read_until(b"\n", timeout)

    def close(self) -> None:
        self.sock.close()


@dataclass
class AgentProc:
    name: str
    proc: subprocess.Popen
    sock: str
    statedir: Path
    stderr_path: Path
    clients: list[Client] = field(default_factory=list)

    def connect(self, timeout: float = 10.0) -> Client:
        client = Client(self.sock, timeout)
        self.clients.append(client)
        return client

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self) -> int:
        for client in self.clients:
            client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def wait_for_socket(path: str, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"agent exited with {proc.returncode} before listening")
        if os.path.exists(path):
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(path)
                return
            except OSError:
                pass
        time.sleep(0.02)
    raise TimeoutError(f"agent did not listen on {path}")


def spawn_agent(command: list[str], workdir: Path, name: str, extra: list[str] = (),
                block: tuple[str, ...] = DANGEROUS, env: dict | None = None,
                statedir: Path | None = None) -> AgentProc:
    workdir.mkdir(parents=True, exist_ok=True)
    statedir = statedir or workdir / "state"
    statedir.mkdir(exist_ok=True)
    sock = str(workdir / "sock")
    stderr_path = workdir / "stderr"
    argv = [*command, "-m", "unix-listen", "-p", sock, "-t", str(statedir)]
    if block:
        argv += ["-b", ",".join(block)]
    argv += list(extra)
    full_env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "LISTEN_FDS")}
    full_env["QGA_CONF"] = str(workdir / "no-such.conf")
    full_env.update(env or {})
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=err, cwd=str(workdir), env=full_env)
    agent = AgentProc(name, proc, sock, statedir, stderr_path)
    try:
        wait_for_socket(sock, proc)
    except BaseException:
        agent.stop()
        raise
    return agent
