"""bochs: Bochs "growing" redolog images (read-only, as in QEMU 7.2).

Layout (little-endian, ../shared/spec/formats.md section 8): a 512-byte
header (``Bochs Virtual HD Image`` / ``Redolog`` / ``Growing``, version 1 or
2, header size, catalog entries, bitmap and extent sizes, disk size), the
catalog (one u32 per extent, 0xFFFFFFFF = not allocated) and the allocated
extents, each a sector bitmap followed by its data sectors. A sector is
present when its bit (LSB first) is set; everything else reads as zeros.
"""

from __future__ import annotations

import struct
from typing import Iterator

from imagetools.errors import ImageOpenError
from imagetools.formats._common import SECTOR, cstr, div_round_up, is_pow2, read_table
from imagetools.formats._mapped import DATA, ZERO, ReadOnlyDriver, Run


HEADER_V1 = 0x00010000
HEADER_V2 = 0x00020000
UNALLOCATED = 0xFFFFFFFF
MAX_CATALOG = 0x100000


class BochsDriver(ReadOnlyDriver):
    format_name = "bochs"

    def __init__(self, file) -> None:
        super().__init__(file)
        raw = file.pread_full(0, 512)
        version, header_size, catalog, bitmap, extent = struct.unpack_from("<IIIII", raw, 64)
        if (cstr(raw[0:32]) != b"Bochs Virtual HD Image" or cstr(raw[32:48]) != b"Redolog"
                or cstr(raw[48:64]) != b"Growing" or version not in (HEADER_V1, HEADER_V2)):
            raise ImageOpenError(file.filename, "Image not in Bochs format")
        disk = struct.unpack_from("<Q", raw, 84 if version == HEADER_V1 else 88)[0]
        self._size = disk // SECTOR * SECTOR
        if catalog > MAX_CATALOG:
            raise ImageOpenError(file.filename, "Catalog size is too large")
        if extent < SECTOR:
            raise ImageOpenError(file.filename, "Extent size must be at least 512")
        if not is_pow2(extent):
            raise ImageOpenError(file.filename, f"Extent size {extent} is not a power of two")
        if extent > 0x800000:
            raise ImageOpenError(file.filename, f"Extent size {extent} is too large")
        if catalog < div_round_up(self._size // SECTOR, extent // SECTOR):
            raise ImageOpenError(file.filename, "Catalog size is too small for this disk size")
        self.catalog = read_table(file, header_size, catalog, 4, "Bochs catalog")
        self.data_offset = header_size + 4 * catalog
        self.bitmap_blocks = 1 + (bitmap - 1) // SECTOR if bitmap else 1
        self.extent_blocks = 1 + (extent - 1) // SECTOR
        self.extent = extent
        self._bitmap_cache: tuple[int, bytes] | None = None

    def _bitmap(self, base: int) -> bytes:
        if self._bitmap_cache is None or self._bitmap_cache[0] != base:
            need = div_round_up(self.extent // SECTOR, 8)
            self._bitmap_cache = (base, self.file.pread_full(base, need))
        return self._bitmap_cache[1]

    def _runs(self, offset: int, length: int) -> Iterator[Run]:
        """Sector by sector inside allocated extents, as the bitmap says."""
        end = offset + length
        pos = offset
        ext = self.extent
        while pos < end:
            index = pos // ext
            stop = min(end, (index + 1) * ext)
            entry = self.catalog[index]
            if entry == UNALLOCATED:
                yield Run(pos, stop - pos, ZERO)
                pos = stop
                continue
            base = self.data_offset + SECTOR * entry * (self.extent_blocks + self.bitmap_blocks)
            bitmap = self._bitmap(base)
            data = base + SECTOR * self.bitmap_blocks
            while pos < stop:
                sector = (pos - index * ext) // SECTOR
                n = min(stop, (pos // SECTOR + 1) * SECTOR) - pos
                if bitmap[sector // 8] >> (sector % 8) & 1:
                    yield Run(pos, n, DATA, data + pos - index * ext, self.file)
                else:
                    yield Run(pos, n, ZERO)
                pos += n


DRIVER = BochsDriver
