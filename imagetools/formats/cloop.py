"""cloop: compressed loop images, V2.0 (read-only, as in QEMU 7.2).

Layout (big-endian, ../shared/spec/formats.md section 9): a 128-byte shell
preamble, the block size and block count, ``n_blocks + 1`` file offsets, and
the blocks, each one zlib stream inflating to exactly ``block_size`` bytes.
Probing only recognises the V2.0 preamble (score 2), as QEMU does.
"""

from __future__ import annotations

import struct
import zlib
from typing import Iterator

from imagetools.errors import ImageIOError, ImageOpenError
from imagetools.formats._common import read_table
from imagetools.formats._mapped import OPAQUE, ReadOnlyDriver, Run

MAX_BLOCK_SIZE = 64 << 20


class CloopDriver(ReadOnlyDriver):
    format_name = "cloop"

    def __init__(self, file) -> None:
        super().__init__(file)
        name = file.filename
        block_size, n_blocks = struct.unpack(">II", file.pread_full(128, 8))
        if block_size % 512:
            raise ImageOpenError(name, f"block_size {block_size} must be a multiple of 512")
        if block_size == 0:
            raise ImageOpenError(name, "block_size cannot be zero")
        if block_size > MAX_BLOCK_SIZE:
            raise ImageOpenError(name, f"block_size {block_size} must be "
                                 f"{MAX_BLOCK_SIZE >> 20} MB or less")
        if n_blocks > (0xFFFFFFFF - 1) // 8:
            raise ImageOpenError(name, f"n_blocks {n_blocks} must be "
                                 f"{(0xFFFFFFFF - 1) // 8} or less")
        if (n_blocks + 1) * 8 > 512 << 20:
            raise ImageOpenError(name, "image requires too many offsets, try increasing "
                                 "block size")
        self.offsets = read_table(file, 136, n_blocks + 1, 8, "cloop offset table",
                                  big_endian=True)
        for i in range(1, n_blocks + 1):
            if self.offsets[i] < self.offsets[i - 1]:
                raise ImageOpenError(name, f"offsets not monotonically increasing at index {i}, "
                                     "image file is corrupt")
            if self.offsets[i] - self.offsets[i - 1] > 2 * MAX_BLOCK_SIZE:
                raise ImageOpenError(name, f"invalid compressed block size at index {i}, "
                                     "image file is corrupt")
        self.block_size = block_size
        self.n_blocks = n_blocks
        self._size = n_blocks * block_size

    def _runs(self, offset: int, length: int) -> Iterator[Run]:
        bs = self.block_size
        end = offset + length
        pos = offset
        while pos < end:
            block = pos // bs
            stop = min(end, (block + 1) * bs)
            yield Run(pos, stop - pos, OPAQUE, None, self.file, block)
            pos = stop

    def _block(self, block: int) -> bytes:
        cache = self._opaque_cache
        if cache is not None and cache[0] == block:
            return cache[1]
        start, stop = self.offsets[block], self.offsets[block + 1]
        raw = self.file.pread_full(start, stop - start)
        try:
            inflater = zlib.decompressobj()
            out = inflater.decompress(raw, self.block_size)
            ended = inflater.eof
        except zlib.error:
            out, ended = b"", False
        if len(out) != self.block_size or not ended:
            raise ImageIOError(f"cloop block {block} does not inflate to {self.block_size} "
                               "bytes: the image is corrupt", 5)
        self._opaque_cache = (block, out)
        return out

    def _read_opaque(self, run: Run, offset: int, length: int) -> bytes:
        inner = offset - run.tag * self.block_size
        return self._block(run.tag)[inner:inner + length]


DRIVER = CloopDriver
