"""Persistent dirty bitmaps of a qcow2 image (the bitmaps extension).

Read to show them as ``qemu-img info`` does (name, granularity, flags), to
count their clusters in ``check`` and to size them in ``measure``; and kept
up to date when qimg writes (:class:`BitmapTracker`): an enabled ("auto")
bitmap is marked in-use before the first guest write, every written range
sets its bits when the image is closed, then the flag is cleared again --
so a crash in between leaves the bitmap marked inconsistent, never wrong.
Directory entries are bounds-checked against QEMU's limits (65535 bitmaps,
64 MiB directory, names of at most 1023 bytes, granularity 2^9..2^31).
"""

from __future__ import annotations

import struct

from imagetools.errors import CorruptImageError
from imagetools.formats.hostfile import HostFile
from imagetools.formats.qcow2.header import AUTOCLEAR_BITMAPS, EXT_BITMAPS, Header

QCOW2_MAX_BITMAPS = 65535
QCOW2_MAX_BITMAP_DIRECTORY_SIZE = 1024 * QCOW2_MAX_BITMAPS
BME_FLAG_IN_USE = 1 << 0
BME_FLAG_AUTO = 1 << 1
BME_TABLE_ENTRY_OFFSET_MASK = 0x00FFFFFFFFFFFE00

_DIR_ENTRY = struct.Struct(">QIIBBHI")


class Bitmap:
    __slots__ = ("name", "table_offset", "table_size", "flags", "type", "granularity_bits",
                 "extra", "dir_pos")

    def __init__(self, name: str, table_offset: int, table_size: int, flags: int, type_: int,
                 granularity_bits: int, extra: bytes) -> None:
        self.name = name
        self.table_offset = table_offset
        self.table_size = table_size
        self.flags = flags
        self.type = type_
        self.granularity_bits = granularity_bits
        self.extra = extra
        #: byte offset of this entry inside the bitmap directory
        self.dir_pos = 0

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits

    def flag_names(self) -> list[str]:
        names = []
        if self.flags & BME_FLAG_IN_USE:
            names.append("in-use")
        if self.flags & BME_FLAG_AUTO:
            names.append("auto")
        return names


class BitmapsExtension:
    """The parsed extension: count, directory place and size."""

    def __init__(self, nb_bitmaps: int, directory_size: int, directory_offset: int) -> None:
        self.nb_bitmaps = nb_bitmaps
        self.directory_size = directory_size
        self.directory_offset = directory_offset


def bitmaps_extension(header: Header) -> BitmapsExtension | None:
    """The bitmaps extension if present and consistent (autoclear bit set)."""
    ext = header.extension(EXT_BITMAPS)
    if ext is None or not header.autoclear_features & AUTOCLEAR_BITMAPS:
        return None
    if len(ext.data) != 24:
        raise CorruptImageError("bitmaps_ext: Invalid extension length")
    nb, reserved, dir_size, dir_offset = struct.unpack(">IIQQ", ext.data)
    if reserved:
        raise CorruptImageError("bitmaps_ext: Reserved field is not zero")
    if nb > QCOW2_MAX_BITMAPS:
        raise CorruptImageError(f"bitmaps_ext: Image has {nb} bitmaps, exceeding the QEMU "
                                f"supported maximum of {QCOW2_MAX_BITMAPS}")
    if nb == 0:
        raise CorruptImageError("found bitmaps extension with zero bitmaps")
    if dir_offset % header.cluster_size:
        raise CorruptImageError("bitmaps_ext: invalid bitmap directory offset")
    if dir_size > QCOW2_MAX_BITMAP_DIRECTORY_SIZE:
        raise CorruptImageError(f"bitmaps_ext: bitmap directory size ({dir_size}) exceeds "
                                f"the maximum supported size ({QCOW2_MAX_BITMAP_DIRECTORY_SIZE})")
    return BitmapsExtension(nb, dir_size, dir_offset)


