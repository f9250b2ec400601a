"""Transports: they move bytes between the host and the agent, nothing more.

``open_channel(method, path)`` opens one of qemu-ga's four channel kinds:

    virtio-serial  a virtio port; one permanent connection (default)
    isa-serial     a serial line through pyserial; one permanent connection
    unix-listen    a unix socket; one client at a time
    vsock-listen   an AF_VSOCK socket ``<cid>:<port>``; one client at a time

A device channel hands out its single :class:`Connection` at once; a
listening channel accepts clients, and the daemon serves one at a time,
leaving the others in the kernel's backlog, as qemu-ga does.
"""

from __future__ import annotations

import os
import socket

from agent.transports.base import Channel, ChannelError, Connection

__all__ = ["Channel", "ChannelError", "Connection", "open_channel", "activation_socket",
           "METHODS"]

METHODS = ("virtio-serial", "isa-serial", "unix-listen", "vsock-listen")
SD_LISTEN_FDS_START = 3


def open_channel(method: str, path: str, listen_fd: int | None = None) -> Channel:
    """Open the channel, or raise ChannelError with qemu-ga's message."""
    if method == "virtio-serial":
        from agent.transports.virtio_serial import VirtioSerialChannel
        return VirtioSerialChannel.open(path)
    if method == "isa-serial":
        from agent.transports.isa_serial import IsaSerialChannel
        return IsaSerialChannel.open(path)
    if method == "unix-listen":
        from agent.transports.unix_listen import UnixListenChannel
        return UnixListenChannel.open(path, listen_fd)
    if method == "vsock-listen":
        from agent.transports.vsock_listen import VsockListenChannel
        return VsockListenChannel.open(path, listen_fd)
    raise ChannelError(f"unsupported channel method/type: {method}", created=False)


def activation_socket(environ: dict[str, str] | None = None) -> tuple[int, str | None]:
    """systemd socket activation: (number of sockets passed, method for the first).

    The method follows the socket's family (unix -> unix-listen, vsock ->
    vsock-listen), None when it is neither.
    """
    env = os.environ if environ is None else environ
    try:
        if int(env.get("LISTEN_PID", "")) != os.getpid():
            return 0, None
        count = int(env.get("LISTEN_FDS", ""))
    except ValueError:
        return 0, None
    if count != 1:
        return count, None
    try:
        sock = socket.socket(fileno=SD_LISTEN_FDS_START)
        family = sock.family
        sock.detach()
    except OSError:
        return 1, None
    if family == socket.AF_UNIX:
        return 1, "unix-listen"
    if family == getattr(socket, "AF_VSOCK", -1):
        return 1, "vsock-listen"
    return 1, None
