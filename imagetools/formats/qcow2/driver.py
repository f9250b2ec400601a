"""The qcow2 driver: opening, metadata, writeback and closing.

The read side (cluster map, reads, block status) is :mod:`.read`, a mixin
of :class:`Qcow2Driver`. The write side (writes, zero writes, discards,
compressed clusters) is :class:`.write.Qcow2Writer`, the subclass that
``open`` returns for a writable open; it is only imported then, which keeps
read-only commands such as ``info`` quick to start. This module owns the
metadata lifecycle: tables are changed in memory and written back in the order
data -> refcounts -> L2 -> L1, with flushes in between, so that being
killed at any moment leaves at worst leaked clusters (see ``writeback``).
"""

from __future__ import annotations

import os
import struct

from imagetools.errors import CorruptImageError, ImageError, ImageIOError, ImageOpenError
from imagetools.formats import magic
from imagetools.formats.base import Driver, SnapshotInfo
from imagetools.formats.hostfile import HostFile
from imagetools.formats.qcow2 import header as hdr
from imagetools.formats.qcow2.layout import Layout
from imagetools.formats.qcow2.read import Qcow2Reader
from imagetools.formats.qcow2.refcount import Refcounts
from imagetools.formats.qcow2.tables import L1Table, L2Cache

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from typing import Any, Callable


