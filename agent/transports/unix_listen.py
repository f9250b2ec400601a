"""unix-listen: a unix stream socket, one client at a time.

As qemu-ga: whatever is at the path is unlinked first, the socket's mode
follows the umask, the file is left behind at exit, and while a client is
served further clients wait in the kernel's backlog.
"""

from __future__ import annotations

import os
import socket

from agent.transports.base import Channel, ChannelError, Connection, strerror

BACKLOG = 8


class UnixListenChannel(Channel):
    listening = True
    eof_means_host_gone = False

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    @classmethod
    def open(cls, path: str, listen_fd: int | None = None) -> "UnixListenChannel":
        if listen_fd is not None:
            sock = socket.socket(fileno=listen_fd)
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
                except OSError:
                    pass
                try:
                    sock.bind(path)
                except OSError as exc:
                    raise ChannelError(f"Failed to bind socket to {path}: {strerror(exc)}") from None
                sock.listen(BACKLOG)
            except BaseException:
                sock.close()
                raise
        sock.setblocking(False)
        return cls(sock)

    def fileno(self) -> int:
        return self._sock.fileno()

    def accept(self) -> Connection | None:
        try:
            client, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return None
        client.setblocking(False)
        return Connection(client.detach())

    def close(self) -> None:
        self._sock.close()
