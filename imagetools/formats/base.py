"""The format-driver interface every command is written against.

A driver is an open image of one format: it knows its virtual size, reads
and writes guest bytes, and describes the guest address space as *extents*
(runs of bytes with the same status), looking through its backing chain.
Commands (convert, compare, map, commit, measure, ...) only ever use this
interface, so they work for every format and move data extent by extent,
never cluster by cluster.

Opening and creating go through :mod:`imagetools.image` (``open_image``,
``create_image``), which probes the format, takes the image locks and opens
the whole backing chain; a driver's own ``open`` only opens one file.

What a driver class offers (class level):

``format_name``                 the name used by -f/-O and in info
``probe(header, filename)``     0..100: how sure it is that a file is this format
``open(filename, *, read_only, force_share)``  open one image, no backing
``create(filename, size, options)``            create a new image file
``measure(options, size=None, source=None)``    qemu-img measure's numbers
``supports_backing``            whether the format can have a backing file

What an open driver offers (the instance), beyond data and status:

``size`` ``read`` ``read_into`` ``write`` ``write_zeroes`` ``discard``
``block_status`` ``flush`` ``close`` -- the data path (below);
``map_runs`` -- block status in qemu-img map's terms, in batches;
``write_from_fd`` / ``read_to_fd`` -- the same with a file descriptor on
the other side, so convert can move data with copy_file_range.
``allocated_size()``  host bytes in use ("disk size"); ``cluster_size``;
``backing_filename`` / ``backing_format`` as recorded; ``backing`` the
opened backing driver (set by ``open_image``); ``format_specific()``;
``is_dirty()``; ``encrypted``; ``snapshots()``; ``open_snapshot()``;
``check()``; ``has_zero_init()``; ``compressor()`` / ``write_compressed_blob``
(parallel compression for convert -c); ``data_filename`` (qcow2 external
data file); ``chain()`` (this image and its backing files, top first).
Structural changes (qemu-img snapshot -c/-a/-d, resize, commit, rebase,
amend, check -r): ``create_snapshot`` ``apply_snapshot``
``delete_snapshot`` ``truncate`` ``make_empty`` ``change_backing_file``
``amend`` ``repair``; the defaults refuse with QEMU's words.

Changing this interface: only additively (new methods with a default here,
new optional keyword arguments), so that commands and drivers written
against it keep working.
"""

from __future__ import annotations

from _operator import itemgetter   # operator.py only re-exports it (start-up)

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from typing import Any, Callable, Iterator

    from imagetools.formats.qcow2.check import CheckResult

_EXTENT_FIELDS = ("start", "length", "present", "zero", "data", "offset", "depth", "filename",
                  "compressed")


class _ExtentFields(tuple):
    """Extent's fields: what collections.namedtuple would make, written out
    (importing collections costs about 2 ms of every start-up)."""

    __slots__ = ()
    _fields = _EXTENT_FIELDS

    def __new__(cls, start: int, length: int, present: bool, zero: bool, data: bool,
                offset: int | None, depth: int, filename: str | None = None,
                compressed: bool = False):
        return tuple.__new__(cls, (start, length, present, zero, data, offset, depth,
                                   filename, compressed))

    def __getnewargs__(self):
        return tuple(self)

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={value!r}" for name, value in zip(self._fields, self))
        return f"Extent({inner})"

    start = property(itemgetter(0))
    length = property(itemgetter(1))
    present = property(itemgetter(2))
    zero = property(itemgetter(3))
    data = property(itemgetter(4))
    offset = property(itemgetter(5))
    depth = property(itemgetter(6))
    filename = property(itemgetter(7))
    compressed = property(itemgetter(8))