def read_bitmaps(file: HostFile, header: Header) -> list[Bitmap]:
    """The bitmap directory entries, in order."""
    ext = bitmaps_extension(header)
    if ext is None:
        return []
    if ext.directory_offset + ext.directory_size > file.length():
        raise CorruptImageError("Bitmap directory is past the end of the file")
    raw = file.pread_full(ext.directory_offset, ext.directory_size)
    out: list[Bitmap] = []
    pos = 0
    for _ in range(ext.nb_bitmaps):
        if pos + _DIR_ENTRY.size > len(raw):
            raise CorruptImageError("Bitmap directory is truncated")
        (table_offset, table_size, flags, type_, gran_bits, name_size,
         extra_size) = _DIR_ENTRY.unpack_from(raw, pos)
        end = pos + _DIR_ENTRY.size + extra_size + name_size
        if name_size == 0 or name_size > 1023 or end > len(raw):
            raise CorruptImageError("Bitmap directory entry is invalid")
        if table_offset % header.cluster_size:
            raise CorruptImageError("Bitmap table offset is not cluster aligned")
        extra = raw[pos + _DIR_ENTRY.size:pos + _DIR_ENTRY.size + extra_size]
        name = raw[pos + _DIR_ENTRY.size + extra_size:end].decode("utf-8", "replace")
        bm = Bitmap(name, table_offset, table_size, flags, type_, gran_bits, extra)
        bm.dir_pos = pos
        out.append(bm)
        pos = (end + 7) & ~7
    return out


