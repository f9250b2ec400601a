"""parallels: Parallels "expanding" disk images (.hds), as QEMU 7.2 handles them.

Layout (little-endian, ../shared/spec/parallels.txt): a 64-byte header
(``WithoutFreeSpace``: BAT entries in sectors, or ``WithouFreSpacExt``: in
clusters; version 2; cluster size in sectors as ``tracks``; BAT size; size
in sectors; ``inuse``; data offset; format extension offset), the BAT right
after it, and clusters from ``data_off``. A BAT entry of 0 is unallocated
(zeros, or a backing file given at open time).

QEMU's rules kept here: the open checks and messages; an image whose
``inuse`` field says it was not closed cleanly opens read-only only (and
``check`` reports it); a read-write open marks the image in use, a clean
close clears the mark and truncates the file to the end of the data; new
clusters go at the end of the data (whole clusters copied from a backing
file when there is one). ``check`` reports what qemu-img check reports:
the unclean mark, clusters outside the file, leaked space at the end,
allocated / fragmented / total clusters and the image end offset.

Not kept: QEMU's 128 MiB preallocation when the file grows (the close
truncates it away again anyway); format-extension bitmaps are ignored.
"""

from __future__ import annotations

import struct
from typing import Any, Iterator

from imagetools.errors import CorruptImageError, ImageError, ImageOpenError
from imagetools.formats._common import (SECTOR, CheckResult, OptionSpec, div_round_up,
                                        file_preallocation, le_table, new_host_file,
                                        refuse_options, round_up, size_option, table_bytes)
from imagetools.formats._mapped import DATA, UNALLOC, MappedDriver, Run
from imagetools.formats._writes import ClusterMap
from imagetools.formats.hostfile import HostFile

MAGIC = b"WithoutFreeSpace"
MAGIC2 = b"WithouFreSpacExt"
VERSION = 2
INUSE_MAGIC = 0x746F6E59
HEADER = struct.Struct("<16sIIIIIQIIIQ")
assert HEADER.size == 64
HEADER_BYTES = 64
DEFAULT_CLUSTER_SIZE = 1 << 20
HEADS = 16
SEC_IN_CYL = 32
MAX_IMAGE_FACTOR = 1 << 32


