"""vdi: VirtualBox disk images, read, write, create and check as QEMU 7.2 does.

Layout (little-endian, see ../shared/spec/formats.md section 3): a 512-byte
header at offset 0 (informational text, signature 0xbeda107f at 0x40,
version 1.1, image type, block map and data offsets, disk size, block size
-- QEMU insists on 1 MiB --, block counts and four UUIDs), the block map
(one u32 per 1 MiB block: the index of the block in the data area, or
VDI_UNALLOCATED / VDI_DISCARDED, which both read as zeros), then the data
blocks in allocation order.

QEMU's rules kept here: the open-time refusals and their messages; blocks
are allocated at index ``blocks_allocated`` and written whole; after the
data, the header and the changed block-map sectors are rewritten; static
images (``static=on``) map every block up front on a sparse file, and
their block status looks through to the file's holes (zero + data); a
missing block reads as zeros and shows as ``zero`` in map; there is no
backing file and no discard.

Better than QEMU: the block map must lie inside the file (a truncated or
hostile header gives one error instead of a zero map), and a new block never
reuses an index the map already uses even if ``blocks_allocated`` is wrong.
"""

from __future__ import annotations

import struct
import uuid
from typing import Any, Iterator

from imagetools.errors import CorruptImageError, ImageOpenError, UnsupportedError
from imagetools.formats._common import (SECTOR, CheckResult, OptionSpec, bool_option, div_round_up,
                                        file_preallocation, new_host_file, read_table,
                                        refuse_options, round_up, table_bytes)
from imagetools.formats._mapped import DATA, RECURSE, ZERO, MappedDriver, Run
from imagetools.formats._writes import ClusterMap
from imagetools.formats.hostfile import HostFile

SIGNATURE = 0xBEDA107F
VERSION_1_1 = 0x00010001
TYPE_DYNAMIC = 1
TYPE_STATIC = 2
TEXT = b"<<< QEMU VM Virtual Disk Image >>>\n"
UNALLOCATED = 0xFFFFFFFF
DISCARDED = 0xFFFFFFFE
BLOCK_SIZE = 1 << 20
#: QEMU keeps the map under 2 GiB so it can read it in one request
BLOCKS_IN_IMAGE_MAX = (0x80000000 - SECTOR) // 4
DISK_SIZE_MAX = BLOCKS_IN_IMAGE_MAX * BLOCK_SIZE

# text[64] signature version header_size image_type image_flags description[256]
# offset_bmap offset_data cylinders heads sectors sector_size unused1 disk_size
# block_size block_extra blocks_in_image blocks_allocated uuid_image uuid_last_snap
# uuid_link uuid_parent unused2[56]
HEADER = struct.Struct("<64sIIIII256sIIIIIIIQIIII16s16s16s16s56s")
assert HEADER.size == 512


def allocated(entry: int) -> bool:
    return entry < DISCARDED


class VdiHeader:
    """The 512-byte header, by QEMU's field names."""

    FIELDS = ("text", "signature", "version", "header_size", "image_type", "image_flags",
              "description", "offset_bmap", "offset_data", "cylinders", "heads", "sectors",
              "sector_size", "unused1", "disk_size", "block_size", "block_extra",
              "blocks_in_image", "blocks_allocated", "uuid_image", "uuid_last_snap",
              "uuid_link", "uuid_parent", "unused2")

    def __init__(self, raw: bytes) -> None:
        for name, value in zip(self.FIELDS, HEADER.unpack(raw[:HEADER.size])):
            setattr(self, name, value)

    def pack(self) -> bytes:
        return HEADER.pack(*(getattr(self, name) for name in self.FIELDS))


