"""vpc: Virtual PC / Hyper-V VHD images, fixed and dynamic, as QEMU 7.2 handles them.

Layout (big-endian, ../shared/spec/formats.md section 4): every VHD ends in a
512-byte footer (``conectix`` cookie, type, geometry, sizes, a one's
complement byte-sum checksum); a fixed disk is the raw guest bytes followed
by that footer, a dynamic disk has a copy of the footer at offset 0, a
1024-byte ``cxsparse`` header, a BAT of big-endian u32 sector numbers and
blocks made of a sector bitmap plus ``block_size`` data bytes.

QEMU's rules kept here:

* the virtual size is cylinders x heads x sectors x 512 unless the creator
  application is one that records the exact size (``win ``, ``qem2``,
  ``d2v ``, ``CTXS``, ``tap\\0``) or the geometry is the maximum, then the
  footer's current size; at most 2040 GiB;
* creating rounds the size up to the next CHS geometry (unless
  ``force_size=on``, which records ``qem2`` and the maximum geometry);
* the sector bitmap is ignored on reads and set to all ones on writes; a
  new block goes where the footer was and the footer moves to the new end;
* unallocated blocks read as zeros and show as zero in map; fixed disks
  show the host file's holes as zero + data (QEMU's recursion);
* a fixed VHD has no magic at offset 0, so probing calls it raw (use
  ``-f vpc``); a differencing VHD is read like a dynamic one, its parent
  ignored, as QEMU does.
"""

from __future__ import annotations

import struct
import time
import uuid
from typing import Any, Iterator

from imagetools.errors import CorruptImageError, ImageError, ImageOpenError, UnsupportedError
from imagetools.formats._common import (SECTOR, OptionSpec, bool_option, file_preallocation,
                                        is_pow2, new_host_file, read_table, refuse_options,
                                        round_up)
from imagetools.formats._mapped import DATA, RECURSE, ZERO, MappedDriver, Run
from imagetools.formats._writes import ClusterMap, cluster_write, write_zeroes_plain
from imagetools.formats.hostfile import HostFile

