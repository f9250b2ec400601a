"""The driver base of the table-mapped formats: runs, reads, block status.

Every one of these formats maps the guest disk in fixed-size *units*
(clusters, grains, blocks, chunks) through some table. A driver here only
has to describe that mapping as :class:`Run` values -- "guest bytes
``[start, start+length)`` are stored like this" -- and :class:`MappedDriver`
turns runs into reads, block status (through the backing chain, the way
qemu-img map reports it) and writes (:mod:`._writes`).

Run kinds, and what qemu-img map shows for them:

``DATA``      stored uncompressed at ``offset`` in ``file``: data, with offset
``RECURSE``   like DATA, but the host file's holes read as zeros and QEMU
              says so (BDRV_BLOCK_RECURSE: static VDI): holes are zero+data
``RAW``       the range is the host file itself (BDRV_BLOCK_RAW): reported
              exactly as a raw image (holes: zero, no data)
``ZERO``      reads as zeros and hides the backing file
``UNALLOC``   not stored here: the backing file shows through, or zeros
``OPAQUE``    data without a host offset (compressed, or a format QEMU gives
              no block status for); the driver's ``_read_opaque`` reads it

:class:`ReadOnlyDriver` is the base of the formats QEMU only reads.
"""

from __future__ import annotations

import errno
from typing import Any, Iterator

from imagetools.errors import ImageError, ImageIOError, ImageOpenError, UnsupportedError
from imagetools.formats._writes import cluster_write, write_zeroes_plain
from imagetools.formats.base import Driver, Extent

DATA, RECURSE, RAW, ZERO, UNALLOC, OPAQUE = range(6)


class Run:
    """Guest bytes ``[start, start+length)`` stored one way (see module doc).

    ``file`` is the HostFile holding DATA/RECURSE/RAW bytes (an extent file
    for vmdk), ``offset`` the host offset of ``start`` in it; ``tag`` is
    driver data for OPAQUE runs (which compressed cluster, ...).
    """

    __slots__ = ("start", "length", "kind", "offset", "file", "tag")

    def __init__(self, start: int, length: int, kind: int, offset: int | None = None,
                 file: Any = None, tag: Any = None) -> None:
        self.start = start
        self.length = length
        self.kind = kind
        self.offset = offset
        self.file = file
        self.tag = tag

    @property
    def end(self) -> int:
        return self.start + self.length

    def __repr__(self) -> str:
        kinds = ("DATA", "RECURSE", "RAW", "ZERO", "UNALLOC", "OPAQUE")
        return f"Run({self.start}, {self.length}, {kinds[self.kind]}, offset={self.offset})"

    def follows(self, other: "Run") -> bool:
        """True if this run directly continues ``other`` the same way."""
        if self.start != other.end or self.kind != other.kind or self.file is not other.file:
            return False
        if self.kind in (DATA, RECURSE, RAW):
            return self.offset == other.offset + other.length
        return self.kind != OPAQUE


def merge_runs(runs: Iterator[Run]) -> Iterator[Run]:
    """Join adjacent runs that continue each other (fewer, larger I/Os)."""
    current: Run | None = None
    for run in runs:
        if current is not None and run.follows(current):
            current.length += run.length
            continue
        if current is not None:
            yield current
        current = Run(run.start, run.length, run.kind, run.offset, run.file, run.tag)
    if current is not None:
        yield current


