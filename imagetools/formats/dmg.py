"""dmg: Apple UDIF disk images (read-only, as in QEMU 7.2).

Layout (big-endian, ../shared/spec/formats.md section 10): a 512-byte
``koly`` trailer near the end of the file points at the data fork, a
resource fork or an XML property list; the ``blkx`` resources are ``mish``
tables of chunks (zero fill, raw, ignored, zlib, bzip2, LZFSE) mapping
sector ranges onto the data fork. QEMU finds the tables by scanning the XML
for ``<data>`` elements rather than parsing the plist, and so does this
driver. Probing only looks at the ``.dmg`` file name suffix (score 2).

Differences from this Debian QEMU build, which lacks the dmg-bz2 and
dmg-lzfse modules: bzip2 chunks are read with Python's bz2, LZFSE chunks
when the ``lzfse`` package is installed; without it they are skipped with
QEMU's warning and reading them fails as in QEMU. ADC and LZMA chunks are
skipped with a warning (I/O error when read), as in QEMU.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import errno
import struct
import zlib
from typing import Iterator

from imagetools.errors import ImageIOError, ImageOpenError
from imagetools.formats._common import SECTOR
from imagetools.formats._mapped import DATA, OPAQUE, ZERO, ReadOnlyDriver, Run


UDZE, UDRW, UDIG = 0x00000000, 0x00000001, 0x00000002
UDCO, UDZO, UDBZ, ULFO = 0x80000004, 0x80000005, 0x80000006, 0x80000007
UDCM, UDLE = 0x7FFFFFFE, 0xFFFFFFFF
LENGTHS_MAX = 64 << 20
SECTORCOUNTS_MAX = LENGTHS_MAX // SECTOR
MAX_XML = 16 << 20

try:                                      # optional: LZFSE chunks
    import lzfse as _lzfse
except ImportError:                       # pragma: no cover - depends on the machine
    _lzfse = None


def _known(kind: int) -> bool:
    return kind in (UDZE, UDRW, UDIG, UDZO, UDBZ) or (kind == ULFO and _lzfse is not None)


class DmgDriver(ReadOnlyDriver):
    format_name = "dmg"

    def __init__(self, file) -> None:
        super().__init__(file)
        self.warnings: list[str] = []
        self.chunks: list[tuple[int, int, int, int, int]] = []   # sector, count, type, off, len
        koly = self._find_koly()
        name = file.filename
        trailer = file.pread_full(koly, 512)
        data_fork = struct.unpack_from(">Q", trailer, 0x18)[0]
        rsrc_off, rsrc_len = struct.unpack_from(">QQ", trailer, 0x28)
        xml_off, xml_len = struct.unpack_from(">QQ", trailer, 0xD8)
        sectors = struct.unpack_from(">q", trailer, 0x1EC)[0]
        invalid = f"Could not open '{name}': Invalid argument"
        if data_fork > koly:
            raise ImageOpenError(name, invalid)
        if rsrc_off >= koly or rsrc_len > koly - rsrc_off:
            raise ImageOpenError(name, invalid)
        if xml_off >= koly or xml_len > koly - xml_off:
            raise ImageOpenError(name, invalid)
        if sectors < 0:
            raise ImageOpenError(name, invalid)
        self._size = sectors * SECTOR
        self._data_fork = data_fork
        if rsrc_len:
            self._read_resource_fork(rsrc_off, rsrc_len, invalid)
        elif xml_len:
            self._read_plist(xml_off, xml_len, invalid)
        else:
            raise ImageOpenError(name, invalid)
        self.chunks.sort(key=lambda c: c[0])
        self._starts = [c[0] for c in self.chunks]
        if self.warnings:
            from imagetools.image import warn
            from imagetools.output import prog
            for text in self.warnings:
                warn(f"{prog()}: warning: {text}")

    def _find_koly(self) -> int:
        length = self.file.length()
        name = self.file.filename
        if length < 512:
            raise ImageOpenError(name, "dmg file must be at least 512 bytes long")
        start = length - 511 - 512 if length > 511 + 512 else 0
        buf = self.file.pread_full(start, min(length, 515))
        pos = buf.find(b"koly")
        if pos < 0:
            raise ImageOpenError(name, "Could not locate UDIF trailer in dmg file")
        return start + pos

    def _read_resource_fork(self, begin: int, length: int, invalid: str) -> None:
        name = self.file.filename
        data_offset, = struct.unpack(">I", self.file.pread_full(begin, 4))
        if data_offset > length:
            raise ImageOpenError(name, invalid)
        count, = struct.unpack(">I", self.file.pread_full(begin + 8, 4))
        if count == 0 or data_offset + count > length:
            raise ImageOpenError(name, invalid)
        offset = begin + data_offset
        end = offset + count
        while offset < end:
            size, = struct.unpack(">I", self.file.pread_full(offset, 4))
            if size == 0 or size > end - offset:
                raise ImageOpenError(name, invalid)
            offset += 4
            self._read_mish(self.file.pread_full(offset, size))
            offset += size

    def _read_plist(self, begin: int, length: int, invalid: str) -> None:
        if length == 0 or length > MAX_XML:
            raise ImageOpenError(self.file.filename, invalid)
        xml = self.file.pread_full(begin, length)
        end = xml.find(b"\0")
        if end >= 0:
            xml = xml[:end]
        pos = 0
        while True:
            start = xml.find(b"<data>", pos)
            if start < 0:
                break
            start += 6
            stop = xml.find(b"</data>", start)
            if stop < 0:
                raise ImageOpenError(self.file.filename, invalid)
            text = bytes(c for c in xml[start:stop] if c not in b" \t\r\n")
            try:
                blob = base64.b64decode(text + b"=" * (-len(text) % 4))
            except (binascii.Error, ValueError):
                blob = b""
            self._read_mish(blob)
            pos = stop + 7

    def _read_mish(self, buf: bytes) -> None:
        """One BLKX table; tables without the ``mish`` magic are skipped, as in QEMU."""
        if len(buf) < 244 or buf[:4] != b"mish":
            return
        out_offset = struct.unpack_from(">Q", buf, 8)[0]
        in_offset = self._data_fork + struct.unpack_from(">Q", buf, 0x18)[0]
        name = self.file.filename
        for i in range((len(buf) - 204) // 40):
            kind, _comment, sector, count, off, length = struct.unpack_from(">IIQQQQ", buf,
                                                                           204 + 40 * i)
            if not _known(kind):
                if kind == UDBZ:
                    self._warn_once("dmg-bzip2 module is missing, accessing bzip2 compressed "
                                    "blocks will result in I/O errors")
                elif kind == ULFO:
                    self._warn_once("dmg-lzfse module is missing, accessing lzfse compressed "
                                    "blocks will result in I/O errors")
                elif kind not in (UDCM, UDLE):
                    self._warn_once(f"Image contains chunks of unknown type {kind:x}, accessing "
                                    "them will result in I/O errors")
                continue
            index = len(self.chunks)
            if kind not in (UDZE, UDIG) and count > SECTORCOUNTS_MAX:
                raise ImageOpenError(name, f"sector count {count} for chunk {index} is larger "
                                     f"than max ({SECTORCOUNTS_MAX})")
            if length > LENGTHS_MAX:
                raise ImageOpenError(name, f"length {length} for chunk {index} is larger than "
                                     f"max ({LENGTHS_MAX})")
            self.chunks.append((sector + out_offset, count, kind, off + in_offset, length))

    def _warn_once(self, text: str) -> None:
        if text not in self.warnings:
            self.warnings.append(text)

    # -- mapping ----------------------------------------------------------------------------

    def _chunk_at(self, sector: int) -> int:
        i = bisect.bisect_right(self._starts, sector) - 1
        if i < 0 or sector >= self.chunks[i][0] + self.chunks[i][1]:
            raise ImageIOError(f"dmg sector {sector} is not covered by any chunk of a known "
                               "type", errno.EIO)
        return i

    def _runs(self, offset: int, length: int) -> Iterator[Run]:
        end = offset + length
        pos = offset
        while pos < end:
            index = self._chunk_at(pos // SECTOR)
            first, count, kind, off, clen = self.chunks[index]
            start = first * SECTOR
            stop = min(end, start + count * SECTOR)
            if kind in (UDZE, UDIG):
                yield Run(pos, stop - pos, ZERO)
            elif kind == UDRW:
                avail = start + clen
                if pos < avail:
                    top = min(stop, avail)
                    yield Run(pos, top - pos, DATA, off + pos - start, self.file)
                    if top < stop:
                        yield Run(top, stop - top, ZERO)
                else:
                    yield Run(pos, stop - pos, ZERO)
            else:
                yield Run(pos, stop - pos, OPAQUE, None, self.file, index)
            pos = stop

    def _chunk_data(self, index: int) -> bytes:
        cache = self._opaque_cache
        if cache is not None and cache[0] == index:
            return cache[1]
        _first, count, kind, off, clen = self.chunks[index]
        want = count * SECTOR
        raw = self.file.pread_full(off, clen)
        out = b""
        try:
            if kind == UDZO:
                inflater = zlib.decompressobj()
                out = inflater.decompress(raw, want)
                if not inflater.eof:
                    out = b""
            elif kind == UDBZ:
                import bz2
                out = bz2.BZ2Decompressor().decompress(raw, want)
            elif kind == ULFO:
                out = _lzfse.decompress(raw)
        except Exception:          # any decoder error is the same I/O error
            out = b""
        if len(out) != want:
            raise ImageIOError(f"dmg chunk {index} does not decompress to {want} bytes: the "
                               "image is corrupt", errno.EIO)
        self._opaque_cache = (index, out)
        return out

    def _read_opaque(self, run: Run, offset: int, length: int) -> bytes:
        start = self.chunks[run.tag][0] * SECTOR
        inner = offset - start
        return self._chunk_data(run.tag)[inner:inner + length]


DRIVER = DmgDriver
