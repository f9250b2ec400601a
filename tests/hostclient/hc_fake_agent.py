"""A scriptable stand-in for a guest agent on a unix socket, for fault injection.

It speaks enough of qemu-ga's protocol (0xFF handling with the "stray"
error, guest-sync-delimited's 0xFF prefix, id echo, one command at a time)
and keeps a freeze state, so the host client can be driven into every
failure a real guest could produce and several it cannot produce on demand:
silence, slow or failing freezes, garbage, stale replies, a dropped channel.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Faults:
    silent: bool = False                 # read everything, answer nothing
    freeze_delay: float = 0.0            # seconds a freeze takes
    freeze_error: str | None = None      # freeze fails with this desc (nothing stays frozen)
    freeze_count: int = 2                # filesystems a freeze reports
    thaw_delay: float = 0.0
    thaw_error: str | None = None
    garbage_on_connect: bytes = b""      # sent as soon as a client connects
    close_on: str | None = None          # drop the connection on this command
    hang_on: str | None = None           # never answer this command
    lose: int = 0                        # this many requests vanish unanswered (a lost write)
    on_command: Callable[[str], None] | None = None   # called before handling


@dataclass
class FakeAgent:
    path: str
    faults: Faults = field(default_factory=Faults)
    frozen: bool = False
    received: list[str] = field(default_factory=list)
    freeze_calls: int = 0
    thaw_calls: int = 0
    frozen_seconds: float = 0.0
    _frozen_at: float = 0.0
    _count: int = 0
    shutdown_requested: bool = False
    _server: socket.socket | None = None
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _clients: list[socket.socket] = field(default_factory=list)

    def start(self) -> "FakeAgent":
        if os.path.exists(self.path):
            os.unlink(self.path)
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(self.path)
        self._server.listen(4)
        self._server.settimeout(0.1)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)
        if self._server:
            self._server.close()
        for c in self._clients:
            c.close()
        if os.path.exists(self.path):
            os.unlink(self.path)

    def __enter__(self) -> "FakeAgent":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ serving

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except (socket.timeout, OSError):
                continue
            self._clients.append(conn)
            try:
                self._talk(conn)
            except OSError:
                pass
            finally:
                conn.close()

    def _talk(self, conn: socket.socket) -> None:
        conn.settimeout(0.1)
        if self.faults.garbage_on_connect:
            conn.sendall(self.faults.garbage_on_connect)
        buf = b""
        decoder = json.JSONDecoder()
        while not self._stop.is_set():
            try:
                data = conn.recv(65536)
            except socket.timeout:
                continue
            if not data:
                return
            buf += data
            while True:
                if b"\xff" in buf:
                    buf = buf.split(b"\xff")[-1]
                    if not self.faults.silent:
                        conn.sendall(b'{"error": {"class": "GenericError", '
                                     b'"desc": "JSON parse error, stray \'\\uFFFD\'"}}\n')
                text = buf.decode(errors="replace").lstrip()
                if not text:
                    buf = b""
                    break
                try:
                    request, end = decoder.raw_decode(text)
                except ValueError:
                    break                 # incomplete: wait for more
                buf = text[end:].encode()
                if not self._handle(conn, request):
                    return

    def _handle(self, conn: socket.socket, request: dict[str, Any]) -> bool:
        name = request.get("execute", "")
        self.received.append(name)
        if self.faults.on_command:
            self.faults.on_command(name)
        if self.faults.close_on == name:
            conn.close()
            return False
        if self.faults.silent or self.faults.hang_on == name:
            return True
        if self.faults.lose > 0:
            self.faults.lose -= 1
            return True
        args = request.get("arguments", {}) or {}
        prefix = b""
        try:
            value = self._run(name, args)
            reply: dict[str, Any] = {"return": value}
            if name == "guest-sync-delimited":
                prefix = b"\xff"
        except _Error as exc:
            reply = {"error": {"class": exc.cls, "desc": exc.desc}}
        if "id" in request:
            reply["id"] = request["id"]
        if name in ("guest-shutdown",) and "error" not in reply:
            return True
        conn.sendall(prefix + json.dumps(reply).encode() + b"\n")
        return True

    def _run(self, name: str, args: dict[str, Any]) -> Any:
        allowed_frozen = {"guest-ping", "guest-info", "guest-sync", "guest-sync-delimited",
                          "guest-fsfreeze-status", "guest-fsfreeze-thaw"}
        if self.frozen and name not in allowed_frozen:
            raise _Error(f"Command {name} has been disabled: the agent is in frozen state",
                         "CommandNotFound")
        if name in ("guest-sync", "guest-sync-delimited"):
            return args["id"]
        if name == "guest-ping":
            return {}
        if name == "guest-info":
            return {"version": "7.2.99-fake", "supported_commands": [
                {"enabled": True, "name": n, "success-response": True}
                for n in sorted(allowed_frozen | {"guest-fsfreeze-freeze",
                                                  "guest-fsfreeze-freeze-list"})]}
        if name == "guest-fsfreeze-status":
            return "frozen" if self.frozen else "thawed"
        if name in ("guest-fsfreeze-freeze", "guest-fsfreeze-freeze-list"):
            self.freeze_calls += 1
            time.sleep(self.faults.freeze_delay)
            if self.faults.freeze_error:
                raise _Error(self.faults.freeze_error)
            self.frozen = True
            self._frozen_at = time.monotonic()
            self._count = (len(args.get("mountpoints", [])) if name == "guest-fsfreeze-freeze-list"
                           else self.faults.freeze_count)
            return self._count
        if name == "guest-fsfreeze-thaw":
            self.thaw_calls += 1
            time.sleep(self.faults.thaw_delay)
            if self.faults.thaw_error:
                raise _Error(self.faults.thaw_error)
            was = self.frozen
            if was:
                self.frozen_seconds += time.monotonic() - self._frozen_at
            self.frozen = False
            return self._count if was else 0
        if name == "guest-shutdown":
            self.shutdown_requested = True
            return {}
        raise _Error(f"The command {name} has not been found", "CommandNotFound")


class _Error(Exception):
    def __init__(self, desc: str, cls: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.cls = cls
