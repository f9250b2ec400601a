"""Client for the guest agent channel QEMU exposes on a host unix socket.

The channel is a raw byte stream shared with whatever used it before: there
may be a half-sent request from an earlier client in the agent's parser and
stale replies waiting in the socket. So every session starts, and every
timed-out command is followed, by a resynchronisation: a raw 0xFF byte
(which resets the agent's JSON parser) and ``guest-sync-delimited`` with a
random id; everything up to the 0xFF the agent puts before that reply is
dropped, and replies are matched by id from then on.

:class:`ReplyStream` does the framing without I/O (bytes in, reply lines
out); :class:`AgentClient` adds the socket, per-command timeouts and typed
helpers. A freeze that times out is followed by a status poll, so the caller
knows whether the guest is frozen after all (and must be thawed).
"""

from __future__ import annotations

import itertools
import json
import secrets
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from hostclient.errors import (
    AgentCommandError,
    AgentProtocolError,
    AgentTimeout,
    AgentUnavailable,
)

DELIMITER = 0xFF
#: A reply larger than this is not from a sane agent (qemu-ga caps a JSON
#: value at 64 MiB; guest-file-read returns at most 48 MiB base64-encoded).
MAX_REPLY = 80 * 1024 * 1024

#: Commands that send nothing on success (qemu-ga's success-response: false).
#: Seconds between repeated guest-sync-delimited requests while the agent is silent.
SYNC_RESEND = 1.0

NO_REPLY = frozenset({"guest-shutdown", "guest-suspend-disk", "guest-suspend-ram",
                      "guest-suspend-hybrid"})


class ReplyStream:
    """Splits the agent's byte stream into reply lines. No I/O.

    ``feed()`` bytes as they arrive; ``line()`` returns the next complete
    line; ``skip_to_delimiter()`` drops everything up to and including the
    next 0xFF (returning False while none has arrived yet — what came so far
    is garbage either way and is dropped).
    """

    def __init__(self, limit: int = MAX_REPLY) -> None:
        self._buf = bytearray()
        self._limit = limit

    def feed(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) > self._limit and b"\n" not in self._buf:
            self._buf.clear()
            raise AgentProtocolError(f"agent sent more than {self._limit} bytes without a line end")

    def skip_to_delimiter(self) -> bool:
        pos = self._buf.find(DELIMITER)
        if pos < 0:
            self._buf.clear()
            return False
        del self._buf[:pos + 1]
        return True

    def line(self) -> bytes | None:
        pos = self._buf.find(b"\n")
        if pos < 0:
            return None
        line = bytes(self._buf[:pos]).lstrip(b"\xff")   # a delimited stale reply
        del self._buf[:pos + 1]
        return line

    def clear(self) -> None:
        self._buf.clear()


def decode_reply(line: bytes) -> dict[str, Any]:
    """One reply line as a dict, or AgentProtocolError."""
    try:
        reply = json.loads(line.decode("utf-8", errors="strict").strip())
    except (UnicodeDecodeError, ValueError) as exc:
        raise AgentProtocolError(f"unreadable reply from the agent: {line[:120]!r}") from exc
    if not isinstance(reply, dict):
        raise AgentProtocolError(f"reply is not a JSON object: {line[:120]!r}")
    return reply


@dataclass(frozen=True)
class AgentTimeouts:
    """Seconds to wait for each kind of command.

    Short for liveness checks, long for a freeze (the guest flushes its
    dirty data first), a thaw of its own so a slow freeze cannot eat it.
    """

    connect: float = 5.0
    sync: float = 5.0
    ping: float = 5.0
    freeze: float = 60.0
    thaw: float = 30.0
    status: float = 10.0
    default: float = 30.0

    def for_command(self, command: str) -> float:
        return {
            "guest-sync-delimited": self.sync,
            "guest-sync": self.sync,
            "guest-ping": self.ping,
            "guest-fsfreeze-freeze": self.freeze,
            "guest-fsfreeze-freeze-list": self.freeze,
            "guest-fsfreeze-thaw": self.thaw,
            "guest-fsfreeze-status": self.status,
        }.get(command, self.default)


@dataclass(frozen=True)
class AgentInfo:
    version: str
    commands: dict[str, bool]          # name -> enabled

    def supports(self, command: str) -> bool:
        return self.commands.get(command, False)