class MappedDriver(Driver):
    """An image whose guest space a table maps onto host files.

    Subclasses set ``self.file`` (the container HostFile), ``self._size``
    and implement :meth:`_runs` (this image only, no backing) -- and, to be
    writable, the hooks :func:`cluster_write` calls.
    """

    #: unallocated ranges fall through to a backing file (qemu-img map then
    #: shows them as not present); formats without backing files report
    #: them as zero, present (as vdi / vpc do in QEMU)
    unallocated_is_zero = False

    def __init__(self, file, *, read_only: bool) -> None:
        super().__init__(file.filename, read_only=read_only)
        self.file = file
        self._size = 0
        self._opaque_cache: tuple[Any, bytes] | None = None

    # -- class level --------------------------------------------------------------

    @classmethod
    def probe(cls, header: bytes, filename: str) -> int:
        from imagetools.formats import magic
        return magic.score(cls.format_name, header, filename)

    @classmethod
    def open(cls, filename: str, *, read_only: bool = True, force_share: bool = False,
             probed: bool = False) -> "MappedDriver":
        """Open the container file (with QEMU's locks) and parse it.

        Any engine error while parsing becomes ``Could not open 'F': reason``
        and the file is closed again.
        """
        from imagetools.formats.hostfile import HostFile
        file = HostFile.open(filename, read_only=read_only, force_share=force_share)
        try:
            return cls.from_file(file, read_only=read_only, force_share=force_share)
        except ImageOpenError:
            file.close()
            raise
        except ImageError as err:
            file.close()
            raise ImageOpenError(filename, cls.open_reason(filename, err)) from None
        except BaseException:
            file.close()
            raise

    @classmethod
    def from_file(cls, file, *, read_only: bool, force_share: bool) -> "MappedDriver":
        return cls(file, read_only=read_only)

    @classmethod
    def open_reason(cls, filename: str, err: ImageError) -> str:
        """The reason part of an open error (hook for QEMU's errno-only failures)."""
        return str(err)

    # -- to implement -------------------------------------------------------

    def _runs(self, offset: int, length: int) -> Iterator[Run]:
        """Runs covering ``[offset, offset+length)`` of this image (no backing)."""
        raise NotImplementedError

    def _read_opaque(self, run: Run, offset: int, length: int) -> bytes:
        """Guest bytes ``[offset, offset+length)`` inside an OPAQUE run."""
        raise NotImplementedError

    # -- size and data ----------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise ImageIOError(f"Request out of range: offset {offset} length {length} "
                               f"(image size {self._size})", errno.EINVAL)

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.read_into(offset, buf)
        return bytes(buf)

    def read_into(self, offset: int, buf) -> None:
        view = memoryview(buf).cast("B")
        self._check_range(offset, len(view))
        if not len(view):
            return
        for run in merge_runs(self._runs(offset, len(view))):
            part = view[run.start - offset:run.end - offset]
            kind = run.kind
            if kind in (DATA, RECURSE, RAW):
                run.file.preadinto(run.offset, part)
            elif kind == ZERO:
                part[:] = bytes(len(part))
            elif kind == UNALLOC:
                self._read_backing(run.start, part)
            else:
                part[:] = self._read_opaque(run, run.start, run.length)

    def _read_backing(self, offset: int, view: memoryview) -> None:
        """Fill ``view`` with the backing file's bytes at ``offset`` (zeros past it)."""
        backing = self.backing
        n = len(view)
        if backing is None:
            view[:] = bytes(n)
            return
        avail = max(0, min(n, backing.size - offset))
        if avail:
            backing.read_into(offset, view[:avail])
        if avail < n:
            view[avail:] = bytes(n - avail)

    # -- status --------------------------------------------------------------------

    def block_status(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        if length is None:
            length = self._size - offset
        self._check_range(offset, length)
        if not length:
            return
        for run in merge_runs(self._runs(offset, length)):
            yield from self._run_status(run)

    def _run_status(self, run: Run) -> Iterator[Extent]:
        kind = run.kind
        if kind == DATA:
            yield Extent(run.start, run.length, True, False, True, run.offset, 0,
                         run.file.filename)
        elif kind in (RECURSE, RAW):
            yield from _host_status(run, keep_data=kind == RECURSE)
        elif kind == ZERO:
            yield Extent(run.start, run.length, True, True, False, None, 0, None)
        elif kind == OPAQUE:
            yield Extent(run.start, run.length, True, False, True, None, 0,
                         self.filename, self._opaque_compressed(run))
        elif self.unallocated_is_zero:
            yield Extent(run.start, run.length, True, True, False, None, 0, None)
        else:
            yield from self._backing_status(run.start, run.length)

    def _opaque_compressed(self, run: Run) -> bool:
        return False

    def _backing_status(self, start: int, length: int) -> Iterator[Extent]:
        """Status of a range this image leaves to its backing chain."""
        backing = self.backing
        end = start + length
        if backing is not None:
            bend = min(end, backing.size)
            if start < bend:
                for ext in backing.block_status(start, bend - start):
                    yield ext.deeper()
                start = bend
        if start < end:
            depth = sum(1 for _ in self.chain()) - 1
            yield Extent(start, end - start, False, True, False, None, depth, None)

    # -- lifetime ------------------------------------------------------------------

    def allocated_size(self) -> int | None:
        return self.file.allocated()

    def close(self) -> None:
        try:
            if self.file.fd >= 0 and not self.read_only:
                self._close_metadata()
        finally:
            self.file.close()
            if self.backing is not None:
                self.backing.close()
                self.backing = None

    def _close_metadata(self) -> None:
        """Hook: write back what a clean close records (in-use flags, ...)."""

    def flush(self) -> None:
        self.file.flush()

    def _writable(self) -> None:
        if self.read_only:
            raise ImageIOError("Image is read-only", errno.EACCES)

    # -- writes (formats that keep a ClusterMap in ``self._map``) -------------------

    def write(self, offset: int, data) -> None:
        self._writable()
        view = memoryview(data).cast("B")
        self._check_range(offset, len(view))
        if len(view):
            self._before_write()
            cluster_write(self._map, offset, view)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Formats without a zero-cluster marker: zeros where anything is stored."""
        self._writable()
        self._check_range(offset, length)
        if length:
            self._before_write()
            write_zeroes_plain(self._map, offset, length, has_backing=self.backing is not None)

    def _before_write(self) -> None:
        """Hook: what a format does before the first byte of a write."""
        self._opaque_cache = None

    # Formats without discard in QEMU accept it and do nothing.
    def discard(self, offset: int, length: int) -> None:
        self._writable()
        self._check_range(offset, length)


def _host_status(run: Run, keep_data: bool) -> Iterator[Extent]:
    """Split a RECURSE / RAW run by the host file's data and holes."""
    file = run.file
    name = file.filename
    file_len = file.length()
    host = run.offset
    host_end = host + run.length
    shift = run.start - host
    pos = host
    if pos < min(host_end, file_len):
        for start, n, is_data in file.data_runs(pos, min(host_end, file_len)):
            yield Extent(start + shift, n, True, not is_data, is_data or keep_data, start, 0, name)
            pos = start + n
    if pos < host_end:
        yield Extent(pos + shift, host_end - pos, True, True, keep_data, pos, 0, name)


class ReadOnlyDriver(MappedDriver):
    """A format QEMU only reads and has no block status for (bochs, cloop, dmg).

    Opening for writing fails as QEMU's does; block status is one data
    extent without offsets (QEMU's generic answer for such drivers), and
    there is no cluster size or dirty flag (no driver info) to report.
    """

    @classmethod
    def open(cls, filename: str, *, read_only: bool = True, force_share: bool = False,
             probed: bool = False) -> "ReadOnlyDriver":
        if not read_only:
            raise ImageOpenError(filename, "Image is read-only")
        return super().open(filename, read_only=True, force_share=force_share)

    @classmethod
    def from_file(cls, file, *, read_only: bool, force_share: bool) -> "ReadOnlyDriver":
        return cls(file)

    @classmethod
    def create(cls, filename: str, size: int, options: dict[str, Any]) -> None:
        raise UnsupportedError(f"Format driver '{cls.format_name}' does not support image "
                               "creation")

    def __init__(self, file) -> None:
        super().__init__(file, read_only=True)

    def is_dirty(self) -> None:
        return None

    def block_status(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        if length is None:
            length = self._size - offset
        self._check_range(offset, length)
        if length:
            yield Extent(offset, length, True, False, True, None, 0, self.filename)

    def write(self, offset: int, data) -> None:
        self._writable()

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        self._writable()