HEADER_SIZE = 512
FIXED, DYNAMIC, DIFFERENCING = 2, 3, 4
TIMESTAMP_BASE = 946684800          # 2000-01-01 00:00:00 UTC
CHS_MAX = (65535, 16, 255)
MAX_GEOMETRY = 65535 * 16 * 255
MAX_SECTORS = 0xFF000000            # 2040 GiB
UNALLOCATED = 0xFFFFFFFF
BLOCK_SIZE = 0x200000
EXACT_SIZE_CREATORS = (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0")

# creator[8] features version data_offset timestamp creator_app[4] major minor
# creator_os[4] orig_size current_size cyls heads secs_per_cyl type checksum
# uuid[16] in_saved_state reserved[427]
FOOTER = struct.Struct(">8sIIQI4sHH4sQQHBBII16sB427s")
# magic[8] data_offset table_offset version max_table_entries block_size checksum
# parent_uuid[16] parent_timestamp reserved parent_name[512] locators[192] reserved2[256]
DYNHDR = struct.Struct(">8sQQIIII16sII512s192s256s")
assert FOOTER.size == 512 and DYNHDR.size == 1024


def checksum(buf: bytes) -> int:
    """One's complement of the byte sum (the checksum field counted as zero)."""
    return ~sum(buf) & 0xFFFFFFFF


def with_checksum(buf: bytes, field_offset: int) -> bytes:
    data = bytearray(buf)
    data[field_offset:field_offset + 4] = bytes(4)
    data[field_offset:field_offset + 4] = struct.pack(">I", checksum(data))
    return bytes(data)


def calculate_geometry(total_sectors: int) -> tuple[int, int, int]:
    """(cylinders, heads, sectors per track) for a sector count, VHD-spec style."""
    total = min(total_sectors, MAX_GEOMETRY)
    if total >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = total // spt
    else:
        spt = 17
        cth = total // spt
        heads = max(4, -(-cth // 1024))
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = total // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = total // spt
    return cth // heads, heads, spt


def rounded_size(size: int, force_size: bool) -> tuple[int, tuple[int, int, int]]:
    """(final byte size, geometry) that ``qemu-img create -f vpc`` uses."""
    size = round_up(size, SECTOR)
    if force_size:
        geometry = CHS_MAX
    else:
        sectors = min(MAX_GEOMETRY, size // SECTOR)
        geometry = (0, 0, 0)
        i = 0
        while sectors > geometry[0] * geometry[1] * geometry[2]:
            geometry = calculate_geometry(sectors + i)
            i += 1
    c, h, s = geometry
    if c * h * s == MAX_GEOMETRY:
        total = size // SECTOR
        if total > MAX_SECTORS:
            raise ImageError("The image size is too large for file format 'vpc'")
    else:
        total = c * h * s
    return total * SECTOR, geometry


class VpcDriver(MappedDriver):
    format_name = "vpc"
    unallocated_is_zero = True

    create_options = (
        OptionSpec("size", "size", "Virtual disk size"),
        OptionSpec("subformat", "str", "Type of virtual hard disk format. Supported formats "
                   "are {dynamic (default) | fixed} "),
        OptionSpec("force_size", "bool (on/off)", "Force disk size calculation to use the "
                   "actual size specified, rather than using the nearest CHS-based "
                   "calculation"),
    )

    def __init__(self, file: HostFile, *, read_only: bool) -> None:
        super().__init__(file, read_only=read_only)
        name = self.filename
        raw = file.pread_full(0, HEADER_SIZE)
        self.footer_at_start = raw[:8] == b"conectix"
        if not self.footer_at_start:
            length = file.length()
            if length < HEADER_SIZE:
                raise ImageOpenError(name, "File too small for a VHD header")
            raw = file.pread_full(length - HEADER_SIZE, HEADER_SIZE)
            if raw[:8] != b"conectix":
                raise ImageOpenError(name, "invalid VPC image")
        self.footer = raw
        f = FOOTER.unpack(raw)
        stored = f[15]
        if checksum(raw[:64] + bytes(4) + raw[68:]) != stored:
            raise ImageOpenError(name, "Incorrect header checksum")
        # QEMU: a footer at offset 0 means dynamic; one only at the end, fixed
        # (a dynamic disk whose first sector was lost still has its header)
        at_end_dynamic = not self.footer_at_start and f[14] in (DYNAMIC, DIFFERENCING)
        self.disk_type = DYNAMIC if self.footer_at_start or at_end_dynamic else FIXED
        cyls, heads, secs = f[11], f[12], f[13]
        sectors = cyls * heads * secs
        use_chs = f[5] not in EXACT_SIZE_CREATORS
        if not use_chs or sectors == MAX_GEOMETRY:
            sectors = f[10] // SECTOR
        if sectors > MAX_SECTORS:
            raise ImageOpenError(name, "File too large")
        self._size = sectors * SECTOR
        self.block_size = 0
        self.bitmap_size = 0
        self.bat = None
        if self.disk_type != FIXED:
            self._open_dynamic(f[3])
        self._bitmaps_written: set[int] = set()
        self._map = _VpcMap(self)

    def _open_dynamic(self, data_offset: int) -> None:
        name = self.filename
        file = self.file
        hdr = file.pread_full(data_offset, DYNHDR.size) if data_offset < file.length() \
            else bytes(DYNHDR.size)
        d = DYNHDR.unpack(hdr)
        if d[0] != b"cxsparse":
            raise ImageOpenError(name, "Invalid header magic")
        block_size = d[5]
        if not is_pow2(block_size) or block_size < SECTOR:
            raise ImageOpenError(name, f"Invalid block size {block_size}")
        self.block_size = block_size
        self.bitmap_size = round_up(block_size // (8 * SECTOR), SECTOR)
        entries = d[4]
        if self._size // block_size > 0xFFFFFFFF:
            raise ImageOpenError(name, "Too many blocks")
        if entries * block_size < self._size:
            raise ImageOpenError(name, "Page table too small")
        if entries > 0x7FFFFFFF // 4:
            raise ImageOpenError(name, f"Max Table Entries too large ({entries})")
        self.bat_offset = d[2]
        try:
            self.bat = read_table(file, self.bat_offset, entries, 4, "VHD block allocation table",
                                  big_endian=True)
        except CorruptImageError as err:
            raise ImageOpenError(name, str(err)) from None
        free = round_up(self.bat_offset + entries * 4, SECTOR)
        for entry in self.bat:
            if entry != UNALLOCATED:
                free = max(free, SECTOR * entry + self.bitmap_size + block_size)
        if free > file.length():
            raise ImageOpenError(name, "block-vpc: free_data_block_offset points after the "
                                 "end of file. The image has been truncated.")
        self.free_data_block_offset = free

    # -- class level -----------------------------------------------------------------

    @classmethod
    def create(cls, filename: str, size: int, options: dict[str, Any]) -> None:
        refuse_options(options, ("subformat", "force_size"))
        if options.get("backing_file"):
            raise UnsupportedError("Backing file not supported for file format 'vpc'")
        subformat = str(options.get("subformat") or "dynamic")
        if subformat not in ("dynamic", "fixed"):
            raise ImageError(f"Parameter 'subformat' does not accept value '{subformat}'")
        force_size = bool_option(options, "force_size")
        file_preallocation(options)
        total_size, (cyls, heads, secs) = rounded_size(size, force_size)
        dynamic = subformat == "dynamic"
        footer = FOOTER.pack(
            b"conectix", 2, 0x00010000, HEADER_SIZE if dynamic else 0xFFFFFFFFFFFFFFFF,
            (int(time.time()) - TIMESTAMP_BASE) & 0xFFFFFFFF, b"qem2" if force_size else b"qemu",
            5, 3, b"Wi2k", total_size, total_size, cyls, heads, secs,
            DYNAMIC if dynamic else FIXED, 0, uuid.uuid4().bytes, 0, bytes(427))
        footer = with_checksum(footer, 64)
        file = new_host_file(filename)
        try:
            if dynamic:
                entries = -(-(total_size // SECTOR) // (BLOCK_SIZE // SECTOR))
                bat_bytes = round_up(entries * 4, SECTOR)
                dyn = DYNHDR.pack(b"cxsparse", 0xFFFFFFFFFFFFFFFF, 3 * SECTOR, 0x00010000,
                                  entries, BLOCK_SIZE, 0, bytes(16), 0, 0, bytes(512),
                                  bytes(192), bytes(256))
                dyn = with_checksum(dyn, 36)
                file.pwrite(0, footer + dyn + b"\xff" * bat_bytes + footer)
            else:
                file.truncate(total_size + HEADER_SIZE)
                file.pwrite(total_size, footer)
            file.flush()
        finally:
            file.close()

    # -- mapping ---------------------------------------------------------------------

    @property
    def cluster_size(self) -> int | None:
        return self.block_size if self.disk_type != FIXED else None

    def format_specific(self) -> None:
        return None

    def _runs(self, offset: int, length: int) -> Iterator[Run]:
        if self.disk_type == FIXED:
            yield Run(offset, length, RECURSE, offset, self.file)
            return
        bs = self.block_size
        bat = self.bat
        end = offset + length
        pos = offset
        while pos < end:
            index = pos // bs
            inner = pos - index * bs
            n = min(bs - inner, end - pos)
            entry = bat[index] if index < len(bat) else UNALLOCATED
            if entry == UNALLOCATED:
                yield Run(pos, n, ZERO)
            else:
                yield Run(pos, n, DATA, SECTOR * entry + self.bitmap_size + inner, self.file)
            pos += n

    def has_zero_init(self) -> bool:
        return self.disk_type != FIXED or not self.file.is_block

    def allocated_size(self) -> int | None:
        return self.file.allocated()

    # -- writes ------------------------------------------------------------------------

    def write(self, offset: int, data) -> None:
        self._writable()
        view = memoryview(data).cast("B")
        self._check_range(offset, len(view))
        if not len(view):
            return
        if self.disk_type == FIXED:
            self.file.pwrite(offset, view)
            return
        cluster_write(self._map, offset, view)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        self._writable()
        self._check_range(offset, length)
        if self.disk_type == FIXED:
            self.file.write_zeroes(offset, length, unmap=False)
            return
        write_zeroes_plain(self._map, offset, length, has_backing=False)


class _VpcMap(ClusterMap):
    """Block allocation of dynamic VHDs: bitmap, data, footer moved, BAT entry."""

    max_batch = 1

    def __init__(self, drv: VpcDriver) -> None:
        self.drv = drv
        self.file = drv.file
        self.unit = drv.block_size or SECTOR
        self.dirty: list[int] = []

    def lookup(self, index: int) -> int | None:
        drv = self.drv
        entry = drv.bat[index]
        if entry == UNALLOCATED:
            return None
        bitmap = SECTOR * entry
        if entry not in drv._bitmaps_written:
            # QEMU marks every sector of a block it writes to as present
            drv._bitmaps_written.add(entry)
            self.file.pwrite(bitmap, b"\xff" * drv.bitmap_size)
        return bitmap + drv.bitmap_size

    def allocate(self, index: int, count: int) -> int:
        drv = self.drv
        bitmap = drv.free_data_block_offset
        if bitmap // SECTOR >= UNALLOCATED:
            raise CorruptImageError("VHD image is full (block offset out of range)")
        self.file.pwrite(bitmap, b"\xff" * drv.bitmap_size)
        drv._bitmaps_written.add(bitmap // SECTOR)
        return bitmap + drv.bitmap_size

    def map_units(self, index: int, count: int, host: int) -> None:
        drv = self.drv
        bitmap = host - drv.bitmap_size
        drv.bat[index] = bitmap // SECTOR
        drv.free_data_block_offset = host + drv.block_size
        # the footer moves to the new end of the file
        self.file.pwrite(drv.free_data_block_offset, drv.footer)
        self.dirty.append(index)

    def commit(self) -> None:
        drv = self.drv
        for index in self.dirty:
            self.file.pwrite(drv.bat_offset + 4 * index, struct.pack(">I", drv.bat[index]))
        self.dirty = []


DRIVER = VpcDriver