class Extent(_ExtentFields):
    """A run of guest bytes ``[start, start + length)`` with one status.

    The fields mean what qemu-img map's members mean:

    ``present``  allocated somewhere in the chain (false: nothing in the
                 chain has it; it reads as zeros because the chain ends)
    ``zero``     reads as zeros
    ``data``     the bytes come from a file (normal or compressed data; a
                 data cluster of a metadata-preallocated qcow2 that is a hole
                 in the file has ``zero`` and ``data``, a preallocated zero
                 cluster has ``zero`` and an ``offset`` but no ``data``)
    ``offset``   host offset of the data in ``filename``, when it is stored
                 there contiguously and uncompressed; else None
    ``depth``    0 for this image, 1 for its backing file, ...; for
                 unallocated runs, the number of backing files
    ``filename`` the file holding the data (for human map); None if not data
    ``compressed`` the run is stored compressed (qemu-img 8.2's member)

    An immutable value: a tuple with named fields (cheap to make: a fragmented image
    has one per cluster, and a dataclass would also cost start-up time).
    """

    __slots__ = ()

    @property
    def end(self) -> int:
        return self.start + self.length

    def same_status(self, other: "Extent") -> bool:
        """True if ``other`` directly follows this run and can be merged into it.

        That is qemu-img map's merge rule: same depth, present, zero, data,
        compressed and file, and host offsets (if any) contiguous.
        """
        if (other.start != self.end or other.depth != self.depth
                or other.present != self.present or other.zero != self.zero
                or other.data != self.data or other.compressed != self.compressed
                or other.filename != self.filename):
            return False
        if self.offset is None or other.offset is None:
            return self.offset is None and other.offset is None
        return other.offset == self.offset + self.length

    def merged(self, other: "Extent") -> "Extent":
        """This run extended by ``other`` (which must satisfy ``same_status``)."""
        return Extent(self.start, self.length + other.length, self.present, self.zero,
                      self.data, self.offset, self.depth, self.filename, self.compressed)

    def clipped(self, start: int, end: int) -> "Extent":
        """The part of this run inside ``[start, end)`` (offset moved along)."""
        s = max(start, self.start)
        e = min(end, self.end)
        off = None if self.offset is None else self.offset + (s - self.start)
        return Extent(s, e - s, self.present, self.zero, self.data, off, self.depth,
                      self.filename, self.compressed)

    def deeper(self, levels: int = 1) -> "Extent":
        """The same run seen from ``levels`` images higher in the chain."""
        return Extent(self.start, self.length, self.present, self.zero, self.data,
                      self.offset, self.depth + levels, self.filename, self.compressed)


class MapStatus:
    """What qemu-img map compares, besides contiguity, to merge two ranges.

    ``depth``, ``present``, ``zero`` and ``data`` as in :class:`Extent`;
    ``filename`` the file holding the data where a host offset is shown,
    else None. Made only by :meth:`of`, which interns them: equal statuses
    are the same object, so map compares them with ``is`` (a fragmented
    image has one range per cluster).
    """

    __slots__ = ("depth", "present", "zero", "data", "filename", "_deeper")
    _interned: dict[tuple, "MapStatus"] = {}

    def __init__(self, depth: int, present: bool, zero: bool, data: bool,
                 filename: str | None) -> None:
        self.depth, self.present, self.zero, self.data = depth, present, zero, data
        self.filename = filename
        self._deeper: MapStatus | None = None

    @classmethod
    def of(cls, depth: int, present: bool, zero: bool, data: bool,
           filename: str | None = None) -> "MapStatus":
        key = (depth, bool(present), bool(zero), bool(data), filename)
        status = cls._interned.get(key)
        if status is None:
            status = cls._interned[key] = cls(*key)
        return status

    def deeper(self) -> "MapStatus":
        """The same status seen from the image above (one level deeper)."""
        status = self._deeper
        if status is None:
            status = self._deeper = MapStatus.of(self.depth + 1, self.present, self.zero,
                                                 self.data, self.filename)
        return status

    def __repr__(self) -> str:
        return (f"MapStatus(depth={self.depth}, present={self.present}, zero={self.zero}, "
                f"data={self.data}, filename={self.filename!r})")


def merge_extents(extents: Iterator[Extent]) -> Iterator[Extent]:
    """Merge adjacent runs with the same status (qemu-img map's rule)."""
    current: Extent | None = None
    for ext in extents:
        if current is not None and current.same_status(ext):
            current = current.merged(ext)
            continue
        if current is not None:
            yield current
        current = ext
    if current is not None:
        yield current