class VdiDriver(MappedDriver):
    format_name = "vdi"
    unallocated_is_zero = True

    create_options = (
        OptionSpec("size", "size", "Virtual disk size"),
        OptionSpec("static", "bool (on/off)", "VDI static (pre-allocated) image", "off"),
    )

    def __init__(self, file: HostFile, *, read_only: bool) -> None:
        super().__init__(file, read_only=read_only)
        raw = file.pread_full(0, HEADER.size)
        self.header = h = VdiHeader(raw)
        self._validate(h)
        self._size = round_up(h.disk_size, SECTOR)
        self.bmap = read_table(file, h.offset_bmap, h.blocks_in_image, 4,
                               "VDI block map", pad_to=SECTOR)
        used = [e for e in self.bmap if allocated(e)]
        #: next block index to hand out (never one the map already uses)
        self._next_block = max(h.blocks_allocated, max(used) + 1 if used else 0)
        self._map = _VdiMap(self)

    def _validate(self, h: VdiHeader) -> None:
        name = self.filename
        if h.disk_size > DISK_SIZE_MAX:
            raise ImageOpenError(name, f"Unsupported VDI image size (size is 0x{h.disk_size:x}, "
                                 f"max supported is 0x{DISK_SIZE_MAX:x})")
        disk_size = round_up(h.disk_size, SECTOR)
        if h.signature != SIGNATURE:
            reason = f"Image not in VDI format (bad signature {h.signature:08x})"
        elif h.version != VERSION_1_1:
            reason = f"unsupported VDI image (version {h.version >> 16}.{h.version & 0xffff})"
        elif h.offset_bmap % SECTOR:
            reason = f"unsupported VDI image (unaligned block map offset 0x{h.offset_bmap:x})"
        elif h.offset_data % SECTOR:
            reason = f"unsupported VDI image (unaligned data offset 0x{h.offset_data:x})"
        elif h.sector_size != SECTOR:
            reason = f"unsupported VDI image (sector size {h.sector_size} is not {SECTOR})"
        elif h.block_size != BLOCK_SIZE:
            reason = f"unsupported VDI image (block size {h.block_size} is not {BLOCK_SIZE})"
        elif disk_size > h.blocks_in_image * h.block_size:
            reason = (f"unsupported VDI image (disk size {disk_size}, image bitmap has room "
                      f"for {h.blocks_in_image * h.block_size})")
        elif any(h.uuid_link):
            reason = "unsupported VDI image (non-NULL link UUID)"
        elif any(h.uuid_parent):
            reason = "unsupported VDI image (non-NULL parent UUID)"
        elif h.blocks_in_image > BLOCKS_IN_IMAGE_MAX:
            reason = (f"unsupported VDI image (too many blocks {h.blocks_in_image}, "
                      f"max is {BLOCKS_IN_IMAGE_MAX})")
        else:
            return
        raise ImageOpenError(name, reason)

    # -- class level -------------------------------------------------------------

    @classmethod
    def create(cls, filename: str, size: int, options: dict[str, Any]) -> None:
        refuse_options(options, ("static",))
        if options.get("backing_file"):
            raise UnsupportedError("Backing file not supported for file format 'vdi'")
        static = bool_option(options, "static")
        prealloc = file_preallocation(options)
        del prealloc            # the file is created empty: QEMU ignores it too
        if size > DISK_SIZE_MAX:
            raise UnsupportedError(f"Unsupported VDI image size (size is 0x{size:x}, "
                                   f"max supported is 0x{DISK_SIZE_MAX:x})")
        blocks = div_round_up(size, BLOCK_SIZE)
        bmap_size = round_up(blocks * 4, SECTOR)
        h = VdiHeader(bytes(HEADER.size))
        h.text = TEXT
        h.signature = SIGNATURE
        h.version = VERSION_1_1
        h.header_size = 0x180
        h.image_type = TYPE_STATIC if static else TYPE_DYNAMIC
        h.offset_bmap = 0x200
        h.offset_data = 0x200 + bmap_size
        h.sector_size = SECTOR
        h.disk_size = size
        h.block_size = BLOCK_SIZE
        h.blocks_in_image = blocks
        h.blocks_allocated = blocks if static else 0
        h.uuid_image = uuid.uuid4().bytes_le
        h.uuid_last_snap = uuid.uuid4().bytes_le
        entry = "<I"
        if static:
            bmap = b"".join(struct.pack(entry, i) for i in range(blocks))
        else:
            bmap = b"\xff" * (4 * blocks)
        bmap += bytes(bmap_size - len(bmap))
        file = new_host_file(filename)
        try:
            file.pwrite(0, h.pack() + bmap)
            if static:
                file.truncate(h.offset_data + blocks * BLOCK_SIZE)
            file.flush()
        finally:
            file.close()

    # -- mapping -------------------------------------------------------------------

    @property
    def cluster_size(self) -> int:
        return BLOCK_SIZE

    def _runs(self, offset: int, length: int) -> Iterator[Run]:
        h = self.header
        kind = RECURSE if h.image_type == TYPE_STATIC else DATA
        end = offset + length
        pos = offset
        while pos < end:
            index = pos // BLOCK_SIZE
            inner = pos - index * BLOCK_SIZE
            n = min(BLOCK_SIZE - inner, end - pos)
            entry = self.bmap[index]
            if allocated(entry):
                yield Run(pos, n, kind, h.offset_data + entry * BLOCK_SIZE + inner, self.file)
            else:
                yield Run(pos, n, ZERO)
            pos += n

    def has_zero_init(self) -> bool:
        return self.header.image_type != TYPE_STATIC or not self.file.is_block

    # -- writes --------------------------------------------------------------------

    # -- check -----------------------------------------------------------------------

    def check(self) -> CheckResult:
        """QEMU's vdi check: map entries out of range or used twice, the count."""
        h = self.header
        result = CheckResult()
        owner: dict[int, int] = {}
        count = 0
        for block, entry in enumerate(self.bmap):
            if not allocated(entry):
                continue
            if entry < h.blocks_in_image:
                count += 1
                if entry not in owner:
                    owner[entry] = entry
                else:
                    result.error(f"ERROR: block index {owner[entry]} also used by {entry}")
            else:
                result.error(f"ERROR: block index {block} too large, is {entry}")
        if count != h.blocks_allocated:
            result.error(f"ERROR: allocated blocks mismatch, is {count}, "
                         f"should be {h.blocks_allocated}")
        return result


