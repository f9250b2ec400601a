"""qed: QEMU Enhanced Disk images, read, write, create and check as QEMU 7.2 does.

Layout (little-endian, ../shared/spec/qed.txt): a 64-byte header in the
first ``header_size`` clusters (with the backing file name), an L1 table
and L2 tables of ``table_size`` clusters each, and data clusters. An L2
entry is 0 (unallocated: the backing file shows through), 1 (a zero
cluster, which hides the backing file) or the cluster's file offset.

QEMU's rules kept here: the open-time validation of sizes and table
offsets; ``backing_fmt=raw`` is remembered with the BACKING_FORMAT_NO_PROBE
feature (any other backing format is probed); new clusters are appended at
the end of the file (data first, then a new L2 table, then the L1 entry);
partial writes into new clusters copy the rest from the backing file;
whole-cluster zero writes store zero clusters; an image without backing
file carries NEED_CHECK while allocating writes may be in flight and a
read-write open of such an image checks and repairs it first.

``check`` reports what qemu-img check reports for qed: clusters referenced
twice and invalid table entries as corruptions, unreferenced clusters as
leaks, and the allocated / fragmented / total cluster counts.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from typing import Any, Iterator

from imagetools.errors import CorruptImageError, ImageError, ImageOpenError
from imagetools.formats._common import (CheckResult, OptionSpec, file_preallocation, is_pow2,
                                        le_table, new_host_file, refuse_options, round_up,
                                        size_option, table_bytes)
from imagetools.formats._mapped import DATA, UNALLOC, ZERO, MappedDriver, Run
from imagetools.formats._writes import ClusterMap
from imagetools.formats.hostfile import HostFile

MAGIC = 0x00444551
HEADER = struct.Struct("<IIIIQQQQQII")
F_BACKING_FILE = 0x01
F_NEED_CHECK = 0x02
F_BACKING_FORMAT_NO_PROBE = 0x04
FEATURE_MASK = F_BACKING_FILE | F_NEED_CHECK | F_BACKING_FORMAT_NO_PROBE
MIN_CLUSTER_SIZE = 4096
MAX_CLUSTER_SIZE = 64 << 20
DEFAULT_CLUSTER_SIZE = 64 << 10
MIN_TABLE_SIZE = 1
MAX_TABLE_SIZE = 16
DEFAULT_TABLE_SIZE = 4
ZERO_CLUSTER = 1
#: L2 tables kept in memory (each table_size clusters; 256 KiB by default)
L2_CACHE_TABLES = 64
MAX_BACKING_NAME = 4095


def cluster_size_valid(n: int) -> bool:
    return is_pow2(n) and MIN_CLUSTER_SIZE <= n <= MAX_CLUSTER_SIZE


def table_size_valid(n: int) -> bool:
    return is_pow2(n) and MIN_TABLE_SIZE <= n <= MAX_TABLE_SIZE


def max_image_size(cluster_size: int, table_size: int) -> int:
    entries = cluster_size * table_size // 8
    return entries * entries * cluster_size


class QedHeader:
    FIELDS = ("magic", "cluster_size", "table_size", "header_size", "features",
              "compat_features", "autoclear_features", "l1_table_offset", "image_size",
              "backing_filename_offset", "backing_filename_size")

    def __init__(self, raw: bytes) -> None:
        for name, value in zip(self.FIELDS, HEADER.unpack_from(raw)):
            setattr(self, name, value)

    def pack(self) -> bytes:
        return HEADER.pack(*(getattr(self, n) for n in self.FIELDS))


class QedDriver(MappedDriver):
    format_name = "qed"
    supports_backing = True

    create_options = (
        OptionSpec("size", "size", "Virtual disk size"),
        OptionSpec("backing_file", "str", "File name of a base image"),
        OptionSpec("backing_fmt", "str", "Image format of the base image"),
        OptionSpec("cluster_size", "size", "Cluster size (in bytes)", str(DEFAULT_CLUSTER_SIZE)),
        OptionSpec("table_size", "size", "L1/L2 table size (in clusters)"),
    )

    def __init__(self, file: HostFile, *, read_only: bool) -> None:
        super().__init__(file, read_only=read_only)
        self.header = h = QedHeader(file.pread_full(0, HEADER.size))
        self._validate(h)
        cs = h.cluster_size
        self.entries = cs * h.table_size // 8
        self.table_bytes = cs * h.table_size
        self._size = h.image_size
        self._backing_name: str | None = None
        if h.features & F_BACKING_FILE:
            self._backing_name = self._read_backing_name(h)
        self.l1 = self._read_table(h.l1_table_offset)
        self._l2_cache: OrderedDict[int, Any] = OrderedDict()
        self._map = _QedMap(self)
        if not read_only:
            self._open_writable()

    def _validate(self, h: QedHeader) -> None:
        def bad(reason: str) -> ImageOpenError:
            return ImageOpenError(self.filename, reason)

        if h.magic != MAGIC:
            raise bad("Image not in QED format")
        if h.features & ~FEATURE_MASK:
            raise bad(f"Unsupported QED features: {h.features & ~FEATURE_MASK:x}")
        if not cluster_size_valid(h.cluster_size):
            raise bad("QED cluster size is invalid")
        self.file_size = self.file.length() // h.cluster_size * h.cluster_size
        if not table_size_valid(h.table_size):
            raise bad("QED table size is invalid")
        if h.image_size % 512 or h.image_size > max_image_size(h.cluster_size, h.table_size):
            raise bad("QED image size is invalid")
        if not self.table_offset_valid(h.l1_table_offset, h):
            raise bad("QED table offset is invalid")
        if h.header_size > 0xFFFFFFFF // h.cluster_size:
            raise bad("QED header size is too large")

    def cluster_offset_valid(self, offset: int, h: QedHeader | None = None) -> bool:
        h = h or self.header
        return (offset % h.cluster_size == 0 and offset >= h.header_size * h.cluster_size
                and offset < self.file_size)

    def table_offset_valid(self, offset: int, h: QedHeader | None = None) -> bool:
        """A table's clusters all lie in the file (QEMU 7.2 also refuses every
        table of a single cluster here, a bug: such images are accepted)."""
        h = h or self.header
        end = offset + (h.table_size - 1) * h.cluster_size
        return (end >= offset and self.cluster_offset_valid(offset, h)
                and self.cluster_offset_valid(end, h))

    def _read_backing_name(self, h: QedHeader) -> str:
        if h.backing_filename_offset + h.backing_filename_size > h.cluster_size * h.header_size:
            raise ImageOpenError(self.filename, "QED backing filename offset is invalid")
        if h.backing_filename_size > MAX_BACKING_NAME:
            raise ImageOpenError(self.filename, "Failed to read backing filename")
        raw = self.file.pread_full(h.backing_filename_offset, h.backing_filename_size)
        return raw.decode("utf-8", "surrogateescape")

    def _read_table(self, offset: int):
        return le_table(self.file.pread_full(offset, self.table_bytes), 8)

    def _open_writable(self) -> None:
        h = self.header
        if h.autoclear_features:
            h.autoclear_features = 0
            self._write_header()
        if h.features & F_NEED_CHECK:
            self._repair()

    # -- class level --------------------------------------------------------------

    @classmethod
    def create(cls, filename: str, size: int, options: dict[str, Any]) -> None:
        refuse_options(options, ("backing_file", "backing_fmt", "cluster_size", "table_size"))
        file_preallocation(options)
        cluster_size = size_option(options, "cluster_size", DEFAULT_CLUSTER_SIZE)
        table_size = size_option(options, "table_size", DEFAULT_TABLE_SIZE)
        size = round_up(size, 512)
        if not cluster_size_valid(cluster_size):
            raise ImageError(f"QED cluster size must be within range [{MIN_CLUSTER_SIZE}, "
                             f"{MAX_CLUSTER_SIZE}] and power of 2")
        if not table_size_valid(table_size):
            raise ImageError(f"QED table size must be within range [{MIN_TABLE_SIZE}, "
                             f"{MAX_TABLE_SIZE}] and power of 2")
        if size > max_image_size(cluster_size, table_size):
            raise ImageError("QED image size must be a non-zero multiple of cluster size and "
                             f"less than {max_image_size(cluster_size, table_size)} bytes")
        h = QedHeader(bytes(HEADER.size))
        h.magic = MAGIC
        h.cluster_size = cluster_size
        h.table_size = table_size
        h.header_size = 1
        h.l1_table_offset = cluster_size
        h.image_size = size
        backing = options.get("backing_file")
        name = b""
        if backing:
            name = str(backing).encode("utf-8", "surrogateescape")
            h.features |= F_BACKING_FILE
            h.backing_filename_offset = HEADER.size
            h.backing_filename_size = len(name)
            if options.get("backing_fmt") == "raw":
                h.features |= F_BACKING_FORMAT_NO_PROBE
        file = new_host_file(filename)
        try:
            file.pwrite(0, h.pack() + name)
            file.pwrite(cluster_size, bytes(cluster_size * table_size))
            file.flush()
        finally:
            file.close()

    # -- metadata ----------------------------------------------------------------------

    @property
    def cluster_size(self) -> int:
        return self.header.cluster_size

    @property
    def backing_filename(self) -> str | None:
        return self._backing_name

    @property
    def backing_format(self) -> str | None:
        if self._backing_name is not None and self.header.features & F_BACKING_FORMAT_NO_PROBE:
            return "raw"
        return None

    def is_dirty(self) -> bool:
        return False

    # -- mapping ----------------------------------------------------------------------

    def _l2(self, l2_offset: int):
        """The L2 table at ``l2_offset`` (cached; validated first)."""
        table = self._l2_cache.get(l2_offset)
        if table is not None:
            self._l2_cache.move_to_end(l2_offset)
            return table
        if not self.table_offset_valid(l2_offset):
            raise CorruptImageError(f"QED L2 table offset 0x{l2_offset:x} is invalid")
        table = self._read_table(l2_offset)
        self._l2_cache[l2_offset] = table
        while len(self._l2_cache) > L2_CACHE_TABLES:
            oldest = next(iter(self._l2_cache))
            if oldest in self._map.dirty_l2:
                break
            del self._l2_cache[oldest]
        return table

    def _entry(self, index: int) -> int:
        """L2 entry of guest cluster ``index`` (0 when the L2 table is missing)."""
        l1_index, l2_index = divmod(index, self.entries)
        l2_offset = self.l1[l1_index]
        if not l2_offset:
            return 0
        return self._l2(l2_offset)[l2_index]

    def _runs(self, offset: int, length: int) -> Iterator[Run]:
        cs = self.header.cluster_size
        span = cs * self.entries
        end = offset + length
        pos = offset
        while pos < end:
            l1_index = pos // span
            l2_offset = self.l1[l1_index]
            table_end = min(end, (l1_index + 1) * span)
            if not l2_offset:
                yield Run(pos, table_end - pos, UNALLOC)
                pos = table_end
                continue
            table = self._l2(l2_offset)
            while pos < table_end:
                index = pos // cs
                inner = pos - index * cs
                n = min(cs - inner, table_end - pos)
                entry = table[index % self.entries]
                if entry == 0:
                    yield Run(pos, n, UNALLOC)
                elif entry == ZERO_CLUSTER:
                    yield Run(pos, n, ZERO)
                elif not self.cluster_offset_valid(entry):
                    raise CorruptImageError(f"QED cluster offset 0x{entry:x} of guest offset "
                                            f"{pos} is invalid")
                else:
                    yield Run(pos, n, DATA, entry + inner, self.file)
                pos += n

    def has_zero_init(self) -> bool:
        return True

    # -- writes ----------------------------------------------------------------------------

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Whole clusters become zero clusters; partial ones get zero data."""
        self._writable()
        self._check_range(offset, length)
        cs = self.header.cluster_size
        end = offset + length
        head_end = min(end, round_up(offset, cs))
        tail_start = max(head_end, end // cs * cs)
        zeros = bytes(cs)
        if offset < head_end:
            self.write(offset, zeros[:head_end - offset])
        if head_end < tail_start:
            self._map.zero_clusters(head_end // cs, (tail_start - head_end) // cs)
        if tail_start < end:
            self.write(tail_start, zeros[:end - tail_start])

    def _write_header(self) -> None:
        self.file.pwrite(0, self.header.pack())

    def _close_metadata(self) -> None:
        if self.header.features & F_NEED_CHECK:
            self.file.flush()
            self.header.features &= ~F_NEED_CHECK
            self._write_header()
        self.file.flush()

    # -- check ---------------------------------------------------------------------

    def check(self) -> CheckResult:
        return self._check(fix=False)

    def _repair(self) -> None:
        """What QEMU does on a read-write open of an image marked NEED_CHECK."""
        result = self._check(fix=True)
        if not result.corruptions and not result.check_errors:
            self.header.features &= ~F_NEED_CHECK
            self._write_header()
            self.file.flush()

    def _check(self, *, fix: bool) -> CheckResult:
        h = self.header
        cs = h.cluster_size
        nclusters = self.file_size // cs
        used = bytearray(nclusters)
        result = CheckResult(total_clusters=-(-h.image_size // cs))

        def mark(offset: int, n: int) -> bool:
            first = offset // cs
            clean = True
            for c in range(first, first + n):
                if used[c]:
                    result.corruptions += 1
                    clean = False
                used[c] = 1
            return clean

        mark(h.l1_table_offset, h.table_size)
        l1_fixed = False
        for i, l2_offset in enumerate(self.l1):
            if not l2_offset:
                continue
            if not self.table_offset_valid(l2_offset):
                if fix:
                    self.l1[i] = 0
                    l1_fixed = True
                else:
                    result.corruptions += 1
                continue
            if not mark(l2_offset, h.table_size):
                continue
            try:
                table = self._l2(l2_offset)
            except ImageError:
                result.check_errors += 1
                continue
            last = 0
            l2_fixed = False
            for j, entry in enumerate(table):
                if entry in (0, ZERO_CLUSTER):
                    continue
                result.allocated_clusters += 1
                if last and last + cs != entry:
                    result.fragmented_clusters += 1
                last = entry
                if not self.cluster_offset_valid(entry):
                    if fix:
                        table[j] = 0
                        l2_fixed = True
                    else:
                        result.corruptions += 1
                    continue
                mark(entry, 1)
            if l2_fixed:
                self.file.pwrite(l2_offset, table_bytes(table, 0, len(table)))
        if l1_fixed:
            self.file.pwrite(h.l1_table_offset, table_bytes(self.l1, 0, len(self.l1)))
        if not result.check_errors:
            result.leaks = sum(1 for c in range(h.header_size, nclusters) if not used[c])
        return result


class _QedMap(ClusterMap):
    """Cluster allocation: data appended, then any new L2 table, then L1."""

    def __init__(self, drv: QedDriver) -> None:
        self.drv = drv
        self.file = drv.file
        self.unit = drv.header.cluster_size
        self.dirty_l2: dict[int, list[int]] = {}     # l2 offset -> [lo, hi) entries
        self.dirty_l1: list[int] = []
        self.new_l2: set[int] = set()

    def lookup(self, index: int) -> int | None:
        entry = self.drv._entry(index)
        if entry in (0, ZERO_CLUSTER):
            return None
        if not self.drv.cluster_offset_valid(entry):
            raise CorruptImageError(f"QED cluster offset 0x{entry:x} is invalid")
        return entry

    def cow_zero(self, index: int) -> bool:
        return self.drv._entry(index) == ZERO_CLUSTER

    def fill_backing(self, guest_offset: int, view: memoryview) -> None:
        self.drv._read_backing(guest_offset, view)

    def _alloc(self, nbytes: int) -> int:
        drv = self.drv
        host = drv.file_size
        drv.file_size += nbytes
        return host

    def _mark_need_check(self) -> None:
        drv = self.drv
        if drv.backing is None and not drv.header.features & F_NEED_CHECK:
            drv.header.features |= F_NEED_CHECK
            drv._write_header()

    def allocate(self, index: int, count: int) -> int:
        self._mark_need_check()
        return self._alloc(count * self.unit)

    def _set(self, index: int, value: int) -> None:
        drv = self.drv
        l1_index, l2_index = divmod(index, drv.entries)
        l2_offset = drv.l1[l1_index]
        if not l2_offset:
            l2_offset = self._alloc(drv.table_bytes)
            table = le_table(bytes(drv.table_bytes), 8)
            drv._l2_cache[l2_offset] = table
            drv.l1[l1_index] = l2_offset
            self.new_l2.add(l2_offset)
            self.dirty_l1.append(l1_index)
        table = drv._l2(l2_offset)
        table[l2_index] = value
        lo_hi = self.dirty_l2.setdefault(l2_offset, [l2_index, l2_index + 1])
        lo_hi[0] = min(lo_hi[0], l2_index)
        lo_hi[1] = max(lo_hi[1], l2_index + 1)

    def map_units(self, index: int, count: int, host: int) -> None:
        for i in range(count):
            self._set(index + i, host + i * self.unit)

    def zero_clusters(self, index: int, count: int) -> None:
        """Mark whole clusters zero; ones holding data get zeros written in place."""
        try:
            for i in range(index, index + count):
                entry = self.drv._entry(i)
                if entry == ZERO_CLUSTER:
                    continue
                if entry:
                    self.file.write_zero_data(self.lookup(i), self.unit)
                    continue
                self._mark_need_check()
                self._set(i, ZERO_CLUSTER)
        finally:
            self.commit()

    def commit(self) -> None:
        drv = self.drv
        if drv.backing is not None and self.dirty_l2:
            drv.file.flush()       # QEMU: new data reaches the disk before the L2 update
        for l2_offset, (lo, hi) in self.dirty_l2.items():
            table = drv._l2(l2_offset)
            if l2_offset in self.new_l2:
                drv.file.pwrite(l2_offset, table_bytes(table, 0, len(table)))
            else:
                lo8, hi8 = lo // 64 * 64, min(len(table), -(-hi // 64) * 64)
                drv.file.pwrite(l2_offset + lo8 * 8, table_bytes(table, lo8, hi8))
        for l1_index in self.dirty_l1:
            lo8 = l1_index // 64 * 64
            hi8 = min(len(drv.l1), lo8 + 64)
            drv.file.pwrite(drv.header.l1_table_offset + lo8 * 8, table_bytes(drv.l1, lo8, hi8))
        self.dirty_l2 = {}
        self.dirty_l1 = []
        self.new_l2 = set()


DRIVER = QedDriver
