"""Helpers for the command catalogue tests (imported by the tests and conftest.py).

* ``make_tree`` builds a fake guest tree (/proc, /sys, /etc...) under
  tmp_path from literal files and symlinks, so handlers run against a
  Platform rooted there.
* ``RecordingPlatform`` records every call that would change the machine
  (clock, helpers such as shutdown/chpasswd, sysfs writes, ownership)
  instead of making it.
* ``agent_call``: call a handler the way the dispatcher does (wire argument
  names, errors as ``{"error": {"class", "desc"}}``).
* ``AgentClient``/``start_agent``: talk to an agent (the real qemu-ga or
  ours) on a unix socket, with every machine-changing command blocked.
* ``shape``: the JSON shape of a value, for answers that describe a
  changing machine.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import agent.commands
from agent.context import Context
from agent.errors import AgentError
from agent.platform import Platform
from agent.registry import COMMANDS

agent.commands.load_all()

#: commands the reference agent must never run on this machine
DANGEROUS = (
    "guest-shutdown", "guest-suspend-disk", "guest-suspend-ram", "guest-suspend-hybrid",
    "guest-set-time", "guest-set-user-password", "guest-set-vcpus",
    "guest-set-memory-blocks", "guest-fsfreeze-freeze", "guest-fsfreeze-freeze-list",
    "guest-fstrim", "guest-ssh-add-authorized-keys", "guest-ssh-remove-authorized-keys",
)


@dataclass(frozen=True)
class Link:
    """A symlink in a fake tree, to an absolute guest path (made relative on disk)."""
    target: str


def make_tree(root: Path, spec: dict[str, Any]) -> Path:
    """Create ``spec`` (guest path -> str/bytes content, Link, or None for a
    directory) under ``root``."""
    for guest_path, content in spec.items():
        path = root / guest_path.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            path.mkdir(parents=True, exist_ok=True)
        elif isinstance(content, Link):
            target = root / content.target.lstrip("/")
            path.symlink_to(os.path.relpath(target, path.parent))
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return root


class RecordingPlatform(Platform):
    """A Platform that records what would change the machine instead of doing it."""

    def __init__(self, root: str = "/", **kwargs: Any) -> None:
        super().__init__(root=root, **kwargs)
        self.calls: list[tuple] = []
        self.helper_status: dict[str, int] = {}

    def settimeofday(self, seconds: int, microseconds: int) -> None:
        self.calls.append(("settimeofday", seconds, microseconds))

    def run_helper(self, argv, *, input=None, setsid=True) -> int:
        self.calls.append(("run_helper", list(argv), input))
        return self.helper_status.get(os.path.basename(argv[0]), 0)

    def write_file(self, path: str, data: bytes) -> None:
        self.calls.append(("write_file", path, data))
        super().write_file(path, data)

    def chown(self, path: str, uid: int, gid: int) -> None:
        self.calls.append(("chown", path, uid, gid))


def make_ctx(platform: Platform, statedir: str | os.PathLike = "/nonexistent") -> Context:
    return Context(platform, statedir=str(statedir))


def agent_call(ctx: Context, name: str, **wire_args: Any) -> dict:
    """Call a handler as the dispatcher does; the result as a response payload."""
    args = {key.replace("-", "_"): value for key, value in wire_args.items()}
    try:
        value = COMMANDS[name].handler(ctx, **args)
    except AgentError as err:
        return {"error": {"class": err.error_class, "desc": err.desc}}
    return {"return": {} if value is None else value}


class AgentClient:
    """A qemu-ga style agent on a unix socket, one request and one line at a time."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self.sock = self._connect()
        self.pending = b""

    def _connect(self) -> socket.socket:
        deadline = time.monotonic() + self.timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.path)
                sock.settimeout(self.timeout)
                return sock
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def request(self, name: str, **wire_args: Any) -> dict:
        message: dict[str, Any] = {"execute": name}
        if wire_args:
            message["arguments"] = wire_args
        self.sock.sendall(json.dumps(message).encode())
        while b"\n" not in self.pending:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("agent closed the connection")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return json.loads(line.lstrip(b"\xff"))

    def close(self) -> None:
        self.sock.close()


def start_agent(argv: list[str], workdir: Path, env: dict | None = None):
    """Start an agent listening on ``workdir/agent.sock``: (process, client)."""
    sock = workdir / "agent.sock"
    state = workdir / "state"
    state.mkdir(exist_ok=True)
    proc = subprocess.Popen([*argv, "-m", "unix-listen", "-p", str(sock), "-t", str(state),
                             "-b", ",".join(DANGEROUS)],
                            cwd=workdir, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        client = AgentClient(str(sock))
    except OSError:
        proc.kill()
        _out, err = proc.communicate()
        pytest.fail(f"agent {argv[0]} did not start: {err.decode(errors='replace')}")
    return proc, client


def stop_agent(proc: subprocess.Popen, client: AgentClient) -> None:
    client.close()
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def shape(value: Any) -> Any:
    """The JSON shape of a value: member names and types, not the numbers."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in sorted(value.items())}
    if isinstance(value, list):
        return [shape(item) for item in value]
    return type(value).__name__
