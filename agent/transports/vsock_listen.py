"""vsock-listen: an AF_VSOCK socket at ``<cid>:<port>``, one client at a time.

The address is parsed as QEMU parses ``vsock:`` addresses; CID 4294967295
(VMADDR_CID_ANY) listens on every CID.
"""

from __future__ import annotations

import re
import socket

from agent.transports.base import Channel, ChannelError, Connection, strerror
from agent.transports.unix_listen import UnixListenChannel

_ADDRESS = re.compile(r"([^:]{1,32}):([^,]{1,32})")


def parse_address(text: str) -> tuple[int, int]:
    match = _ADDRESS.match(text)
    if not match:
        raise ChannelError(f"error parsing address '{text}'")
    if match.end() != len(text):
        raise ChannelError(f"trailing characters in address '{text}'")
    cid, port = match.groups()
    return _uint(cid, "cid"), _uint(port, "port")


def _uint(text: str, what: str) -> int:
    if not re.fullmatch(r"\s*\+?\d+", text) or int(text) > 0xFFFFFFFF:
        raise ChannelError(f"Failed to parse {what} '{text}'")
    return int(text)


class VsockListenChannel(UnixListenChannel):
    @classmethod
    def open(cls, path: str, listen_fd: int | None = None) -> "VsockListenChannel":
        if listen_fd is not None:
            sock = socket.socket(fileno=listen_fd)
            sock.setblocking(False)
            return cls(sock)
        cid, port = parse_address(path)
        family = getattr(socket, "AF_VSOCK", None)
        if family is None:
            raise ChannelError("Failed to create socket: Address family not supported by protocol")
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            raise ChannelError(f"Failed to create socket: {strerror(exc)}") from None
        try:
            sock.bind((cid, port))
            sock.listen(1)
        except OSError as exc:
            sock.close()
            raise ChannelError(f"Failed to bind socket: {strerror(exc)}") from None
        sock.setblocking(False)
        return cls(sock)


__all__ = ["VsockListenChannel", "parse_address", "Connection"]
