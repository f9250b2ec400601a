"""Making what quiesce writes survive a crash or a power cut.

The engine copies with the page cache and without flushes (qemu-img's
``-t unsafe``), so a copied image is only in memory until it is synced. A
backup is called complete, and a restored disk is renamed into place, only
after :func:`sync_file` has flushed the image and the directory entry that
names it; the manifest (hostclient/manifest.py) is written after that.
"""

from __future__ import annotations

import os
from pathlib import Path

from hostclient.errors import BackupError


def sync_file(path: Path | str) -> None:
    """Flush a file's data and metadata, then its directory's entry for it."""
    _fsync(path, os.O_RDONLY)
    sync_dir(Path(path).parent)


def sync_dir(path: Path | str) -> None:
    """Flush a directory (the entries created, renamed or removed in it)."""
    _fsync(path, os.O_RDONLY | os.O_DIRECTORY)


def _fsync(path: Path | str, flags: int) -> None:
    try:
        fd = os.open(path, flags | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise BackupError(f"cannot flush {path} to disk: {exc.strerror or exc}") from None