@dataclass
class AgentClient:
    """A connection to one guest agent socket.

    Use as a context manager or call :meth:`connect` / :meth:`close`.
    """

    path: str
    timeouts: AgentTimeouts = field(default_factory=AgentTimeouts)
    _sock: socket.socket | None = field(default=None, init=False, repr=False)
    _stream: ReplyStream = field(default_factory=ReplyStream, init=False, repr=False)
    _dirty: bool = field(default=True, init=False, repr=False)
    _ids: itertools.count = field(default_factory=itertools.count, init=False, repr=False)
    _tag: str = field(default_factory=lambda: secrets.token_hex(4), init=False, repr=False)
    _waited: float = field(default=0.0, init=False, repr=False)   # for timeout messages

    # ------------------------------------------------------- connection

    def connect(self) -> "AgentClient":
        """Open the socket and synchronise; AgentUnavailable/AgentTimeout."""
        self.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeouts.connect)
        try:
            sock.connect(self.path)
        except FileNotFoundError:
            sock.close()
            raise AgentUnavailable(f"no guest agent socket at {self.path}") from None
        except OSError as exc:
            sock.close()
            raise AgentUnavailable(f"cannot connect to the guest agent socket {self.path}: "
                                   f"{exc.strerror or exc}") from None
        self._sock = sock
        self._stream.clear()
        self._dirty = True
        self.sync()
        return self

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> "AgentClient":
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._sock is not None

    # --------------------------------------------------------- protocol

    def sync(self, timeout: float | None = None) -> None:
        """Resynchronise: reset the agent's parser, drop all stale replies.

        A fresh 0xFF and guest-sync-delimited go out every
        :data:`SYNC_RESEND` seconds until the agent answers one of them: a
        request can be lost while the channel changes hands (the guest sees
        the previous client's hang-up after the new client's bytes and its
        agent drops what it had). Any of this call's ids is accepted; the
        answers to the others are skipped later, as every stale reply is.
        """
        timeout = self.timeouts.sync if timeout is None else timeout
        self._waited = timeout
        deadline = time.monotonic() + timeout
        tokens: set[int] = set()
        hint = ("is the guest agent running in the guest, and is no other "
                "client (libvirt?) using this socket?")
        while True:
            token = secrets.randbelow(1 << 31)
            tokens.add(token)
            request = {"execute": "guest-sync-delimited", "arguments": {"id": token}}
            self._send(b"\xff" + json.dumps(request).encode() + b"\n")
            resend = min(deadline, time.monotonic() + SYNC_RESEND)
            try:
                while True:
                    while not self._stream.skip_to_delimiter():
                        self._recv(resend, "guest-sync-delimited", hint)
                    line = self._read_line(resend, "guest-sync-delimited")
                    try:
                        reply = decode_reply(line)
                    except AgentProtocolError:
                        continue          # a stray 0xFF inside garbage: keep looking
                    if reply.get("return") in tokens:
                        self._dirty = False
                        return
            except AgentTimeout:
                if resend >= deadline:
                    raise

    def execute(self, command: str, arguments: dict[str, Any] | None = None, *,
                timeout: float | None = None) -> Any:
        """Run one agent command and return its ``return`` value.

        Raises AgentCommandError for an error reply, AgentTimeout when no
        reply came in time (the channel is then resynchronised before the
        next command), AgentUnavailable when the channel is gone.
        """
        if self._sock is None:
            raise AgentUnavailable("not connected to the guest agent")
        timeout = self.timeouts.for_command(command) if timeout is None else timeout
        deadline = time.monotonic() + timeout
        if self._dirty:
            self.sync(min(self.timeouts.sync, timeout))
        self._waited = timeout
        request_id = f"quiesce-{self._tag}-{next(self._ids)}"
        request: dict[str, Any] = {"execute": command, "id": request_id}
        if arguments:
            request["arguments"] = arguments
        self._send(json.dumps(request).encode() + b"\n")
        if command in NO_REPLY:
            return self._await_no_reply(command, request_id, deadline)
        return self._await_reply(command, request_id, deadline)

    def _await_reply(self, command: str, request_id: str, deadline: float) -> Any:
        self._dirty = True                # until our reply has been read
        while True:
            reply = decode_reply(self._read_line(deadline, command))
            if reply.get("id") != request_id:
                continue                  # a stale reply or a parser complaint
            self._dirty = False
            return _result(command, reply)

    def _await_no_reply(self, command: str, request_id: str, deadline: float) -> None:
        """For commands silent on success: an error, or sync, or the guest gone."""
        token = secrets.randbelow(1 << 31)
        self._send(json.dumps({"execute": "guest-sync", "arguments": {"id": token}}).encode() + b"\n")
        self._dirty = True
        try:
            while True:
                reply = decode_reply(self._read_line(deadline, command))
                if reply.get("id") == request_id:
                    _result(command, reply)       # raises for an error reply
                if reply.get("return") == token:
                    self._dirty = False
                    return None
        except (AgentTimeout, AgentUnavailable):
            return None                   # the guest went down, as asked

    # --------------------------------------------------------------- I/O

    def _send(self, data: bytes) -> None:
        if self._sock is None:
            raise AgentUnavailable("not connected to the guest agent")
        try:
            self._sock.settimeout(self.timeouts.connect)
            self._sock.sendall(data)
        except OSError as exc:
            self.close()
            raise AgentUnavailable(f"guest agent channel lost while sending: {exc}") from None

    def _recv(self, deadline: float, command: str, hint: str = "") -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            self._dirty = True
            raise AgentTimeout(command, self._waited, hint)
        assert self._sock is not None
        self._sock.settimeout(remaining)
        try:
            data = self._sock.recv(65536)
        except socket.timeout:
            self._dirty = True
            raise AgentTimeout(command, self._waited, hint) from None
        except OSError as exc:
            self.close()
            raise AgentUnavailable(f"guest agent channel lost: {exc}") from None
        if not data:
            self.close()
            raise AgentUnavailable("guest agent channel closed by QEMU")
        self._stream.feed(data)

    def _read_line(self, deadline: float, command: str) -> bytes:
        while True:
            line = self._stream.line()
            if line is not None:
                return line
            self._recv(deadline, command)

    # ------------------------------------------------------ typed helpers

    def ping(self) -> None:
        self.execute("guest-ping")

    def info(self) -> AgentInfo:
        value = self.execute("guest-info")
        return AgentInfo(str(value.get("version", "")),
                         {c["name"]: bool(c.get("enabled")) for c in value.get("supported_commands", [])})

    def fsfreeze_status(self, timeout: float | None = None) -> str:
        return str(self.execute("guest-fsfreeze-status", timeout=timeout))

    def fsfreeze_freeze(self, mountpoints: list[str] | None = None,
                        timeout: float | None = None) -> int:
        """Freeze all (or the listed) filesystems; the count frozen."""
        if mountpoints:
            value = self.execute("guest-fsfreeze-freeze-list", {"mountpoints": list(mountpoints)},
                                 timeout=timeout)
        else:
            value = self.execute("guest-fsfreeze-freeze", timeout=timeout)
        return _as_count("guest-fsfreeze-freeze", value)

    def fsfreeze_thaw(self, timeout: float | None = None) -> int:
        return _as_count("guest-fsfreeze-thaw", self.execute("guest-fsfreeze-thaw", timeout=timeout))

    def status_after_timeout(self, timeout: float | None = None) -> str | None:
        """After a command timed out: the freeze status, or None if still silent.

        The agent runs one command at a time, so this answer comes only once
        the slow command has finished; ``frozen`` means a late freeze went
        through and the guest must be thawed.
        """
        timeout = self.timeouts.status if timeout is None else timeout
        try:
            if not self.connected:
                self.connect()
            return self.fsfreeze_status(timeout=timeout)
        except (AgentTimeout, AgentUnavailable, AgentProtocolError):
            return None

    def send_thaw_blind(self) -> None:
        """Queue a thaw without waiting: the agent runs it after whatever
        it is stuck in. The last resort when the agent does not answer."""
        request = {"execute": "guest-fsfreeze-thaw", "id": f"quiesce-{self._tag}-blind-thaw"}
        self._send(json.dumps(request).encode() + b"\n")
        self._dirty = True


def _result(command: str, reply: dict[str, Any]) -> Any:
    if "error" in reply:
        err = reply["error"] if isinstance(reply["error"], dict) else {}
        raise AgentCommandError(command, str(err.get("class", "GenericError")),
                                str(err.get("desc", reply["error"])))
    if "return" not in reply:
        raise AgentProtocolError(f"{command}: reply without return or error: {reply!r}"[:300])
    return reply["return"]


def _as_count(command: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise AgentProtocolError(f"{command} returned {value!r}, not a count")
    return value
