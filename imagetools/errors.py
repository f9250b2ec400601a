"""The image engine's error tree.

    ImageError                 root; its message is one line for the user
    ├── ImageOpenError         the file or its format cannot be opened
    ├── UnsupportedError       a valid feature the engine does not handle (yet)
    ├── CorruptImageError      the metadata is inconsistent or hostile
    ├── ImageLockedError       another process holds the image lock
    └── UsageError             bad command line; the CLI adds "Try 'qemu-img --help'"

Every public function of the engine raises only these; the CLI prints
``qemu-img: <message>`` and exits with qemu-img's code (``exit_code``).
"""

from __future__ import annotations


class ImageError(Exception):
    """Root of the engine's errors. ``str(err)`` is the user's one line."""

    exit_code = 1


class ImageOpenError(ImageError):
    pass


class UnsupportedError(ImageError):
    pass


class CorruptImageError(ImageError):
    pass


class ImageLockedError(ImageError):
    pass


class UsageError(ImageError):
    pass
