"""The format-driver interface every command is written against.

A driver is an open image of one format: it knows its virtual size, reads
and writes guest bytes, and describes the guest address space as *extents*
(runs of bytes with the same status), looking through its backing chain.
Commands (convert, compare, map, commit, measure, ...) only ever use this
interface, so they work for every format and move data extent by extent,
never cluster by cluster.

Changing this interface: only additively (new methods with a default here,
new optional keyword arguments), so that commands and drivers written
against it keep working.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of guest bytes ``[start, start + length)`` with one status.

    The fields mean what qemu-img map's members mean:

    ``present``  allocated somewhere in the chain (false: nothing in the
                 chain has it; it reads as zeros because the chain ends)
    ``zero``     reads as zeros
    ``data``     the bytes come from a file (normal or compressed data, and
                 preallocated zero clusters, which have ``zero`` and ``data``)
    ``offset``   host offset of the data in ``filename``, when it is stored
                 there contiguously and uncompressed; else None
    ``depth``    0 for this image, 1 for its backing file, ...; for
                 unallocated runs, the number of backing files
    ``filename`` the file holding the data (for human map); None if not data
    """

    start: int
    length: int
    present: bool
    zero: bool
    data: bool
    offset: int | None
    depth: int
    filename: str | None = None
    compressed: bool = False

    @property
    def end(self) -> int:
        return self.start + self.length


class Driver:
    """An open image. Subclasses implement the methods that raise here."""

    #: the name used by -f/-O and in info ("raw", "qcow2", ...)
    format_name: str = ""

    def __init__(self, filename: str, *, read_only: bool = True) -> None:
        self.filename = filename
        self.read_only = read_only
        #: the opened backing image, or None
        self.backing: Driver | None = None

    # -- size and data -------------------------------------------------

    @property
    def size(self) -> int:
        """Virtual (guest-visible) size in bytes."""
        raise NotImplementedError

    def read(self, offset: int, length: int) -> bytes:
        """Guest bytes ``[offset, offset+length)``, through the backing chain."""
        raise NotImplementedError

    def write(self, offset: int, data: bytes) -> None:
        raise NotImplementedError

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Make the range read as zeros; with ``unmap`` the space may be freed."""
        raise NotImplementedError

    def discard(self, offset: int, length: int) -> None:
        """Forget the range (it may then read from the backing file or as zeros)."""
        raise NotImplementedError

    def write_compressed(self, offset: int, data: bytes) -> None:
        """Write one whole cluster compressed (formats that support it)."""
        raise NotImplementedError

    # -- status --------------------------------------------------------

    def block_status(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        """Extents covering ``[offset, offset+length)`` in order, through the chain.

        Adjacent extents may have equal status; callers merge as they need.
        """
        raise NotImplementedError

    def allocated_size(self) -> int | None:
        """Bytes the image occupies on the host ("disk size"), if known."""
        return None

    # -- metadata ------------------------------------------------------

    @property
    def cluster_size(self) -> int | None:
        """Allocation unit, or None for formats without one (raw)."""
        return None

    @property
    def backing_filename(self) -> str | None:
        """The backing file name as recorded in the image (unresolved)."""
        return None

    @property
    def backing_format(self) -> str | None:
        return None

    def format_specific(self) -> dict[str, Any] | None:
        """``format-specific`` of qemu-img info JSON (``{"type": ..., "data": ...}``)."""
        return None

    def is_dirty(self) -> bool:
        return False

    # -- lifetime ------------------------------------------------------

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "Driver":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
