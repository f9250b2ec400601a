"""What the table-mapped image formats share (qcow v1, qed, vdi, vpc, vhdx,
vmdk, parallels, bochs, cloop, dmg).

Every one of these formats maps the guest disk in fixed-size *units*
(clusters, grains, blocks, chunks) through some table. A driver here only
has to describe that mapping as :class:`Run` values -- "guest bytes
``[start, start+length)`` are stored like this" -- and :class:`MappedDriver`
turns runs into reads, block status (through the backing chain, the way
qemu-img map reports it) and the copy-on-write logic of writes.

Run kinds, and what qemu-img map shows for them:

``DATA``      stored uncompressed at ``offset`` in ``file``: data, with offset
``RECURSE``   like DATA, but the host file's holes read as zeros and QEMU
              says so (BDRV_BLOCK_RECURSE: static VDI): holes are zero+data
``RAW``       the range is the host file itself (BDRV_BLOCK_RAW: fixed VHD):
              reported exactly as a raw image (holes: zero, no data)
``ZERO``      reads as zeros and hides the backing file
``UNALLOC``   not stored here: the backing file shows through, or zeros
``OPAQUE``    data without a host offset (compressed, or a format QEMU gives
              no block status for); the driver's ``_read_opaque`` reads it

Writes go through :func:`cluster_write`, which groups the units a request
touches into runs of already-mapped units (written in place, one pwrite per
contiguous host range) and runs of units to allocate (copy-on-write from
the backing file, one pwrite for the whole new range, then the table
update the format asks for).

Also here: :class:`CheckResult` (what ``qemu-img check`` reports, shared with
the qcow2 driver's field names), :class:`OptionSpec` (a create option as
the ``Formatting ...`` line and ``-o help`` need it), the bounds-checking
helpers every header parser uses, and the C-string / GUID helpers.
"""

from __future__ import annotations

import errno
import struct
from array import array
from typing import Any, Iterator, NamedTuple

from imagetools.errors import (CorruptImageError, ImageError, ImageIOError, ImageOpenError,
                               UnsupportedError)
from imagetools.formats.base import Driver, Extent

SECTOR = 512

DATA, RECURSE, RAW, ZERO, UNALLOC, OPAQUE = range(6)

#: tables larger than this are refused outright (a hostile header could
#: otherwise make us allocate gigabytes before looking at the file)
MAX_TABLE_BYTES = 1 << 30


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


# -- values --------------------------------------------------------------------

class OptionSpec(NamedTuple):
    """One ``-o`` create option: what ``-o help`` and the Formatting line show.

    ``type`` is qemu-img's type word as ``-o help`` prints it (``str``,
    ``bool (on/off)``, ``num``, ``size``); ``default`` the text the
    Formatting line prints when the option was not given (None: omitted).
    Drivers list their options in QEMU's declaration order as
    ``create_options`` (the order of the Formatting line).
    """

    name: str
    type: str
    help: str
    default: str | None = None


class CheckResult:
    """What ``qemu-img check`` reports (the qcow2 driver's field names).

    ``messages`` are the per-problem lines qemu-img prints on stderr, in
    order, without the final newline.
    """

    FIELDS = ("check_errors", "corruptions", "leaks", "corruptions_fixed", "leaks_fixed",
              "image_end_offset", "total_clusters", "allocated_clusters",
              "fragmented_clusters", "compressed_clusters")

    def __init__(self, **values: int) -> None:
        for name in self.FIELDS:
            setattr(self, name, int(values.pop(name, 0)))
        if values:
            raise TypeError(f"unknown check fields {sorted(values)}")
        self.messages: list[str] = []

    def error(self, message: str) -> None:
        """One corruption, with qemu-img's stderr line."""
        self.corruptions += 1
        self.messages.append(message)

    def leak(self, message: str | None = None) -> None:
        self.leaks += 1
        if message:
            self.messages.append(message)

    def __repr__(self) -> str:
        values = ", ".join(f"{n}={getattr(self, n)}" for n in self.FIELDS if getattr(self, n))
        return f"CheckResult({values})"


# -- small helpers ----------------------------------------------------------------

