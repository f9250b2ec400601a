"""virtio-serial: the port /dev/virtio-ports/org.qemu.guest_agent.0.

The port is one permanent connection.  With no host process attached to the
host side, the port polls readable/hung-up and reads return EOF at once;
the daemon then waits (no busy loop) and reads again, and a host that
connects later is served from a clean protocol state.
"""

from __future__ import annotations

import os

from agent.transports.base import Channel, ChannelError, Connection, strerror


class VirtioSerialChannel(Channel):
    def __init__(self, fd: int, path: str) -> None:
        self.path = path
        self._conn = Connection(fd)

    @classmethod
    def open(cls, path: str) -> "VirtioSerialChannel":
        try:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as exc:
            raise ChannelError(f"error opening channel '{path}': {strerror(exc)}") from None
        return cls(fd, path)

    def fileno(self) -> int:
        return self._conn.fd

    def connection(self) -> Connection:
        return self._conn

    def close(self) -> None:
        self._conn.close()
