"""VMDK extents: flat files, hosted sparse files (KDMV, incl. streamOptimized) and
VMFS sparse files (COWD), each mapping its own range of the guest disk.

A sparse extent maps grains through a grain directory (QEMU's L1) and grain
tables (L2, 512 entries of u32 sector numbers). A GTE of 0 is unallocated
(the backing file shows through), 1 with the zeroed-grain flag a zero
grain, anything else the sector of the grain -- or, in a compressed extent,
of its grain marker (LBA, size, zlib stream). Writes follow QEMU: a new
grain is written whole at the end of the extent file (copy-on-write from
the backing file, zeros for a zeroed grain) and only then are both grain
table copies updated; compressed extents take whole, unallocated grains
only, appended as grain markers.

Every offset and size read from disk is checked before use; QEMU's open
errors keep QEMU's wording.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any, Iterator

from imagetools.errors import CorruptImageError, ImageError, ImageIOError, UnsupportedError
from imagetools.formats._common import SECTOR, div_round_up, le_table, table_bytes
from imagetools.formats._mapped import DATA, OPAQUE, RECURSE, UNALLOC, ZERO, Run
from imagetools.formats._writes import ClusterMap


VMDK4_MAGIC = b"KDMV"
VMDK3_MAGIC = b"COWD"
SESPARSE_MAGIC = 0xCAFEBABE
FLAG_NL_DETECT = 1 << 0
FLAG_RGD = 1 << 1
FLAG_ZERO_GRAIN = 1 << 2
FLAG_COMPRESS = 1 << 16
FLAG_MARKER = 1 << 17
COMPRESSION_DEFLATE = 1
GD_AT_END = 0xFFFFFFFFFFFFFFFF
GTE_ZEROED = 1
EXTENT_MAX_SECTORS = 1 << 32
MAX_GRAIN_SECTORS = 0x200000
MAX_COMPRESSED_GRAIN = (64 << 20) // 512
MAX_L1_SIZE = 32 * 1024 * 1024
MARKER_EOS, MARKER_GT, MARKER_GD, MARKER_FOOTER = 0, 1, 2, 3

# after the 4-byte magic: version flags capacity granularity desc_offset desc_size
# num_gtes_per_gt rgd_offset gd_offset grain_offset filler check_bytes[4] compress
VMDK4 = struct.Struct("<IIQQQQIQQQB4sH")
# after the magic: version flags disk_sectors granularity l1dir_offset l1dir_size
# file_sectors cylinders heads sectors_per_track
VMDK3 = struct.Struct("<10I")
GT_CACHE = 256


class VmdkOpenError(ImageError):
    """An extent cannot be opened; ``str()`` is QEMU's reason."""


class Extent:
    """One extent: guest sectors ``[start, start + sectors)``."""

    flat = False
    compressed = False
    has_zero_grain = False
    kind = ""                 # descriptor type ("" for a monolithic sparse file)

    def __init__(self, file, sectors: int) -> None:
        self.file = file
        self.sectors = sectors
        self.start = 0        # first guest byte, set by the driver

    @property
    def size(self) -> int:
        return self.sectors * SECTOR

    @property
    def end(self) -> int:
        return self.start + self.size

    @property
    def cluster_bytes(self) -> int:
        return self.size

    def info(self) -> dict[str, Any]:
        """The extent's entry in ImageInfoSpecificVmdk (7.2: an ImageInfo)."""
        out: dict[str, Any] = {"filename": self.file.filename, "format": self.kind}
        out["virtual-size"] = self.size
        if not self.flat:
            out["cluster-size"] = self.cluster_bytes
        if self.compressed:
            out["compressed"] = True
        return out