class ParallelsDriver(MappedDriver):
    format_name = "parallels"
    supports_backing = True

    create_options = (
        OptionSpec("size", "size", "Virtual disk size"),
        OptionSpec("cluster_size", "size", "Parallels image cluster size",
                   str(DEFAULT_CLUSTER_SIZE)),
    )

    def __init__(self, file: HostFile, *, read_only: bool) -> None:
        super().__init__(file, read_only=read_only)
        raw = file.pread_full(0, HEADER_BYTES)
        (sig, version, _heads, _cyl, tracks, bat_entries, nb_sectors, inuse, data_off,
         _flags, ext_off) = HEADER.unpack_from(raw)
        fail = lambda reason: ImageOpenError(self.filename, reason)   # noqa: E731
        if version != VERSION or sig not in (MAGIC, MAGIC2):
            raise fail("Image not in Parallels format")
        if sig == MAGIC:
            self.off_multiplier = 1
            nb_sectors &= 0xFFFFFFFF
        else:
            self.off_multiplier = tracks
        if tracks == 0:
            raise fail("Invalid image: Zero sectors per track")
        if tracks > 0x7FFFFFFF // 513:
            raise fail("Invalid image: Too big cluster")
        if bat_entries > 0x7FFFFFFF // 4:
            raise fail("Catalog too large")
        self.tracks = tracks
        self.cluster = tracks * SECTOR
        self._size = nb_sectors * SECTOR
        self.header = bytearray(raw)
        bat_bytes = 4 * bat_entries
        if HEADER_BYTES + bat_bytes > file.length():
            raise fail("The BAT lies beyond the end of the file (truncated image?)")
        self.bat = le_table(file.pread_full(HEADER_BYTES, bat_bytes), 4)
        data_end = data_off or div_round_up(HEADER_BYTES + bat_bytes, SECTOR)
        self.data_off = data_end
        for entry in self.bat:
            sector = entry * self.off_multiplier
            if entry and sector >= data_end:
                data_end = sector + tracks
        self.data_end = data_end
        self.unclean = inuse == INUSE_MAGIC
        self.ext_off = ext_off
        if not read_only:
            if self.unclean:
                raise fail("parallels: Image was not closed correctly; cannot be opened "
                           "read/write")
            if ext_off:
                from imagetools.image import warn
                warn("Format Extension ignored in RW mode")
            self._set_inuse(INUSE_MAGIC)
        self._map = _ParallelsMap(self)

    def _set_inuse(self, value: int) -> None:
        struct.pack_into("<I", self.header, 44, value)
        self.file.pwrite(0, bytes(self.header))
        self.file.flush()

    # -- class level ------------------------------------------------------------------------

    @classmethod
    def create(cls, filename: str, size: int, options: dict[str, Any]) -> None:
        refuse_options(options, ("cluster_size",))
        file_preallocation(options)
        if options.get("backing_file"):
            from imagetools.errors import UnsupportedError
            raise UnsupportedError("Backing file not supported for file format 'parallels'")
        size = round_up(size, SECTOR)
        cluster = round_up(size_option(options, "cluster_size", DEFAULT_CLUSTER_SIZE), SECTOR)
        if cluster >= (1 << 63) // MAX_IMAGE_FACTOR:
            raise ImageError("Cluster size is too large")
        if size >= MAX_IMAGE_FACTOR * cluster:
            raise ImageError("Image size is too large for this cluster size")
        entries = div_round_up(size, cluster) if cluster else 0
        bat_sectors = div_round_up(HEADER_BYTES + 4 * entries, cluster) * cluster // SECTOR
        header = HEADER.pack(MAGIC2, VERSION, HEADS, size // SECTOR // HEADS // SEC_IN_CYL,
                             cluster // SECTOR, entries, div_round_up(size, SECTOR), 0,
                             bat_sectors, 0, 0)
        file = new_host_file(filename)
        try:
            file.pwrite(0, header + bytes(SECTOR - len(header)))
            if bat_sectors > 1:
                file.write_zeroes(SECTOR, (bat_sectors - 1) * SECTOR)
                if file.length() < bat_sectors * SECTOR:
                    file.truncate(bat_sectors * SECTOR)
            file.flush()
        finally:
            file.close()

    # -- metadata --------------------------------------------------------------------------

    @property
    def cluster_size(self) -> None:
        return None                 # QEMU has no driver info for parallels

    def is_dirty(self) -> None:
        return None                 # ... so qemu-img info prints no dirty-flag either

    def has_zero_init(self) -> bool:
        return True

    # -- mapping ------------------------------------------------------------------------------

    def host_offset(self, index: int) -> int | None:
        if index >= len(self.bat):
            return None
        entry = self.bat[index]
        return entry * self.off_multiplier * SECTOR if entry else None

    def _runs(self, offset: int, length: int) -> Iterator[Run]:
        cs = self.cluster
        end = offset + length
        pos = offset
        while pos < end:
            index = pos // cs
            inner = pos - index * cs
            n = min(cs - inner, end - pos)
            host = self.host_offset(index)
            if host is None:
                yield Run(pos, n, UNALLOC)
            else:
                yield Run(pos, n, DATA, host + inner, self.file)
            pos += n

    # -- writes --------------------------------------------------------------------------------

    def _close_metadata(self) -> None:
        self._set_inuse(0)
        self.file.truncate(self.data_end * SECTOR)
        self.file.flush()

    # -- check -----------------------------------------------------------------------------------

    def check(self) -> CheckResult:
        size = round_up(self.file.length(), SECTOR)
        result = CheckResult(total_clusters=len(self.bat))
        if self.unclean:
            result.error("ERROR image was not closed correctly")
        high = 0
        prev = 0
        for i, entry in enumerate(self.bat):
            off = entry * self.off_multiplier * SECTOR
            if off == 0:
                prev = 0
                continue
            if off > size:
                result.error(f"ERROR cluster {i} is outside image")
            result.allocated_clusters += 1
            high = max(high, off)
            if prev and prev + self.cluster != off:
                result.fragmented_clusters += 1
            prev = off
        result.image_end_offset = high + self.cluster if high else self.data_off * SECTOR
        if size > result.image_end_offset:
            leaked = size - result.image_end_offset
            result.leaks = div_round_up(leaked, self.cluster)
            result.messages.append(f"ERROR space leaked at the end of the image {leaked}")
        return result


class _ParallelsMap(ClusterMap):
    """Clusters appended at the end of the data; the BAT written after them."""

    def __init__(self, drv: ParallelsDriver) -> None:
        self.drv = drv
        self.file = drv.file
        self.unit = drv.cluster
        self.dirty: list[int] = []

    def lookup(self, index: int) -> int | None:
        return self.drv.host_offset(index)

    def fill_backing(self, guest_offset: int, view: memoryview) -> None:
        self.drv._read_backing(guest_offset, view)

    def allocate(self, index: int, count: int) -> int:
        drv = self.drv
        if index + count > len(drv.bat):
            raise CorruptImageError("Parallels BAT does not cover the whole disk")
        start = round_up(drv.data_end, drv.off_multiplier)
        drv.data_end = start + count * drv.tracks
        return start * SECTOR

    def map_units(self, index: int, count: int, host: int) -> None:
        drv = self.drv
        first = host // SECTOR // drv.off_multiplier
        step = drv.tracks // drv.off_multiplier
        for i in range(count):
            drv.bat[index + i] = first + i * step
        self.dirty.extend((index, index + count - 1))

    def commit(self) -> None:
        if not self.dirty:
            return
        drv = self.drv
        lo, hi = min(self.dirty), max(self.dirty) + 1
        self.dirty = []
        self.file.pwrite(HEADER_BYTES + 4 * lo, table_bytes(drv.bat, lo, hi))


DRIVER = ParallelsDriver
