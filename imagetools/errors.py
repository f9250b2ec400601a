"""The image engine's error tree.

    ImageError                 root; its message is what the user reads
    ├── ImageOpenError         the file or its format cannot be opened
    ├── UnsupportedError       a valid feature the engine does not handle (yet)
    │   └── CheckNotSupported  the format has no consistency check (qemu-img exits 63)
    │   └── ImageLockedError   another process holds the image lock
    ├── CorruptImageError      the metadata is inconsistent or hostile
    ├── ImageIOError           the host file could not be read or written
    └── UsageError             bad command line; the CLI adds "Try 'qemu-img --help'"

Every public function of the engine raises only these; the CLI prints
``qemu-img: <message>`` and exits with qemu-img's code (``exit_code``).

Messages are worded as qemu-img 7.2 words them, so that the CLI can print
them unchanged. A few of qemu-img's messages span two lines (the lock
conflict adds ``Is another process using the image [F]?``); those keep the
newline in ``str(err)``.

``ImageOpenError`` carries the parts the CLI may need to compose other
forms of the message: ``filename`` (the image the user named) and
``reason`` (what went wrong, without the ``Could not open 'F': `` prefix),
so that ``str(err) == f"Could not open '{filename}': {reason}"``.
"""

from __future__ import annotations


class ImageError(Exception):
    """Root of the engine's errors. ``str(err)`` is the user's message."""

    exit_code = 1


class ImageOpenError(ImageError):
    """The image (or one of its backing files) could not be opened."""

    def __init__(self, filename: str, reason: str) -> None:
        super().__init__(f"Could not open '{filename}': {reason}")
        self.filename = filename
        self.reason = reason


class UnsupportedError(ImageError):
    pass


class CheckNotSupported(UnsupportedError):
    """``check`` on a format without a consistency check."""

    exit_code = 63

    def __init__(self, message: str = "This image format does not support checks") -> None:
        super().__init__(message)


class CorruptImageError(ImageError):
    pass


class ImageLockedError(ImageOpenError):
    """QEMU's lock protocol says another process uses the image.

    ``reason`` is qemu-img's two lines (``Failed to get "write" lock`` /
    ``Is another process using the image [F]?``); ``str(err)`` adds the
    ``Could not open 'F': `` prefix as for any open error. ``create``
    reports it as ``F: <reason>`` instead.
    """


class ImageIOError(ImageError):
    """A read, write or flush of the host file failed (``errno`` kept).

    ``offset``: the guest offset the failure is about, where the driver
    knows it (a corrupt table entry), for reports such as convert's
    ``error while reading block status at offset N``.
    """

    def __init__(self, message: str, errno: int | None = None, *,
                 offset: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno
        self.offset = offset


class UsageError(ImageError):
    pass


def c_hex(value: int) -> str:
    """C's ``%#x``, as QEMU's messages print offsets and indices: ``0`` for
    zero, ``0x...`` otherwise."""
    return f"{value:#x}" if value else "0"