def read_bitmap_table(file: HostFile, bitmap: Bitmap, image_size: int,
                      cluster_size: int) -> list[int]:
    """The entries of one bitmap's table (offsets of its data clusters)."""
    if not 9 <= bitmap.granularity_bits <= 31:
        raise CorruptImageError(f"Bitmap '{bitmap.name}' has an unsupported granularity")
    bits = -(-image_size // bitmap.granularity)
    needed = -(-bits // (8 * cluster_size))
    if bitmap.table_size > max(needed, 1) or \
            bitmap.table_offset + 8 * bitmap.table_size > file.length():
        raise CorruptImageError(f"Bitmap '{bitmap.name}' table is invalid")
    raw = file.pread_full(bitmap.table_offset, 8 * bitmap.table_size)
    return list(struct.unpack(f">{bitmap.table_size}Q", raw))


def set_bits(buf: bytearray, lo: int, hi: int) -> None:
    """Set bits ``lo..hi-1`` of ``buf`` (bit 0 is the least significant of byte 0)."""
    while lo < hi and lo & 7:
        buf[lo >> 3] |= 1 << (lo & 7)
        lo += 1
    while lo < hi and hi & 7:
        hi -= 1
        buf[hi >> 3] |= 1 << (hi & 7)
    if lo < hi:
        buf[lo >> 3:hi >> 3] = b"\xff" * ((hi - lo) >> 3)


class BitmapTracker:
    """Keeps the enabled persistent bitmaps of an image open for writing in sync."""

    def __init__(self, drv, bitmaps: list[Bitmap], directory_offset: int) -> None:
        self.drv = drv
        self.bitmaps = bitmaps
        self.directory_offset = directory_offset
        self.ranges: list[tuple[int, int]] = []

    @classmethod
    def start(cls, drv) -> "BitmapTracker | None":
        """Mark the enabled bitmaps in use (before any guest data is written)."""
        ext = bitmaps_extension(drv.header)
        if ext is None:
            return None
        tracked = [b for b in drv.bitmaps()
                   if b.flags & BME_FLAG_AUTO and not b.flags & BME_FLAG_IN_USE]
        if not tracked:
            return None
        tracker = cls(drv, tracked, ext.directory_offset)
        for bm in tracked:
            tracker._write_flags(bm, bm.flags | BME_FLAG_IN_USE)
        drv.file.flush()
        return tracker

    def _write_flags(self, bm: Bitmap, flags: int) -> None:
        self.drv.file.pwrite(self.directory_offset + bm.dir_pos + 12, struct.pack(">I", flags))

    def note(self, offset: int, length: int) -> None:
        if length > 0:
            self.ranges.append((offset, offset + length))

    def finish(self) -> None:
        """Set the bits of everything written, then clear the in-use flags."""
        drv = self.drv
        cs = drv.cluster_size
        ext = bitmaps_extension(drv.header)
        if ext is None:
            return
        # the directory may have moved since start() (a resize rewrites it)
        names = {bm.name for bm in self.bitmaps}
        self.directory_offset = ext.directory_offset
        self.bitmaps = [bm for bm in read_bitmaps(drv.file, drv.header) if bm.name in names]
        merged: list[list[int]] = []
        for s, e in sorted(self.ranges):
            if merged and s <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([s, e])
        updates = []
        for bm in self.bitmaps:
            table = read_bitmap_table(drv.file, bm, drv.size, cs)
            clusters: dict[int, bytearray] = {}
            gb = bm.granularity_bits
            for s, e in merged:
                lo, hi = s >> gb, ((e - 1) >> gb) + 1
                for ci in range(lo // (8 * cs), (hi - 1) // (8 * cs) + 1):
                    if ci >= len(table) or table[ci] & 1 and not \
                            table[ci] & BME_TABLE_ENTRY_OFFSET_MASK:
                        continue          # all ones already
                    buf = clusters.get(ci)
                    if buf is None:
                        off = table[ci] & BME_TABLE_ENTRY_OFFSET_MASK
                        buf = bytearray(drv.file.pread_full(off, cs)) if off else bytearray(cs)
                        clusters[ci] = buf
                    base = ci * 8 * cs
                    set_bits(buf, max(lo, base) - base, min(hi, base + 8 * cs) - base)
            new_entries = {}
            for ci, buf in clusters.items():
                off = table[ci] & BME_TABLE_ENTRY_OFFSET_MASK
                if not off:
                    off = drv.refcounts.allocate(1) * cs
                    new_entries[ci] = off
                drv.file.pwrite(off, bytes(buf))
            updates.append((bm, new_entries))
        drv.writeback()                   # new bitmap clusters are counted first
        for bm, new_entries in updates:
            for ci, off in new_entries.items():
                drv.file.pwrite(bm.table_offset + 8 * ci, struct.pack(">Q", off))
        drv.file.flush()
        for bm, _ in updates:
            self._write_flags(bm, bm.flags & ~BME_FLAG_IN_USE)
        drv.file.flush()
        self.ranges = []


def resize_bitmaps(drv, old_size: int, new_size: int) -> tuple[bytes, list[int]] | None:
    """Bitmaps stored anew for a virtual size change (written and counted).

    QEMU only loads a bitmap whose table has exactly the entries the image
    size needs, so the switch to the new tables must come with the new size:
    this returns the new bitmaps extension (for the header write that also
    carries the size) and the clusters to free after it, or None when the
    image has no bitmaps. As QEMU stores bitmaps, every non-zero bitmap
    cluster is written to a new cluster, then its table, then the directory;
    new bits are clear and bits past a shrunken end are dropped.
    """
    ext = bitmaps_extension(drv.header)
    if ext is None:
        return None
    bitmaps = read_bitmaps(drv.file, drv.header)
    cs = drv.cluster_size
    rc = drv.refcounts
    frees: list[int] = []
    stored = []
    for bm in bitmaps:
        old = read_bitmap_table(drv.file, bm, old_size, cs)
        bits = -(-new_size // bm.granularity)
        table = []
        for ci in range(-(-bits // (8 * cs))):
            entry = old[ci] if ci < len(old) else 0
            offset = entry & BME_TABLE_ENTRY_OFFSET_MASK
            if offset:
                data = bytearray(drv.file.pread_full(offset, cs))
            else:
                data = bytearray(b"\xff" * cs if entry & 1 else cs)
            keep = bits - ci * 8 * cs
            if keep < 8 * cs:
                _clear_from(data, keep)
            if not any(data):
                table.append(0)
                continue
            home = rc.allocate(1) * cs
            drv.writeback()                  # counted before it is written
            drv.file.pwrite(home, bytes(data))
            table.append(home)
        frees += [e & BME_TABLE_ENTRY_OFFSET_MASK for e in old if e & BME_TABLE_ENTRY_OFFSET_MASK]
        home = rc.allocate(-(-8 * len(table) // cs)) * cs if table else 0
        drv.writeback()
        if table:
            drv.file.pwrite(home, struct.pack(f">{len(table)}Q", *table))
        stored.append((bm, home, len(table)))
        if bm.table_size:
            frees += range(bm.table_offset, bm.table_offset + 8 * bm.table_size, cs)
    directory = bytearray()
    for bm, home, size in stored:
        name = bm.name.encode("utf-8", "surrogateescape")
        directory += _DIR_ENTRY.pack(home, size, bm.flags, bm.type, bm.granularity_bits,
                                     len(name), len(bm.extra))
        directory += bm.extra + name
        directory += bytes(-len(directory) % 8)
    dir_home = rc.allocate(-(-len(directory) // cs)) * cs
    drv.writeback()
    drv.file.pwrite(dir_home, bytes(directory))
    frees += range(ext.directory_offset, ext.directory_offset + ext.directory_size, cs)
    return struct.pack(">IIQQ", len(bitmaps), 0, len(directory), dir_home), frees


def _clear_from(buf: bytearray, bit: int) -> None:
    """Clear bits ``bit`` and up of ``buf``."""
    byte = bit >> 3
    if bit & 7:
        buf[byte] &= (1 << (bit & 7)) - 1
        byte += 1
    buf[byte:] = bytes(len(buf) - byte)
