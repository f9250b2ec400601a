"""What every transport offers the daemon."""

from __future__ import annotations

import errno
import os


class ChannelError(Exception):
    """Opening or serving the channel failed; ``message`` is qemu-ga's text.

    ``created`` is False when the channel kind itself is unknown (qemu-ga
    then skips its "failed to create guest agent channel" line).
    """

    def __init__(self, message: str, created: bool = True) -> None:
        super().__init__(message)
        self.message = message
        self.created = created


class Connection:
    """A non-blocking byte stream to the host, on one file descriptor."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def read(self, size: int) -> bytes | None:
        """Data; b"" when the peer has gone; None when nothing is there yet.

        Raises OSError on a real read error.
        """
        try:
            return os.read(self.fd, size)
        except BlockingIOError:
            return None
        except InterruptedError:
            return None

    def write(self, data: memoryview) -> int:
        """Bytes written (maybe 0); OSError when the peer cannot take any more."""
        try:
            return os.write(self.fd, data)
        except BlockingIOError:
            return 0
        except InterruptedError:
            return 0

    def close(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1


class Channel:
    """A transport.  Device channels are permanently "connected"."""

    #: True: accept() hands out clients, one at a time
    listening = False
    #: device channels: an EOF means "no host attached", wait and read again
    eof_means_host_gone = True

    def fileno(self) -> int:
        raise NotImplementedError

    def accept(self) -> Connection | None:
        raise NotImplementedError

    def connection(self) -> Connection:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def strerror(exc: OSError) -> str:
    return os.strerror(exc.errno) if exc.errno else str(exc)


__all__ = ["Channel", "ChannelError", "Connection", "strerror", "errno"]