def round_up(n: int, align: int) -> int:
    return -(-n // align) * align


def div_round_up(n: int, d: int) -> int:
    return -(-n // d)


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def cstr(field: bytes) -> bytes:
    """A NUL-terminated C string inside a fixed-size field."""
    end = field.find(b"\0")
    return field if end < 0 else field[:end]


def le_table(data: bytes, width: int) -> array:
    """A little-endian table of u32 (width 4) or u64 (width 8) entries."""
    table = array("I" if width == 4 else "Q")
    if table.itemsize != width:                         # pragma: no cover - exotic ABIs
        table = array("L" if width == 4 else "Q")
    table.frombytes(data[:len(data) // width * width])
    if struct.pack("=H", 1) != struct.pack("<H", 1):    # pragma: no cover - big-endian host
        table.byteswap()
    return table


def be_table(data: bytes, width: int) -> array:
    """A big-endian table of u32 / u64 entries."""
    table = le_table(data, width)
    table.byteswap()
    return table


def table_bytes(table: array, start: int, stop: int, big_endian: bool = False) -> bytes:
    """Entries ``[start, stop)`` of ``table`` encoded for the disk."""
    part = table[start:stop]
    little_host = struct.pack("=H", 1) == struct.pack("<H", 1)
    if big_endian == little_host:
        part.byteswap()
    return part.tobytes()


def read_table(file, offset: int, count: int, width: int, what: str, *,
               big_endian: bool = False, pad_to: int = 1) -> array:
    """Load ``count`` entries at ``offset``, refusing tables outside the file.

    ``pad_to`` rounds the byte length read up (QEMU reads whole sectors);
    the padding is read too but only ``count`` entries are returned.
    """
    nbytes = count * width
    if nbytes > MAX_TABLE_BYTES:
        raise CorruptImageError(f"{what} is too large ({count} entries)")
    if offset < 0 or offset + nbytes > file.length():
        raise CorruptImageError(f"{what} lies beyond the end of the file "
                                f"(offset {offset}, {nbytes} bytes)")
    data = file.pread_full(offset, round_up(nbytes, pad_to))[:nbytes]
    table = be_table(data, width) if big_endian else le_table(data, width)
    return table


def open_failed(filename: str, err: ImageError) -> ImageOpenError:
    """An engine error raised while opening, as ``Could not open 'F': reason``."""
    if isinstance(err, ImageOpenError):
        return err
    return ImageOpenError(filename, str(err))


def guid_le(raw: bytes) -> str:
    """A GUID stored in Microsoft order (first three fields little-endian)."""
    import uuid
    return str(uuid.UUID(bytes_le=bytes(raw)))


def bool_option(options: dict[str, Any], name: str, default: bool = False) -> bool:
    """A boolean create option given as bool or QEMU's on/off words."""
    value = options.get(name)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    text = str(value)
    if text in ("on", "yes", "true", "y"):
        return True
    if text in ("off", "no", "false", "n"):
        return False
    raise ImageError(f"Parameter '{name}' expects 'on' or 'off'")


def size_option(options: dict[str, Any], name: str, default: int) -> int:
    """A size create option given as int or as text with QEMU's suffixes."""
    value = options.get(name)
    if value is None:
        return default
    if isinstance(value, int):
        return value
    from imagetools.sizes import SizeError, parse_size
    try:
        return parse_size(str(value))
    except SizeError:
        raise ImageError(f"Parameter '{name}' expects a non-negative number below 2^64\n"
                         "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, "
                         "tera-, peta-\nand exabytes, respectively.") from None


def refuse_options(options: dict[str, Any], allowed: tuple[str, ...]) -> None:
    """Unknown ``-o`` names, as qemu-img's QemuOpts reports them."""
    for key in options:
        if key not in allowed and key not in ("size", "preallocation", "nocow",
                                               "extent_size_hint"):
            raise ImageError(f"Invalid parameter '{key}'")


def file_preallocation(options: dict[str, Any]) -> str:
    """The file protocol's ``preallocation`` option (off | falloc | full)."""
    mode = str(options.get("preallocation") or "off")
    if mode not in ("off", "falloc", "full"):
        raise ImageError(f"Parameter 'preallocation' does not accept value '{mode}'")
    return mode


def new_host_file(filename: str):
    """Create (truncate) the container file of a new image, with QEMU's locks."""
    from imagetools.formats.hostfile import HostFile
    file = HostFile.open(filename, read_only=False, create=True)
    try:
        file.truncate(0)
    except BaseException:
        file.close()
        raise
    return file


# -- the driver base ------------------------------------------------------------

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
                part[:] = self._read_opaque_cached(run, run.start, run.length)

    def _read_opaque_cached(self, run: Run, offset: int, length: int) -> bytes:
        return self._read_opaque(run, offset, length)

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


# -- writes ----------------------------------------------------------------------

class ClusterMap:
    """What :func:`cluster_write` needs from a format (one extent of it).

    ``unit``                    allocation unit in bytes
    ``file``                    the HostFile the data goes to
    ``lookup(index)``           host offset of unit ``index`` or None when it
                                must be allocated; may raise for units that
                                cannot be written in place
    ``cow_zero(index)``         True if the untouched part of a new unit must
                                read as zeros (zero cluster/grain), not come
                                from the backing file
    ``allocate(index, count)``  host offset for ``count`` new contiguous units
                                (the file may be extended by the caller)
    ``map_units(index, count, host)``  record the new mapping (in memory;
                                ``commit`` writes it)
    ``commit()``                write the changed metadata
    ``fill_backing(guest_offset, view)``  backing bytes for copy-on-write
    ``base``                    guest offset of unit 0 (vmdk extents)
    """

    unit = 0
    base = 0
    file: Any = None
    #: most units one ``allocate`` call may cover (None: no limit); 1 for
    #: formats whose units are not contiguous on the host (vpc bitmaps)
    max_batch: int | None = None

    def lookup(self, index: int) -> int | None:
        raise NotImplementedError

    def cow_zero(self, index: int) -> bool:
        return False

    def allocate(self, index: int, count: int) -> int:
        raise NotImplementedError

    def map_units(self, index: int, count: int, host: int) -> None:
        raise NotImplementedError

    def commit(self) -> None:
        pass

    def fill_backing(self, guest_offset: int, view: memoryview) -> None:
        view[:] = bytes(len(view))


#: most units allocated in one go (bounds the copy-on-write buffer)
MAX_BATCH_BYTES = 32 << 20


def cluster_write(cmap: ClusterMap, offset: int, view: memoryview) -> None:
    """Write guest bytes ``view`` at ``offset`` (relative to ``cmap.base``).

    Units already mapped are written in place; unmapped ones are allocated in
    contiguous batches and written whole (head and tail from the backing
    file, or zeros), then mapped. Metadata is committed once at the end,
    after the data, so a crash leaves at worst a leaked unit.
    """
    unit = cmap.unit
    file = cmap.file
    end = offset + len(view)
    pos = offset
    try:
        while pos < end:
            index = pos // unit
            host = cmap.lookup(index)
            if host is not None:
                stop = min(end, (index + 1) * unit)
                host_pos = host + pos - index * unit
                # extend over following units stored right after this one
                while stop < end:
                    nxt = cmap.lookup(stop // unit)
                    if nxt is None or nxt != host_pos + (stop - pos):
                        break
                    stop = min(end, stop + unit)
                file.pwrite(host_pos, view[pos - offset:stop - offset])
                pos = stop
                continue
            count = 1
            max_units = max(1, MAX_BATCH_BYTES // unit)
            if cmap.max_batch is not None:
                max_units = min(max_units, cmap.max_batch)
            while (count < max_units and (index + count) * unit < end
                   and cmap.lookup(index + count) is None):
                count += 1
            _allocating_write(cmap, index, count, offset, view)
            pos = min(end, (index + count) * unit)
    finally:
        cmap.commit()


#: copy-on-write moves at most this much at a time (units can be huge)
COW_CHUNK = 4 << 20


def _allocating_write(cmap: ClusterMap, index: int, count: int, offset: int,
                      view: memoryview) -> None:
    unit = cmap.unit
    first = index * unit
    last = (index + count) * unit
    end = offset + len(view)
    lo = max(first, offset)
    hi = min(last, end)
    host = cmap.allocate(index, count)
    file = cmap.file
    fresh = host >= file.length()
    if fresh and host + (last - first) > file.length():
        file.truncate(host + (last - first))       # new units read as zeros
    if lo > first:
        _cow_range(cmap, index, first, host, lo - first, fresh)
    file.pwrite(host + (lo - first), view[lo - offset:hi - offset])
    if hi < last:
        _cow_range(cmap, (hi - 1) // unit, hi, host + (hi - first), last - hi, fresh)
    cmap.map_units(index, count, host)


def _cow_range(cmap: ClusterMap, index: int, guest: int, host: int, length: int,
               fresh: bool) -> None:
    """Fill the untouched part of new units from the copy-on-write source.

    Zeros need no write on a freshly grown file; anything else is copied in
    bounded chunks.
    """
    if cmap.cow_zero(index) and fresh:
        return
    done = 0
    while done < length:
        n = min(COW_CHUNK, length - done)
        buf = bytearray(n)
        if not cmap.cow_zero(index):
            cmap.fill_backing(cmap.base + guest + done, memoryview(buf))
        if not fresh or any(buf):
            cmap.file.pwrite(host + done, buf)
        done += n


def write_zeroes_plain(cmap: ClusterMap, offset: int, length: int, *,
                       has_backing: bool) -> None:
    """``write_zeroes`` for formats without a zero-cluster marker.

    Mapped units get zero data written in place. Unmapped units already
    read as zeros unless a backing file shows through them; only then are
    they allocated and written (as QEMU's generic fallback would).
    """
    zeros = memoryview(bytes(min(length, 1 << 20)))
    unit = cmap.unit
    pos, end = offset, offset + length
    try:
        while pos < end:
            index = pos // unit
            stop = min(end, (index + 1) * unit)
            host = cmap.lookup(index)
            if host is not None:
                hpos = host + pos - index * unit
                n = stop - pos
                while n:
                    k = min(n, len(zeros))
                    cmap.file.pwrite(hpos, zeros[:k])
                    hpos += k
                    n -= k
            elif has_backing:
                while pos < stop:
                    k = min(stop - pos, len(zeros))
                    cluster_write(cmap, pos, zeros[:k])
                    pos += k
            pos = stop
    finally:
        cmap.commit()


def unsupported_write(fmt: str) -> UnsupportedError:
    return UnsupportedError(f"The {fmt} format is read-only")


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