class FlatExtent(Extent):
    """A raw file (FLAT, VMFS): guest sector s is file sector ``offset + s``."""

    flat = True

    def __init__(self, file, sectors: int, start_sector: int, kind: str) -> None:
        super().__init__(file, sectors)
        self.flat_start = start_sector * SECTOR
        self.kind = kind

    def runs(self, offset: int, length: int) -> Iterator[Run]:
        yield Run(self.start + offset, length, RECURSE, self.flat_start + offset, self.file)

    def write(self, offset: int, view: memoryview, drv) -> None:
        self.file.pwrite(self.flat_start + offset, view)

    def write_zeroes(self, offset: int, length: int, drv) -> None:
        self.file.write_zeroes(self.flat_start + offset, length)

    def check(self, result, first_sector: int) -> bool:
        if self.flat_start >= self.file.length():
            result.error(f"ERROR: cluster offset for sector {first_sector} points after EOF")
            return False
        return True


class SparseExtent(Extent):
    """A hosted sparse (KDMV) or VMFS sparse (COWD) extent file."""

    def __init__(self, file, *, sectors: int, gd_offset: int, rgd_offset: int, l1_size: int,
                 l2_size: int, grain_sectors: int, version: int = 1, flags: int = 0,
                 compressed: bool = False, cowd: bool = False) -> None:
        super().__init__(file, sectors)
        if grain_sectors > MAX_GRAIN_SECTORS:
            raise VmdkOpenError("Invalid granularity, image may be corrupt")
        if l1_size > MAX_L1_SIZE:
            raise VmdkOpenError("L1 size too big")
        self.version = version
        self.flags = flags
        self.cowd = cowd
        self.compressed = compressed
        self.has_marker = bool(flags & FLAG_MARKER)
        self.has_zero_grain = bool(flags & FLAG_ZERO_GRAIN)
        self.grain_sectors = grain_sectors
        self.grain = grain_sectors * SECTOR
        self.l2_size = l2_size
        self.l1_entry_sectors = l2_size * grain_sectors
        self.l1_size = l1_size
        self.gd_offset = gd_offset
        self.rgd_offset = rgd_offset
        self.gd = self._read_gd(gd_offset, "l1 table")
        self.rgd = self._read_gd(rgd_offset, "l1 backup table") if rgd_offset else None
        file_sectors = div_round_up(file.length(), SECTOR)
        self.next_cluster_sector = div_round_up(file_sectors, max(grain_sectors, 1)) * \
            max(grain_sectors, 1)
        self._gt_cache: dict[int, Any] = {}
        self._marker_cache: tuple[int, bytes] | None = None
        #: grains of a compressed extent written in pieces: index -> [data, mask]
        #: (stored compressed once complete, or at close)
        self._pending: dict[int, list[bytearray]] = {}
        self.kind = ""

    @property
    def cluster_bytes(self) -> int:
        return self.grain

    def _read_gd(self, offset: int, what: str):
        nbytes = self.l1_size * 4
        if offset + nbytes > self.file.length() or offset < 0:
            raise VmdkOpenError(f"Could not read {what} from extent '{self.file.filename}': "
                                "Input/output error")
        return le_table(self.file.pread_full(offset, nbytes), 4)

    # -- lookups ---------------------------------------------------------------------

    def _gt(self, gt_sector: int):
        table = self._gt_cache.get(gt_sector)
        if table is None:
            nbytes = self.l2_size * 4
            offset = gt_sector * SECTOR
            if offset + nbytes > self.file.length():
                raise CorruptImageError(f"VMDK grain table at sector {gt_sector} of "
                                        f"'{self.file.filename}' lies beyond the end of the file")
            if len(self._gt_cache) >= GT_CACHE:
                self._gt_cache.pop(next(iter(self._gt_cache)))
            table = le_table(self.file.pread_full(offset, nbytes), 4)
            self._gt_cache[gt_sector] = table
        return table

    def gte(self, grain_index: int) -> int | None:
        """The GTE of a grain (0 when its table is missing); None past the GD."""
        l1_index, l2_index = divmod(grain_index, self.l2_size)
        if l1_index >= self.l1_size:
            return None
        gt_sector = self.gd[l1_index]
        if not gt_sector:
            return 0
        return self._gt(gt_sector)[l2_index]

    def runs(self, offset: int, length: int) -> Iterator[Run]:
        grain = self.grain
        end = offset + length
        pos = offset
        base = self.start
        while pos < end:
            index = pos // grain
            inner = pos - index * grain
            n = min(grain - inner, end - pos)
            if index in self._pending:
                yield Run(base + pos, n, OPAQUE, None, self.file, (self, None, index))
                pos += n
                continue
            entry = self.gte(index)
            if entry is None:
                raise ImageIOError(f"VMDK grain directory of '{self.file.filename}' does not "
                                   f"cover sector {pos // SECTOR}")
            if entry == 0:
                yield Run(base + pos, n, UNALLOC)
            elif entry == GTE_ZEROED and self.has_zero_grain:
                yield Run(base + pos, n, ZERO)
            elif self.compressed:
                yield Run(base + pos, n, OPAQUE, None, self.file, (self, entry, index))
            else:
                yield Run(base + pos, n, DATA, entry * SECTOR + inner, self.file)
            pos += n

    def read_grain(self, entry: int, index: int) -> bytes:
        """One compressed grain, inflated (cached: reads come in pieces)."""
        if entry is None:
            return bytes(self._pending[index][0])
        if self._marker_cache is not None and self._marker_cache[0] == entry:
            return self._marker_cache[1]
        offset = entry * SECTOR
        if self.has_marker:
            _lba, size = struct.unpack("<QI", self.file.pread_full(offset, 12))
            offset += 12
        else:
            size = self.grain
        if not size or size > 2 * self.grain:
            raise ImageIOError(f"Invalid compressed grain at sector {entry} of "
                               f"'{self.file.filename}'")
        data = self.file.pread(offset, size)      # never more than the file holds
        try:
            inflater = zlib.decompressobj()
            out = inflater.decompress(data, self.grain)
        except zlib.error:
            raise ImageIOError(f"Invalid compressed grain at sector {entry} of "
                               f"'{self.file.filename}'") from None
        want = min(self.grain, self.size - index * self.grain)
        if len(out) < want:
            raise ImageIOError(f"Compressed grain at sector {entry} of '{self.file.filename}' "
                               "is short")
        out = out[:self.grain]
        self._marker_cache = (entry, out)
        return out

    # -- writes ---------------------------------------------------------------------

    def writable_check(self) -> None:
        if self.cowd:
            raise UnsupportedError("Writing to VMFS sparse (COWD) VMDK extents is not "
                                   "supported by qimg")

    def write(self, offset: int, view: memoryview, drv) -> None:
        self.writable_check()
        if self.compressed:
            self._write_compressed(offset, view, drv)
            return
        from imagetools.formats._writes import cluster_write
        cluster_write(_GrainMap(self, drv), offset, view)

    def write_zeroes(self, offset: int, length: int, drv) -> None:
        self.writable_check()
        grain = self.grain
        end = offset + length
        pos = offset
        gmap = _GrainMap(self, drv)
        zeros = memoryview(bytes(grain))
        try:
            while pos < end:
                index = pos // grain
                stop = min(end, (index + 1) * grain)
                whole = pos == index * grain and stop - pos == min(grain, self.size - pos)
                entry = self.gte(index) or 0
                zeroed = entry == GTE_ZEROED and self.has_zero_grain
                if self.has_zero_grain and whole and not self.compressed:
                    if not zeroed:
                        gmap.set_gte(index, GTE_ZEROED)
                elif self.compressed and index in self._pending:
                    self._write_compressed(pos, zeros[:stop - pos], drv)
                elif zeroed or (entry == 0 and drv.backing is None):
                    pass                                    # reads as zeros already
                elif self.compressed:
                    self._write_compressed(pos, zeros[:stop - pos], drv)
                else:
                    from imagetools.formats._writes import cluster_write
                    gmap.commit()
                    cluster_write(gmap, pos, zeros[:stop - pos])
                pos = stop
        finally:
            gmap.commit()

    def _write_compressed(self, offset: int, view: memoryview, drv) -> None:
        grain = self.grain
        pos = 0
        gmap = _GrainMap(self, drv)
        try:
            while pos < len(view):
                guest = offset + pos
                index = guest // grain
                n = min(grain - guest % grain, len(view) - pos)
                whole = not guest % grain and (n == grain or guest + n == self.size)
                if not whole or index in self._pending:
                    self._write_partial(index, guest - index * grain, view[pos:pos + n], drv,
                                        gmap)
                    pos += n
                    continue
                if not self.has_marker:
                    raise ImageIOError("Compressed VMDK extent without grain markers cannot "
                                       "be written", 22)
                entry = self.gte(index)
                if entry and not (entry == GTE_ZEROED and self.has_zero_grain):
                    raise ImageIOError("Could not write to allocated cluster for "
                                       "streamOptimized", 5)
                blob = zlib.compress(bytes(view[pos:pos + n]))
                self.store_compressed(index, blob, gmap)
                pos += n
        finally:
            gmap.commit()

    def _write_partial(self, index: int, inner: int, data: memoryview, drv,
                       gmap: "_GrainMap") -> None:
        """Collect a piece of a grain; store the grain once all of it was written.

        QEMU refuses partial writes to compressed extents; collecting them
        lets any writer (convert with its own chunking) fill a grain in
        pieces. A grain still incomplete at close is stored as it is, its
        unwritten bytes taken from the backing file or zeros.
        """
        pending = self._pending.get(index)
        if pending is None:
            entry = self.gte(index)
            if entry and not (entry == GTE_ZEROED and self.has_zero_grain):
                raise ImageIOError("Could not write to allocated cluster for streamOptimized", 5)
            length = min(self.grain, self.size - index * self.grain)
            buf = bytearray(length)
            if entry == 0 and drv.backing is not None:
                drv._read_backing(self.start + index * self.grain, memoryview(buf))
            pending = self._pending[index] = [buf, bytearray(length)]
        buf, mask = pending
        buf[inner:inner + len(data)] = data
        mask[inner:inner + len(data)] = b"\x01" * len(data)
        if mask.count(0) == 0:
            self._store_pending(index, gmap)

    def _store_pending(self, index: int, gmap: "_GrainMap") -> None:
        if not self.has_marker:
            raise ImageIOError("Compressed VMDK extent without grain markers cannot be written",
                               22)
        buf, _mask = self._pending.pop(index)
        self.store_compressed(index, zlib.compress(bytes(buf)), gmap)

    def store_compressed(self, index: int, blob: bytes, gmap: "_GrainMap") -> None:
        """Append one grain marker for grain ``index`` and point its GTE at it."""
        sector = self.next_cluster_sector
        if sector >= EXTENT_MAX_SECTORS:
            raise ImageIOError("VMDK extent is full", 27)
        marker = struct.pack("<QI", self.start // SECTOR + index * self.grain_sectors,
                             len(blob)) + blob
        self.file.pwrite(sector * SECTOR, marker)
        self.next_cluster_sector = div_round_up(sector * SECTOR + len(marker), SECTOR)
        gmap.set_gte(index, sector)

    def check(self, result, first_sector: int) -> bool:
        """QEMU's per-grain walk: a missing table or a grain past EOF stops it.

        Walked one grain table at a time; a table seen before (a hostile
        directory may point every entry at one) is not walked again.
        """
        length = self.file.length()
        grains = div_round_up(self.sectors, self.grain_sectors)
        clean_tables: set[int] = set()
        for l1_index in range(div_round_up(grains, self.l2_size)):
            first = l1_index * self.l2_size
            stop = min(grains, first + self.l2_size)
            gt_sector = self.gd[l1_index] if l1_index < self.l1_size else None
            if gt_sector == 0 or gt_sector in clean_tables:
                continue
            for index in range(first, stop):
                sector = first_sector + index * self.grain_sectors
                try:
                    entry = self.gte(index)
                except ImageError:
                    entry = None
                if entry is None:
                    result.error(f"ERROR: could not get cluster_offset for sector {sector}")
                    return False
                if entry == 0 or (entry == GTE_ZEROED and self.has_zero_grain):
                    continue
                if entry * SECTOR >= length:
                    result.error(f"ERROR: cluster offset for sector {sector} points after EOF")
                    return False
            if stop - first == self.l2_size:
                clean_tables.add(gt_sector)
        return True

    def finish(self, drv) -> None:
        """On close: store incomplete grains; QEMU pads a compressed extent to a sector."""
        if self._pending:
            gmap = _GrainMap(self, drv)
            try:
                for index in sorted(self._pending):
                    self._store_pending(index, gmap)
            finally:
                gmap.commit()
        if self.compressed and not self.file.read_only:
            length = self.file.length()
            if length % SECTOR:
                self.file.truncate(div_round_up(length, SECTOR) * SECTOR)