class SnapshotInfo:
    """One internal snapshot, as ``qemu-img info`` / ``snapshot -l`` show it.

    ``id`` and ``name`` are strings; ``vm_state_size`` bytes; ``date_sec`` /
    ``date_nsec`` the wall-clock time it was taken; ``vm_clock_nsec`` the
    guest clock (ns); ``icount`` the instruction count or None when the
    snapshot records none; ``disk_size`` the virtual size at the time (None
    if not recorded, then it is the image's size).
    """

    __slots__ = ("id", "name", "vm_state_size", "date_sec", "date_nsec", "vm_clock_nsec",
                 "icount", "disk_size", "l1_table_offset", "l1_size", "extra", "incomplete")

    def __init__(self, id: str, name: str, vm_state_size: int, date_sec: int, date_nsec: int,
                 vm_clock_nsec: int, icount: int | None, disk_size: int | None,
                 l1_table_offset: int = 0, l1_size: int = 0, extra: bytes = b"") -> None:
        self.id = id
        self.name = name
        self.vm_state_size = vm_state_size
        self.date_sec = date_sec
        self.date_nsec = date_nsec
        self.vm_clock_nsec = vm_clock_nsec
        self.icount = icount
        self.disk_size = disk_size
        self.l1_table_offset = l1_table_offset
        self.l1_size = l1_size
        self.extra = extra
        #: the table entry runs past the end of the file (read as zeros)
        self.incomplete = False

    def __repr__(self) -> str:
        return f"SnapshotInfo(id={self.id!r}, name={self.name!r})"

    @property
    def vm_clock_sec(self) -> int:
        return self.vm_clock_nsec // 1_000_000_000

    def to_json(self) -> dict[str, Any]:
        """The SnapshotInfo members qemu-img info --output=json prints (schema order).

        The caller decides the printed order (qemu-img uses hash order).
        """
        out: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "vm-state-size": self.vm_state_size,
            "date-sec": self.date_sec,
            "date-nsec": self.date_nsec,
            "vm-clock-sec": self.vm_clock_nsec // 1_000_000_000,
            "vm-clock-nsec": self.vm_clock_nsec % 1_000_000_000,
        }
        if self.icount is not None:
            out["icount"] = self.icount
        return out


#: the largest virtual size QEMU's block layer accepts (INT64_MAX rounded
#: down to 1 GiB, its BDRV_MAX_LENGTH); resizes beyond it are refused
#: before any driver sees them
BDRV_MAX_LENGTH = ((1 << 63) - 1) // (1 << 30) * (1 << 30)


def check_new_size(size: int) -> None:
    """Refuse a new virtual size as QEMU's bdrv_co_truncate does, before the
    driver is asked (``size`` as QEMU's int64_t: 2^63 and above are negative)."""
    from imagetools.errors import ImageError
    if size < 0 or size >= 1 << 63:
        raise ImageError("Image size cannot be negative")
    if size > BDRV_MAX_LENGTH:
        raise ImageError(f"offset({size}) exceeds maximum({BDRV_MAX_LENGTH})")


#: items per batch of :meth:`Driver.map_runs`
_MAP_BATCH = 1024