class _VdiMap(ClusterMap):
    """Block allocation for :func:`cluster_write`."""

    unit = BLOCK_SIZE

    def __init__(self, drv: VdiDriver) -> None:
        self.drv = drv
        self.file = drv.file
        self.dirty: list[int] = []

    def lookup(self, index: int) -> int | None:
        entry = self.drv.bmap[index]
        if not allocated(entry):
            return None
        return self.drv.header.offset_data + entry * BLOCK_SIZE

    def allocate(self, index: int, count: int) -> int:
        drv = self.drv
        first = drv._next_block
        if first + count > DISCARDED:
            raise CorruptImageError("VDI image is full (no free block index)")
        return drv.header.offset_data + first * BLOCK_SIZE

    def map_units(self, index: int, count: int, host: int) -> None:
        drv = self.drv
        first = (host - drv.header.offset_data) // BLOCK_SIZE
        for i in range(count):
            drv.bmap[index + i] = first + i
        drv._next_block = first + count
        drv.header.blocks_allocated += count
        self.dirty.extend((index, index + count - 1))

    def commit(self) -> None:
        if not self.dirty:
            return
        drv = self.drv
        per_sector = SECTOR // 4
        lo = min(self.dirty) // per_sector * per_sector
        hi = min(len(drv.bmap), (max(self.dirty) // per_sector + 1) * per_sector)
        self.dirty = []
        drv.file.pwrite(0, drv.header.pack())
        data = table_bytes(drv.bmap, lo, hi)
        data += bytes(round_up(len(data), SECTOR) - len(data))
        drv.file.pwrite(drv.header.offset_bmap + lo * 4, data)


DRIVER = VdiDriver