class Qcow2Driver(Qcow2Reader, Driver):
    format_name = "qcow2"
    supports_backing = True

    # -- opening ----------------------------------------------------------

    @classmethod
    def probe(cls, header: bytes, filename: str) -> int:
        return magic.probe_qcow2(header, filename)

    #: open() takes ``check_mode`` (see imagetools.image.open_image's ``check``)
    supports_check_mode = True

    @classmethod
    def open(cls, filename: str, *, read_only: bool = True, force_share: bool = False,
             probed: bool = False, check_mode: bool = False) -> "Qcow2Driver":
        if not read_only:
            from imagetools.formats.qcow2.write import Qcow2Writer as cls
        file = HostFile.open(filename, read_only=read_only, force_share=force_share)
        try:
            return cls(file, filename, read_only=read_only, force_share=force_share,
                       check_mode=check_mode)
        except ImageOpenError:
            file.close()
            raise
        except ImageError as err:
            file.close()
            raise ImageOpenError(filename, str(err)) from None
        except BaseException:
            file.close()
            raise

    @classmethod
    def create(cls, filename: str, size: int, options: dict[str, Any]) -> None:
        from imagetools.formats.qcow2.create import create
        create(filename, size, options)

    @classmethod
    def measure(cls, options: dict[str, Any], size: int | None = None,
                source: Driver | None = None) -> dict[str, int]:
        from imagetools.formats.qcow2.measure import measure
        return measure(options, size, source)

    def __init__(self, file: HostFile, filename: str, *, read_only: bool,
                 force_share: bool = False, check_mode: bool = False) -> None:
        super().__init__(filename, read_only=read_only)
        self.file = file
        self.force_share = force_share
        self.data_file: HostFile | None = None
        self._closed = False
        length = file.length()
        first = file.pread_full(0, 512)
        bits = struct.unpack_from(">I", first, 20)[0]
        if hdr.MIN_CLUSTER_BITS <= bits <= hdr.MAX_CLUSTER_BITS and first[:4] == hdr.QCOW_MAGIC:
            first = file.pread_full(0, 1 << bits)
        self.header = h = hdr.parse_header(first, length, check_mode=check_mode)
        #: problems found while opening in check mode (reported by check())
        self.open_errors: list[str] = []
        #: why a check cannot run at all (qemu-img: "Check failed: ...")
        self.open_failed: str | None = None
        if h.incompatible_features & hdr.INCOMPAT_CORRUPT and not read_only and not check_mode:
            raise CorruptImageError("qcow2: Image is corrupt; cannot be opened read/write")
        self.layout = Layout(h)
        self.cluster_bits = h.cluster_bits
        self._cluster_size = h.cluster_size
        self._size = h.size
        try:
            self.l1 = L1Table(file, h.l1_table_offset, h.l1_size)
        except ImageIOError as err:
            raise ImageError(f"Could not read L1 table: {_reason(err)}") from None
        try:
            self.refcounts = Refcounts(file, self.layout, h.refcount_table_offset,
                                       h.refcount_table_clusters,
                                       update_header=self._write_reftable_pointer,
                                       read_only=read_only)
        except ImageIOError as err:
            raise ImageError(f"Could not initialize refcount handling: {_reason(err)}") \
                from None
        self.l2_cache = L2Cache(file, self.layout)
        self._open_data_file(filename)
        self._snapshots = []
        if h.nb_snapshots:
            from imagetools.formats.qcow2.snapshots import read_snapshots
            try:
                self._snapshots = read_snapshots(file, h)
            except CorruptImageError as err:
                if not check_mode:
                    raise
                self.open_errors.append(f"ERROR snapshot table: {err}")
            except ImageIOError as err:
                message = f"Failed to read snapshot table: {_reason(err)}"
                if not check_mode:
                    raise ImageError(message) from None
                self.open_errors.append(f"ERROR failed to read the snapshot table: {message}")
                self.open_failed = _reason(err)
        self._bitmaps = None
        self._compressed_cache: tuple[int, bytes] | None = None
        self._prealloc_detected: bool | None = None
        self._first_write_done = False
        self._overlap = None
        self._corruption_reported = False
        self._init_writer()
        if not read_only and self.is_dirty() and not check_mode:
            self._repair_dirty()

    def _init_writer(self) -> None:
        """Set up the write side's state (a writable open's class does)."""

    def _repair_dirty(self) -> None:
        """A dirty image (killed with lazy refcounts) is repaired before writing,
        as QEMU does: check -r all, its lines on stderr."""
        import os
        from imagetools.formats.qcow2.repair import FIX_ERRORS, FIX_LEAKS, check_and_repair
        from imagetools.image import warn
        self._first_write_done = True
        result = check_and_repair(self, FIX_LEAKS | FIX_ERRORS)
        for line in result.messages:
            warn(line)
        if result.check_errors or result.repair_errno:
            reason = os.strerror(result.repair_errno or 5)
            raise ImageError(f"Could not repair dirty image: {reason}")
        self._first_write_done = False

    def _open_data_file(self, filename: str) -> None:
        h = self.header
        if h.incompatible_features & hdr.INCOMPAT_DATA_FILE:
            name = h.data_file
            if not name:
                raise ImageError("'data-file' is required for this image")
            path = _data_file_path(filename, name)
            self.data_file = HostFile.open(path, read_only=self.read_only,
                                           force_share=self.force_share, data_file=True)
            self.data_filename_resolved = path
        elif h.autoclear_features & hdr.AUTOCLEAR_DATA_FILE_RAW:
            raise ImageError("data-file-raw requires a data file")

    # -- properties --------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    @property
    def cluster_size(self) -> int:
        return self._cluster_size

    @property
    def backing_filename(self) -> str | None:
        return self.header.backing_file

    @property
    def backing_format(self) -> str | None:
        return self.header.backing_format

    @property
    def data_filename(self) -> str | None:
        if self.header.incompatible_features & hdr.INCOMPAT_DATA_FILE:
            return self.header.data_file
        return None

    @property
    def data_file_raw(self) -> bool:
        return bool(self.data_file and self.header.autoclear_features
                    & hdr.AUTOCLEAR_DATA_FILE_RAW)

    @property
    def encrypted(self) -> bool:
        return self.header.crypt_method != hdr.CRYPT_NONE

    @property
    def corrupt(self) -> bool:
        return bool(self.header.incompatible_features & hdr.INCOMPAT_CORRUPT)

    @property
    def lazy_refcounts(self) -> bool:
        return bool(self.header.compatible_features & hdr.COMPAT_LAZY_REFCOUNTS)

    def is_dirty(self) -> bool:
        return bool(self.header.incompatible_features & hdr.INCOMPAT_DIRTY)

    def snapshots(self) -> list[SnapshotInfo]:
        return list(self._snapshots)

    def bitmaps(self):
        """Persistent bitmaps (name, granularity, flags), as info shows them."""
        if self._bitmaps is None:
            from imagetools.formats.qcow2.bitmaps import read_bitmaps
            self._bitmaps = read_bitmaps(self.file, self.header)
        return self._bitmaps

    def allocated_size(self) -> int | None:
        # as qemu-img 7.2: the image file only, not an external data file
        return self.file.allocated()

    def has_zero_init(self) -> bool:
        if self.data_file is not None and self.data_file.is_block:
            return False
        return True

    def format_specific(self) -> dict[str, Any]:
        h = self.header
        data: dict[str, Any] = {"compat": "1.1" if h.version >= 3 else "0.10"}
        if h.version >= 3:
            if self.data_filename is not None:
                data["data-file"] = self.data_filename
                data["data-file-raw"] = bool(h.autoclear_features & hdr.AUTOCLEAR_DATA_FILE_RAW)
            data["extended-l2"] = h.extended_l2
            data["lazy-refcounts"] = self.lazy_refcounts
            data["corrupt"] = self.corrupt
        data["refcount-bits"] = h.refcount_bits
        if h.crypt_method == hdr.CRYPT_AES:
            data["encrypt"] = {"format": "aes"}
        elif h.crypt_method == hdr.CRYPT_LUKS:
            data["encrypt"] = self._luks_info()
        if h.extension(hdr.EXT_BITMAPS) is not None and \
                h.autoclear_features & hdr.AUTOCLEAR_BITMAPS:
            data["bitmaps"] = [{"name": b.name, "granularity": b.granularity,
                                "flags": b.flag_names()} for b in self.bitmaps()]
        data["compression-type"] = hdr.COMPRESSION_NAMES[h.compression_type]
        return {"type": "qcow2", "data": data}

    def _luks_info(self) -> dict[str, Any]:
        """The ``encrypt`` member for a LUKS-encrypted image (format + LUKS header)."""
        ext = self.header.extension(hdr.EXT_CRYPTO_HEADER)
        info: dict[str, Any] = {"format": "luks"}
        if ext is None or len(ext.data) != 16:
            return info
        offset, length = struct.unpack(">QQ", ext.data)
        if length > 1 << 24:
            raise CorruptImageError("The encryption header is too large")
        from imagetools.formats.qcow2.crypto import luks_info
        info.update(luks_info(self.file.pread_full(offset, max(length, 592))))
        return info

    def compressor(self) -> Callable[[bytes], bytes | None]:
        from imagetools.formats.qcow2 import compression   # zlib: only when used
        fn = compression.compressor(self.header.compression_type, self._cluster_size)
        cs = self._cluster_size

        def compress_cluster(data: bytes) -> bytes | None:
            if len(data) < cs:
                data = bytes(data) + bytes(cs - len(data))
            return fn(data)
        return compress_cluster

    # -- snapshots -----------------------------------------------------------

    def open_snapshot(self, name_or_id: str) -> Driver:
        from imagetools.formats.qcow2.snapshots import find_snapshot
        from imagetools.formats.qcow2.snapview import SnapshotView
        snap = find_snapshot(self._snapshots, name_or_id)
        if snap is None:
            raise ImageError("Failed to load snapshot: Can't find snapshot")
        return SnapshotView(self, snap)

    def create_snapshot(self, name: str, *, date_sec: int, date_nsec: int,
                        vm_clock_nsec: int = 0, vm_state_size: int = 0,
                        icount: int | None = None) -> SnapshotInfo:
        from imagetools.formats.qcow2 import snapshot_ops
        return snapshot_ops.create(self, name, date_sec=date_sec, date_nsec=date_nsec,
                                   vm_clock_nsec=vm_clock_nsec, vm_state_size=vm_state_size,
                                   icount=icount)

    def apply_snapshot(self, name_or_id: str) -> None:
        from imagetools.errors import ImageIOError
        from imagetools.formats.qcow2 import snapshot_ops
        if self.header.extension(hdr.EXT_BITMAPS) is not None and self.bitmaps():
            raise ImageError("Device has active dirty bitmaps")
        try:
            snapshot_ops.apply(self, name_or_id)
        except ImageIOError as err:
            raise ImageError(f"Failed to load snapshot: {err}") from None

    def delete_snapshot(self, snapshot_id: str | None, name: str | None) -> None:
        from imagetools.formats.qcow2 import snapshot_ops
        snapshot_ops.delete(self, snapshot_id, name)

    def amend(self, options, *, force: bool = False, progress=None) -> None:
        from imagetools.formats.qcow2.amend import amend
        amend(self, options, force=force, progress=progress)

    def make_empty(self) -> None:
        from imagetools.formats.qcow2.empty import make_empty
        make_empty(self)

    def truncate(self, size: int, *, prealloc: str = "off") -> None:
        from imagetools.formats.qcow2.resize import truncate
        truncate(self, size, prealloc)

    def _writable_metadata(self) -> None:
        """Refuse metadata changes on read-only or corrupt images."""
        import errno
        from imagetools.errors import ImageIOError
        if self.read_only:
            raise ImageIOError("Image is read-only", errno.EACCES)
        if self.corrupt:
            raise ImageIOError("qcow2: Image is corrupt; cannot be written to", errno.EIO)

    def _reload_metadata(self) -> None:
        """Re-read the header and every table after the metadata was replaced."""
        file = self.file
        h = hdr.parse_header(file.pread_full(0, self._cluster_size), file.length())
        self.header = h
        self.layout = Layout(h)
        self._size = h.size
        self.l1 = L1Table(file, h.l1_table_offset, h.l1_size)
        self.refcounts = Refcounts(file, self.layout, h.refcount_table_offset,
                                   h.refcount_table_clusters,
                                   update_header=self._write_reftable_pointer,
                                   read_only=self.read_only)
        self.l2_cache = L2Cache(file, self.layout)
        self._snapshots = []
        if h.nb_snapshots:
            from imagetools.formats.qcow2.snapshots import read_snapshots
            self._snapshots = read_snapshots(file, h)
        self._compressed_cache = None
        self._prealloc_detected = None

    # -- check -----------------------------------------------------------------

    def check(self):
        from imagetools.formats.qcow2.check import check_image
        self.writeback()
        return check_image(self)

    def repair(self, mode: str):
        from imagetools.formats.qcow2.repair import MODES, check_and_repair
        self._writable_check()
        return check_and_repair(self, MODES[mode])

    def _writable_check(self) -> None:
        import errno
        from imagetools.errors import ImageIOError
        if self.read_only:
            raise ImageIOError("Image is read-only", errno.EACCES)

    # -- metadata writeback ------------------------------------------------

    def _sync(self) -> None:
        if self.data_file is not None:
            self.data_file.flush()
        self.file.flush()

    def writeback(self) -> None:
        """Write changed metadata in crash-safe order (see the module docstring).

        Data clusters were written when allocated. Then: refcount blocks and
        refcount table (new clusters are counted before anything points at
        them), flush, L2 tables, L1 entries, flush. Clusters freed by the
        changed tables are only now decremented (in memory; written by the
        next writeback), so nothing on disk ever points at a free cluster.
        """
        if self.read_only:
            return
        rc = self.refcounts
        while True:
            if not (rc.dirty or self.l1.dirty or self.l2_cache.dirty_count
                    or rc.pending_free):
                return
            self._before_metadata_write()
            rc.write_blocks()
            rc.write_table(self._sync)
            self._sync()
            self.l2_cache.write_dirty()
            self.l1.write_dirty()
            self._sync()
            if not rc.pending_free:
                return
            rc.apply_pending_frees()

    def _write_reftable_pointer(self, offset: int, clusters: int) -> None:
        self.file.pwrite(48, struct.pack(">QI", offset, clusters))
        self.header.refcount_table_offset = offset
        self.header.refcount_table_clusters = clusters

    def _write_header(self) -> None:
        """Rewrite the header cluster's used part (fields + extensions)."""
        data = self.header.encode()
        self.file.pwrite(0, data)

    def update_header(self) -> None:
        """Rewrite the header as QEMU's qcow2_update_header lays it out.

        Extensions in QEMU's order (backing format, data file, crypto header,
        feature table -- v3 with clusters over 4 KiB --, bitmaps, then unknown
        ones), QEMU's header length, the backing file name after them; what
        the rest of the header cluster is zeroed, all in one write, as QEMU
        writes it (the header itself stays within the first page, so even a
        write cut short by a kill leaves it whole).
        """
        import errno
        from imagetools.errors import ImageIOError
        h = self.header
        known = (hdr.EXT_BACKING_FORMAT, hdr.EXT_DATA_FILE, hdr.EXT_CRYPTO_HEADER,
                 hdr.EXT_FEATURE_TABLE, hdr.EXT_BITMAPS)
        exts = {e.kind: e for e in h.extensions}
        ordered = []
        for kind in known:
            if kind == hdr.EXT_FEATURE_TABLE:
                if h.version >= 3 and h.cluster_size > 4096:
                    ordered.append(exts.get(kind) or hdr.HeaderExtension(
                        kind, hdr.encode_feature_table()))
            elif kind == hdr.EXT_BACKING_FORMAT and not h.backing_file:
                continue
            elif kind in exts:
                ordered.append(exts[kind])
        ordered += [e for e in h.extensions if e.kind not in known]
        h.extensions = ordered
        h.header_length = (hdr.QEMU_HEADER_LENGTH + len(h.unknown_fields)
                           if h.version >= 3 else hdr.V2_HEADER_LENGTH)
        try:
            data = h.encode()
        except ImageError:
            raise ImageIOError("No space left on device", errno.ENOSPC) from None
        self.file.pwrite(0, data.ljust(self._cluster_size, b"\0"))
        self._sync()

    def change_backing_file(self, filename: str | None, fmt: str | None) -> None:
        import errno
        from imagetools.errors import ImageIOError
        self._writable_metadata()
        if filename and self.data_file_raw:
            raise ImageIOError("Invalid argument", errno.EINVAL)
        if filename and len(filename.encode("utf-8", "surrogateescape")) > 1023:
            raise ImageIOError("Invalid argument", errno.EINVAL)
        self.writeback()
        self._before_metadata_write()
        h = self.header
        saved = (h.backing_file, list(h.extensions))
        h.backing_file = filename or None
        h.set_extension(hdr.EXT_BACKING_FORMAT,
                        fmt.encode("utf-8", "surrogateescape") if fmt and filename else None)
        try:
            self.update_header()
        except ImageError:
            h.backing_file, h.extensions = saved
            raise

    def _set_incompat(self, bit: int, on: bool) -> None:
        h = self.header
        value = (h.incompatible_features | bit) if on else (h.incompatible_features & ~bit)
        if value == h.incompatible_features:
            return
        h.incompatible_features = value
        self.file.pwrite(72, struct.pack(">Q", value))
        self.file.flush()

    def _before_metadata_write(self) -> None:
        """First change of this session: autoclear bits, dirty bit for lazy refcounts."""
        if self._first_write_done:
            return
        self._first_write_done = True
        h = self.header
        if h.version >= 3:
            # Autoclear features we do not maintain must be cleared before a
            # program like us changes the image (unknown ones; the bitmaps bit
            # stays: enabled bitmaps are kept up to date by BitmapTracker).
            keep = h.autoclear_features & (hdr.AUTOCLEAR_DATA_FILE_RAW | hdr.AUTOCLEAR_BITMAPS)
            if h.autoclear_features != keep:
                h.autoclear_features = keep
                self.file.pwrite(88, struct.pack(">Q", keep))
            if self.lazy_refcounts:
                self._set_incompat(hdr.INCOMPAT_DIRTY, True)

    def flush(self) -> None:
        if self._closed or self.read_only:
            return
        self.writeback()

    def close(self) -> None:
        if self._closed:
            return
        try:
            if not self.read_only:
                self.writeback()
                if self._bitmap_tracker is not None:
                    self._bitmap_tracker.finish()
                    self._bitmap_tracker = None
                if self.is_dirty() and self.lazy_refcounts:
                    self._sync()
                    self._set_incompat(hdr.INCOMPAT_DIRTY, False)
        finally:
            self._closed = True
            self.file.close()
            if self.data_file is not None:
                self.data_file.close()
            if self.backing is not None:
                self.backing.close()


def _data_file_path(image: str, name: str) -> str:
    """Where the external data file is: as QEMU 7.2 (relative to the working
    directory) if that exists, else relative to the image's directory."""
    from imagetools.image import resolve_backing_path
    if name.startswith("/") or os.path.exists(name):
        return name
    return resolve_backing_path(image, name)


DRIVER = Qcow2Driver


def _reason(err: ImageIOError) -> str:
    """The strerror QEMU appends to an open failure."""
    return os.strerror(err.errno) if err.errno else str(err)