class Driver:
    """An open image. Subclasses implement the methods that raise here.

    A driver object is not thread-safe: use it from one thread at a time
    (the compressor it hands out is the exception).
    """

    #: the name used by -f/-O and in info ("raw", "qcow2", ...)
    format_name: str = ""
    #: whether images of this format can have a backing file
    supports_backing: bool = False
    #: whether the engine can open images of this format (probe-only
    #: drivers for formats QEMU knows but qimg does not handle yet say False)
    can_open: bool = True

    def __init__(self, filename: str, *, read_only: bool = True) -> None:
        self.filename = filename
        self.read_only = read_only
        #: the opened backing image, or None
        self.backing: Driver | None = None
        #: whether the format was given (-f) or probed; set by open_image
        self.format_probed = False

    # -- class level: probe, open, create --------------------------------

    @classmethod
    def probe(cls, header: bytes, filename: str) -> int:
        """How sure this format is about a file starting with ``header``.

        0: not this format; 100: certain (magic matches); QEMU's scores.
        ``header`` is at least the first 2048 bytes (less if the file is
        shorter). raw never claims a file by probing (it is the fallback).
        """
        return 0

    @classmethod
    def open(cls, filename: str, *, read_only: bool = True, force_share: bool = False,
             probed: bool = False) -> "Driver":
        """Open one image file of this format (no backing chain, no locks).

        ``probed`` says the format was guessed, not given; raw then refuses
        writes to its first sector that would make it look like another
        format, as QEMU does. Raises :class:`~imagetools.errors.ImageOpenError`
        with qemu-img's reason.
        """
        raise NotImplementedError

    @classmethod
    def create(cls, filename: str, size: int, options: dict[str, Any]) -> None:
        """Create a new image (truncating an existing file), as qemu-img create.

        ``options`` are the ``-o`` options (see the format module for names
        and value types). Raises ImageError with qemu-img's message, without
        the ``FILENAME: `` prefix the CLI adds.
        """
        raise NotImplementedError

    @classmethod
    def measure(cls, options: dict[str, Any], size: int | None = None,
                source: "Driver | None" = None) -> dict[str, int]:
        """``qemu-img measure``: ``{"required", "fully-allocated"[, "bitmaps"]}``.

        Either ``size`` (--size) or ``source`` (an open image, whole chain)
        is given; ``options`` are the target's -o options.
        """
        from imagetools.errors import UnsupportedError
        raise UnsupportedError(f"Block driver '{cls.format_name}' does not support size "
                               "measurement")

    # -- size and data -------------------------------------------------

    @property
    def size(self) -> int:
        """Virtual (guest-visible) size in bytes."""
        raise NotImplementedError

    def read(self, offset: int, length: int) -> bytes:
        """Guest bytes ``[offset, offset+length)``, through the backing chain.

        Ranges past the end of the backing chain read as zeros; reading past
        ``size`` is an error.
        """
        raise NotImplementedError

    def read_into(self, offset: int, buf: memoryview | bytearray) -> None:
        """Fill ``buf`` with guest bytes from ``offset`` (avoids a copy where it can)."""
        view = memoryview(buf).cast("B")
        view[:] = self.read(offset, len(view))

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._cannot_write()

    def write_from_fd(self, offset: int, length: int, src_fd: int, src_offset: int) -> None:
        """Write guest ``[offset, offset+length)`` with bytes read from ``src_fd``.

        Drivers move the data inside the kernel (copy_file_range) where the
        format allows; this default reads through a buffer. Bytes past the
        end of the source file are zeros.
        """
        import os
        chunk = 4 << 20
        pos = 0
        while pos < length:
            n = min(chunk, length - pos)
            data = os.pread(src_fd, n, src_offset + pos)
            if len(data) < n:
                data += bytes(n - len(data))
            self.write(offset + pos, data)
            pos += n

    def read_to_fd(self, offset: int, length: int, dst_fd: int, dst_offset: int) -> None:
        """Write guest bytes ``[offset, offset+length)`` to ``dst_fd`` at ``dst_offset``.

        Data stored contiguously moves with copy_file_range; everything else
        (zeros included) is written as read. Convert uses it for data extents.
        """
        import os
        chunk = 4 << 20
        pos = 0
        while pos < length:
            n = min(chunk, length - pos)
            view = memoryview(self.read(offset + pos, n))
            done = 0
            while done < n:
                done += os.pwrite(dst_fd, view[done:], dst_offset + pos + done)
            pos += n

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Make the range read as zeros; with ``unmap`` the space may be freed."""
        self._cannot_write()

    def discard(self, offset: int, length: int) -> None:
        """Forget the range (it may then read from the backing file or as zeros)."""
        self._cannot_write()

    def write_compressed(self, offset: int, data: bytes) -> None:
        """Write one whole cluster compressed (formats that support it).

        ``offset`` is cluster aligned and ``data`` one cluster long (the last
        cluster of the image may be shorter). Data that does not compress is
        written uncompressed, as QEMU does.
        """
        self.write_compressed_blob(offset, self.compressor()(data), len(data))

    def compressor(self) -> Callable[[bytes], bytes | None]:
        """A thread-safe function: one cluster of data -> compressed blob or None.

        It only compresses (zlib/zstd release the GIL), so convert can run it
        in worker threads; the results go to :meth:`write_compressed_blob` in
        guest order. None means "does not compress, store it plain".
        """
        raise NotImplementedError(f"{self.format_name} does not support compression")

    def write_compressed_blob(self, offset: int, blob: bytes | None, length: int,
                              plain: bytes | None = None) -> None:
        """Store one cluster at guest ``offset`` given the compressor's result.

        ``blob`` is what :meth:`compressor` returned for the cluster's data;
        if it is None the cluster is written uncompressed from ``plain``.
        """
        self._cannot_write(f"{self.format_name} does not support compression")

    def _cannot_write(self, why: str = "") -> None:
        """The write methods' default: a read-only image says so (as a
        driver that writes would), any other this driver cannot write."""
        if self.read_only:
            import errno
            from imagetools.errors import ImageIOError
            raise ImageIOError("Image is read-only", errno.EACCES)
        raise NotImplementedError(why)

    # -- status --------------------------------------------------------

    def block_status(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        """Extents covering ``[offset, offset+length)`` in order, through the chain.

        Adjacent extents may have equal status; callers merge as they need
        (:func:`merge_extents` applies qemu-img map's rule).
        """
        raise NotImplementedError

    def map_runs(self, offset: int, length: int) -> Iterator[list[tuple]]:
        """:meth:`block_status` in qemu-img map's terms, in batches (lists).

        Each item is ``(start, length, status, offset)``: ``status`` a
        :class:`MapStatus`, ``offset`` the host offset only where qemu-img
        map shows one (ranges with data or that read as zeros), else None.
        Adjacent items may have equal status (the caller merges). When the
        status fails part-way, the items before the failure come as a last
        batch and the error follows, as they would have one by one.

        Drivers may give the same items faster (qcow2 goes from its L2
        tables straight to these tuples); this default works for every one.
        """
        status = MapStatus.of
        batch: list[tuple] = []
        try:
            for ext in self.block_status(offset, length):
                host = ext.offset
                if host is not None and not (ext.data or ext.zero):
                    host = None
                batch.append((ext.start, ext.length,
                              status(ext.depth, ext.present, ext.zero, ext.data,
                                     None if host is None else ext.filename), host))
                if len(batch) >= _MAP_BATCH:
                    yield batch
                    batch = []
        except Exception:
            if batch:
                yield batch
            raise
        if batch:
            yield batch

    def allocated_size(self) -> int | None:
        """Bytes the image occupies on the host ("disk size"), if known."""
        return None

    def has_zero_init(self) -> bool:
        """Whether unwritten ranges of a freshly created image read as zeros."""
        return False

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

    @property
    def data_filename(self) -> str | None:
        """Name of an external data file as recorded (qcow2 data_file), or None."""
        return None

    @property
    def encrypted(self) -> bool:
        return False

    def format_specific(self) -> dict[str, Any] | None:
        """``format-specific`` of qemu-img info JSON (``{"type": ..., "data": ...}``)."""
        return None

    def is_dirty(self) -> bool:
        return False

    def snapshots(self) -> list[SnapshotInfo]:
        """Internal snapshots in table order (empty for formats without them)."""
        return []

    def open_snapshot(self, name_or_id: str) -> "Driver":
        """A read-only view of an internal snapshot's content (convert -l / -s)."""
        from imagetools.errors import UnsupportedError
        raise UnsupportedError(f"Failed to load snapshot: {self.format_name} images have "
                               "no internal snapshots")

    def check(self) -> "CheckResult":
        """Consistency check (detection only), as qemu-img check reports it."""
        from imagetools.errors import CheckNotSupported
        raise CheckNotSupported()

    # -- changing the image's structure (snapshot, resize, commit, rebase,
    #    amend, check -r); added for the snapshot/commit issue. Formats
    #    that cannot do one raise what QEMU's generic layer says.

    def repair(self, mode: str) -> "CheckResult":
        """``qemu-img check -r leaks|all``: check and repair in one pass.

        Returns the first pass's result (with the ``*_fixed`` counters); the
        caller checks again to report the state after the repair. Formats
        that repair nothing report what ``check`` finds.
        """
        return self.check()

    def create_snapshot(self, name: str, *, date_sec: int, date_nsec: int,
                        vm_clock_nsec: int = 0, vm_state_size: int = 0,
                        icount: int | None = None) -> SnapshotInfo:
        """Take an internal snapshot of the current state (qemu-img snapshot -c).

        Raises ImageIOError with an ``errno`` (qemu-img prints ``-N (text)``).
        """
        import errno as errno_
        from imagetools.errors import ImageIOError
        raise ImageIOError("Operation not supported", errno_.ENOTSUP)

    def apply_snapshot(self, name_or_id: str) -> None:
        """Revert the image to an internal snapshot (ID first, then name)."""
        from imagetools.errors import UnsupportedError
        raise UnsupportedError("Block driver does not support snapshots")

    def delete_snapshot(self, snapshot_id: str | None, name: str | None) -> None:
        """Delete the internal snapshot matching ``snapshot_id`` and/or ``name``."""
        import errno as errno_
        from imagetools.errors import ImageIOError
        raise ImageIOError("Operation not supported", errno_.ENOTSUP)

    def truncate(self, size: int, *, prealloc: str = "off") -> None:
        """Change the virtual size (qemu-img resize; shrinking drops the tail)."""
        from imagetools.errors import UnsupportedError
        raise UnsupportedError("Image format driver does not support resize")

    def make_empty(self) -> None:
        """Drop every allocation of this image (not its backing files): after a
        commit, the image shows its backing file again. Unsupported formats
        leave the image as it is (qemu-img commit ignores that)."""
        from imagetools.errors import UnsupportedError
        raise UnsupportedError("Operation not supported")

    def change_backing_file(self, filename: str | None, fmt: str | None) -> None:
        """Record a new backing file name and format (None: no backing file)."""
        from imagetools.errors import UnsupportedError
        raise UnsupportedError("Operation not supported")

    def amend(self, options: dict[str, Any], *, force: bool = False,
              progress: Callable[[int, int], None] | None = None) -> None:
        """qemu-img amend: change format options of an existing image."""
        from imagetools.errors import UnsupportedError
        raise UnsupportedError(f"Format driver '{self.format_name}' does not support "
                               "option amendment")

    def chain(self) -> Iterator["Driver"]:
        """This image, then its backing file, then that one's, ..."""
        node: Driver | None = self
        while node is not None:
            yield node
            node = node.backing

    # -- lifetime ------------------------------------------------------

    #: qemu-img's -t/-T cache modes; "unsafe" drops every fdatasync
    CACHE_MODES = ("none", "writeback", "writethrough", "directsync", "unsafe")

    def host_files(self) -> list:
        """The HostFile objects this image (not its backing files) keeps open."""
        files = [f for f in (getattr(self, "file", None), getattr(self, "data_file", None))
                 if f is not None]
        return files

    def set_cache_mode(self, mode: str) -> None:
        """Apply a qemu-img cache mode (-t / -T) to this image's files.

        Only the flushing behaviour matters here: with "unsafe" nothing is
        ever fdatasync'ed (write order is still kept, so a killed process
        leaves a consistent image; a power loss may not). The other modes
        flush where QEMU's writeback mode does (metadata ordering, close).
        """
        if mode not in self.CACHE_MODES:
            from imagetools.errors import UsageError
            raise UsageError(f"Invalid cache option: {mode}")
        for f in self.host_files():
            f.no_flush = mode == "unsafe"

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "Driver":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