class _GrainMap(ClusterMap):
    """Grain allocation in one sparse extent for :func:`cluster_write`."""

    def __init__(self, extent: SparseExtent, drv) -> None:
        self.extent = extent
        self.drv = drv
        self.file = extent.file
        self.unit = extent.grain
        self.base = extent.start
        self.dirty: dict[int, list[int]] = {}     # l1 index -> dirty l2 indexes
        self.new_data = False

    def lookup(self, index: int) -> int | None:
        entry = self.extent.gte(index)
        if entry is None:
            raise ImageIOError(f"VMDK grain directory of '{self.file.filename}' does not "
                               f"cover grain {index}")
        if entry == 0 or (entry == GTE_ZEROED and self.extent.has_zero_grain):
            return None
        return entry * SECTOR

    def cow_zero(self, index: int) -> bool:
        entry = self.extent.gte(index)
        return entry == GTE_ZEROED and self.extent.has_zero_grain

    def fill_backing(self, guest_offset: int, view: memoryview) -> None:
        self.drv._read_backing(guest_offset, view)

    def allocate(self, index: int, count: int) -> int:
        ext = self.extent
        sector = ext.next_cluster_sector
        if sector + count * ext.grain_sectors > EXTENT_MAX_SECTORS:
            raise ImageIOError("VMDK extent is full", 27)
        ext.next_cluster_sector += count * ext.grain_sectors
        self.new_data = True
        return sector * SECTOR

    def map_units(self, index: int, count: int, host: int) -> None:
        for i in range(count):
            self.set_gte(index + i, host // SECTOR + i * self.extent.grain_sectors)

    def _ensure_gt(self, l1_index: int) -> None:
        """Give a grain directory entry a (zeroed) grain table in both directories."""
        ext = self.extent
        if ext.gd[l1_index]:
            return
        gt_bytes = ext.l2_size * 4
        gt_sectors = div_round_up(gt_bytes, SECTOR)
        copies = 2 if ext.rgd is not None else 1
        sector = ext.next_cluster_sector
        span = div_round_up(copies * gt_sectors, ext.grain_sectors) * ext.grain_sectors
        ext.next_cluster_sector += span
        self.file.pwrite(sector * SECTOR, bytes(span * SECTOR))
        ext.gd[l1_index] = sector
        self.file.pwrite(ext.gd_offset + 4 * l1_index, struct.pack("<I", sector))
        if ext.rgd is not None:
            ext.rgd[l1_index] = sector + gt_sectors
            self.file.pwrite(ext.rgd_offset + 4 * l1_index, struct.pack("<I", sector + gt_sectors))

    def set_gte(self, index: int, value: int) -> None:
        ext = self.extent
        l1_index, l2_index = divmod(index, ext.l2_size)
        self._ensure_gt(l1_index)
        ext._gt(ext.gd[l1_index])[l2_index] = value
        self.dirty.setdefault(l1_index, []).append(l2_index)

    def commit(self) -> None:
        if not self.dirty:
            return
        ext = self.extent
        if self.new_data and self.drv.backing is not None:
            self.file.flush()       # copied backing data is on disk before it is mapped
        for l1_index, indexes in self.dirty.items():
            table = ext._gt(ext.gd[l1_index])
            lo, hi = min(indexes), max(indexes) + 1
            data = table_bytes(table, lo, hi)
            self.file.pwrite(ext.gd[l1_index] * SECTOR + 4 * lo, data)
            if ext.rgd is not None and ext.rgd[l1_index]:
                self.file.pwrite(ext.rgd[l1_index] * SECTOR + 4 * lo, data)
        self.dirty = {}
        self.new_data = False


# -- opening sparse files ----------------------------------------------------------------

def open_vmdk4(file, *, read_only: bool) -> SparseExtent:
    """A KDMV extent (monolithicSparse, split sparse, streamOptimized)."""
    raw = file.pread_full(0, 4 + VMDK4.size)
    (version, flags, capacity, granularity, _desc_offset, _desc_size, gtes, rgd_offset,
     gd_offset, grain_offset, _filler, _check, compress) = VMDK4.unpack_from(raw, 4)
    if gd_offset == GD_AT_END:
        footer = file.pread_full(file.length() // SECTOR * SECTOR - 1536, 1536)
        fmarker_size, fmarker_type = struct.unpack_from("<II", footer, 8)
        eos_val, eos_size, eos_type = struct.unpack_from("<QII", footer, 1024)
        if (footer[512:516] != VMDK4_MAGIC or fmarker_size != 0
                or fmarker_type != MARKER_FOOTER or eos_val or eos_size
                or eos_type != MARKER_EOS):
            raise VmdkOpenError("Invalid footer")
        (version, flags, capacity, granularity, _desc_offset, _desc_size, gtes, rgd_offset,
         gd_offset, grain_offset, _filler, _check, compress) = VMDK4.unpack_from(footer, 516)
    compressed = compress == COMPRESSION_DEFLATE
    if version > 3:
        raise VmdkOpenError(f"Unsupported VMDK version {version}")
    if version == 3 and not read_only and not compressed:
        raise VmdkOpenError("VMDK version 3 must be read only")
    if gtes > 512:
        raise VmdkOpenError("L2 table size too big")
    l1_entry_sectors = (gtes * granularity) & 0xFFFFFFFF
    if l1_entry_sectors == 0:
        raise VmdkOpenError("L1 entry size is invalid")
    l1_size = div_round_up(capacity, l1_entry_sectors)
    rgd = rgd_offset * SECTOR if flags & FLAG_RGD else 0
    if div_round_up(file.length(), SECTOR) < grain_offset:
        raise VmdkOpenError(f"File truncated, expecting at least {grain_offset * SECTOR} bytes")
    if granularity > MAX_GRAIN_SECTORS or (compressed and granularity > MAX_COMPRESSED_GRAIN):
        # (compressed grains are inflated in memory: refuse absurd ones)
        raise VmdkOpenError("Invalid granularity, image may be corrupt")
    if l1_size > MAX_L1_SIZE:
        raise VmdkOpenError("L1 size too big")
    return SparseExtent(file, sectors=capacity, gd_offset=gd_offset * SECTOR, rgd_offset=rgd,
                        l1_size=l1_size, l2_size=gtes, grain_sectors=granularity,
                        version=version, flags=flags, compressed=compressed)


def open_vmdk3(file) -> SparseExtent:
    """A COWD (VMFS sparse) extent: 4096-entry grain tables, read-only here."""
    raw = file.pread_full(4, VMDK3.size)
    (_version, _flags, disk_sectors, granularity, l1dir_offset, l1dir_size,
     *_rest) = VMDK3.unpack(raw)
    if granularity == 0:
        raise VmdkOpenError("L1 entry size is invalid")
    return SparseExtent(file, sectors=disk_sectors, gd_offset=l1dir_offset * SECTOR,
                        rgd_offset=0, l1_size=l1dir_size, l2_size=4096,
                        grain_sectors=granularity, cowd=True)


def sparse_capacity_and_desc(file) -> tuple[int, int]:
    """(capacity, descriptor sector) of a KDMV header (a descriptor wrapper has
    capacity 0 and a descriptor)."""
    raw = file.pread_full(4, VMDK4.size)
    fields = VMDK4.unpack(raw)
    return fields[2], fields[4]
