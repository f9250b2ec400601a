"""qcow: the original QEMU Copy-On-Write format (version 1), as QEMU 7.2 handles it.

Layout (big-endian, ../shared/spec/formats.md section 1): a 48-byte header
(magic ``QFI\\xfb``, version 1, backing file name offset and length, size,
cluster_bits, l2_bits, crypt_method, l1_table_offset), the backing file
name, the L1 table and then L2 tables and clusters in allocation order. An
L2 entry is 0 (unallocated: the backing file shows through), a cluster
offset, or -- with bit 63 set -- a compressed cluster: the low
``63 - cluster_bits`` bits are its offset, the next ``cluster_bits`` bits its
length, and it is a raw deflate stream of one cluster.

QEMU's rules kept here: the open-time checks and messages; new L2 tables
and clusters are appended at the cluster-aligned end of the file, L1 and L2
entries updated right away; compressed clusters are appended at the
sector-aligned end of the file and clusters that do not compress are
written plain; writing into part of a compressed cluster rewrites it
uncompressed first. ``backing_fmt`` is checked but cannot be stored. AES
encrypted images are refused with a clear error (as are creating them).

Better than QEMU: copy-on-write of the untouched part of a new cluster from
the backing file (QEMU relies on 512-byte clusters for that).
"""

from __future__ import annotations

import struct
import zlib
from typing import Any, Iterator

from imagetools.errors import CorruptImageError, ImageError, ImageIOError, ImageOpenError, \
    UnsupportedError
from imagetools.formats._common import (SECTOR, OptionSpec, be_table, file_preallocation,
                                        new_host_file, refuse_options, round_up, table_bytes)
from imagetools.formats._mapped import DATA, OPAQUE, UNALLOC, MappedDriver, Run
from imagetools.formats._writes import ClusterMap
from imagetools.formats.hostfile import HostFile

MAGIC = b"QFI\xfb"
HEADER = struct.Struct(">4sIQIIQBBHIQ")
OFLAG_COMPRESSED = 1 << 63
CRYPT_NONE, CRYPT_AES = 0, 1
L2_CACHE = 64


class QcowDriver(MappedDriver):
    format_name = "qcow"
    supports_backing = True

    create_options = (
        OptionSpec("size", "size", "Virtual disk size"),
        OptionSpec("backing_file", "str", "File name of a base image"),
        OptionSpec("backing_fmt", "str", "Format of the backing image"),
        OptionSpec("encryption", "bool (on/off)", "Encrypt the image with format 'aes'. "
                   "(Deprecated in favor of encrypt.format=aes)"),
        OptionSpec("encrypt.format", "str", "Encrypt the image, format choices: 'aes'"),
        OptionSpec("encrypt.key-secret", "str", "ID of the secret that provides the AES "
                   "encryption key"),
    )

    def __init__(self, file: HostFile, *, read_only: bool) -> None:
        super().__init__(file, read_only=read_only)
        (_magic, version, backing_offset, backing_size, _mtime, size, cluster_bits, l2_bits,
         _pad, crypt, l1_offset) = HEADER.unpack(file.pread_full(0, HEADER.size))
        fail = lambda reason: ImageOpenError(self.filename, reason)   # noqa: E731
        if _magic != MAGIC:
            raise fail("Image not in qcow format")
        if version != 1:
            hint = "\nTry the 'qcow2' driver instead." if version in (2, 3) else ""
            raise fail(f"qcow (v1) does not support qcow version {version}{hint}")
        if size <= 1:
            raise fail("Image size is too small (must be at least 2 bytes)")
        if cluster_bits < 9 or cluster_bits > 16:
            raise fail("Cluster size must be between 512 and 64k")
        if l2_bits < 6 or l2_bits > 13:
            raise fail("L2 table size must be between 512 and 64k")
        if crypt == CRYPT_AES:
            raise UnsupportedError("AES-encrypted qcow images are not supported by qimg; "
                                   "convert them with qemu-img and a key secret")
        if crypt != CRYPT_NONE:
            raise fail("invalid encryption method in qcow header")
        self.cluster_bits = cluster_bits
        self.cluster = 1 << cluster_bits
        self.l2_bits = l2_bits
        self.l2_size = 1 << l2_bits
        self._size = size // SECTOR * SECTOR
        self.offset_mask = (1 << (63 - cluster_bits)) - 1
        shift = cluster_bits + l2_bits
        l1_size = (size + (1 << shift) - 1) >> shift
        if l1_size > 0x7FFFFFFF // 8:
            raise fail("Image too large")
        if l1_offset + 8 * l1_size > file.length():
            raise fail("The L1 table lies beyond the end of the file (truncated image?)")
        self.l1_offset = l1_offset
        self.l1 = be_table(file.pread_full(l1_offset, 8 * l1_size), 8)
        self._backing_name: str | None = None
        if backing_offset:
            if backing_size > 1023:
                raise fail("Backing file name too long")
            raw = file.pread_full(backing_offset, backing_size)
            self._backing_name = raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        self._l2_cache: dict[int, Any] = {}
        self._map = _QcowMap(self)

    # -- class level ----------------------------------------------------------------------

    @classmethod
    def create(cls, filename: str, size: int, options: dict[str, Any]) -> None:
        refuse_options(options, ("backing_file", "backing_fmt", "encryption", "encrypt.format",
                                 "encrypt.key-secret"))
        file_preallocation(options)
        if options.get("encryption") not in (None, False, "off") or options.get("encrypt.format"):
            if options.get("encryption") not in (None, False, "off") and \
                    options.get("encrypt.format"):
                raise ImageError("'encrypt.format' and its alias 'encryption' can't be used at "
                                 "the same time")
            raise UnsupportedError("Creating AES-encrypted qcow images is not supported by "
                                   "qimg (QEMU deprecated them)")
        backing_fmt = options.get("backing_fmt")
        if backing_fmt:
            from imagetools.formats.magic import PROBES
            if backing_fmt not in dict(PROBES):
                raise ImageError(f"unrecognized backing format '{backing_fmt}'")
        size = round_up(size, SECTOR)
        if size == 0:
            raise ImageError("Image size is too small, cannot be zero length")
        backing = options.get("backing_file")
        name = b""
        if backing and backing != "fat:":
            name = str(backing).encode("utf-8", "surrogateescape")
        cluster_bits, l2_bits = (9, 12) if backing else (12, 9)
        header_size = round_up(HEADER.size + len(name), 8)
        shift = cluster_bits + l2_bits
        l1_size = (size + (1 << shift) - 1) >> shift
        header = HEADER.pack(MAGIC, 1, HEADER.size if name else 0, len(name), 0, size,
                             cluster_bits, l2_bits, 0, CRYPT_NONE, header_size)
        l1_bytes = round_up(8 * l1_size, SECTOR)
        file = new_host_file(filename)
        try:
            file.pwrite(0, header + name + bytes(header_size - HEADER.size - len(name)))
            file.pwrite(header_size, bytes(l1_bytes))
            file.flush()
        finally:
            file.close()

    # -- metadata ------------------------------------------------------------------------------

    @property
    def cluster_size(self) -> int:
        return self.cluster

    @property
    def backing_filename(self) -> str | None:
        return self._backing_name

    def has_zero_init(self) -> bool:
        return True

    # -- mapping --------------------------------------------------------------------------------

    def _l2(self, l2_offset: int):
        table = self._l2_cache.get(l2_offset)
        if table is None:
            nbytes = 8 * self.l2_size
            if l2_offset + nbytes > self.file.length():
                raise CorruptImageError(f"qcow L2 table at {l2_offset} lies beyond the end of "
                                        "the file")
            if len(self._l2_cache) >= L2_CACHE:
                self._l2_cache.pop(next(iter(self._l2_cache)))
            table = be_table(self.file.pread_full(l2_offset, nbytes), 8)
            self._l2_cache[l2_offset] = table
        return table

    def entry(self, index: int) -> int:
        l1_index, l2_index = divmod(index, self.l2_size)
        if l1_index >= len(self.l1):
            return 0
        l2_offset = self.l1[l1_index]
        if not l2_offset:
            return 0
        return self._l2(l2_offset)[l2_index]

    def _runs(self, offset: int, length: int) -> Iterator[Run]:
        cs = self.cluster
        span = cs * self.l2_size
        end = offset + length
        pos = offset
        while pos < end:
            l1_index = pos // span
            if l1_index >= len(self.l1) or not self.l1[l1_index]:
                stop = min(end, (l1_index + 1) * span)
                yield Run(pos, stop - pos, UNALLOC)
                pos = stop
                continue
            index = pos // cs
            inner = pos - index * cs
            n = min(cs - inner, end - pos)
            entry = self.entry(index)
            if entry == 0:
                yield Run(pos, n, UNALLOC)
            elif entry & OFLAG_COMPRESSED:
                yield Run(pos, n, OPAQUE, None, self.file, entry)
            elif entry & 511:
                raise ImageIOError(f"qcow cluster offset {entry} is not sector aligned", 5)
            else:
                yield Run(pos, n, DATA, entry + inner, self.file)
            pos += n

    def decompress(self, entry: int) -> bytes:
        cache = self._opaque_cache
        if cache is not None and cache[0] == entry:
            return cache[1]
        offset = entry & self.offset_mask
        csize = (entry >> (63 - self.cluster_bits)) & (self.cluster - 1)
        data = self.file.pread_full(offset, csize)
        try:
            out = zlib.decompressobj(-12).decompress(data, self.cluster)
        except zlib.error:
            out = b""
        if len(out) != self.cluster:
            raise ImageIOError(f"Invalid compressed qcow cluster at offset {offset}", 5)
        self._opaque_cache = (entry, out)
        return out

    def _read_opaque(self, run: Run, offset: int, length: int) -> bytes:
        inner = offset % self.cluster
        return self.decompress(run.tag)[inner:inner + length]

    def _opaque_compressed(self, run: Run) -> bool:
        return True

    # -- writes -----------------------------------------------------------------------------

    def compressor(self):
        cluster = self.cluster

        def compress(data: bytes) -> bytes | None:
            if len(data) < cluster:
                data = bytes(data) + bytes(cluster - len(data))
            c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9)
            out = c.compress(bytes(data)) + c.flush()
            return out if len(out) < cluster else None
        return compress

    def write_compressed_blob(self, offset: int, blob: bytes | None, length: int,
                              plain: bytes | None = None) -> None:
        self._writable()
        if offset % self.cluster or (length != self.cluster and offset + length != self._size):
            raise ImageIOError("Compressed writes must cover one whole cluster", 22)
        if blob is None:
            self.write(offset, plain if plain is not None else bytes(length))
            return
        self._opaque_cache = None
        host = round_up(self.file.length(), SECTOR)
        self.file.pwrite(host, blob)
        entry = host | OFLAG_COMPRESSED | (len(blob) << (63 - self.cluster_bits))
        self._map.set_entry(offset // self.cluster, entry)
        self._map.commit()


class _QcowMap(ClusterMap):
    """Cluster allocation at the cluster-aligned end of the file."""

    def __init__(self, drv: QcowDriver) -> None:
        self.drv = drv
        self.file = drv.file
        self.unit = drv.cluster
        self.dirty: dict[int, list[int]] = {}

    def lookup(self, index: int) -> int | None:
        entry = self.drv.entry(index)
        if entry == 0 or entry & OFLAG_COMPRESSED:
            return None
        return entry

    def fill_backing(self, guest_offset: int, view: memoryview) -> None:
        entry = self.drv.entry(guest_offset // self.unit)
        if entry & OFLAG_COMPRESSED:
            inner = guest_offset % self.unit
            view[:] = self.drv.decompress(entry)[inner:inner + len(view)]
            return
        self.drv._read_backing(guest_offset, view)

    def allocate(self, index: int, count: int) -> int:
        return round_up(self.file.length(), self.unit)

    def _ensure_l2(self, l1_index: int) -> int:
        drv = self.drv
        l2_offset = drv.l1[l1_index]
        if l2_offset:
            return l2_offset
        l2_offset = round_up(self.file.length(), self.unit)
        table = be_table(bytes(8 * drv.l2_size), 8)
        self.file.pwrite(l2_offset, bytes(8 * drv.l2_size))
        drv._l2_cache[l2_offset] = table
        drv.l1[l1_index] = l2_offset
        self.file.pwrite(drv.l1_offset + 8 * l1_index, struct.pack(">Q", l2_offset))
        return l2_offset

    def set_entry(self, index: int, value: int) -> None:
        drv = self.drv
        l1_index, l2_index = divmod(index, drv.l2_size)
        l2_offset = self._ensure_l2(l1_index)
        drv._l2(l2_offset)[l2_index] = value
        self.dirty.setdefault(l2_offset, []).append(l2_index)

    def map_units(self, index: int, count: int, host: int) -> None:
        for i in range(count):
            self.set_entry(index + i, host + i * self.unit)

    def commit(self) -> None:
        drv = self.drv
        for l2_offset, indexes in self.dirty.items():
            lo, hi = min(indexes), max(indexes) + 1
            self.file.pwrite(l2_offset + 8 * lo, table_bytes(drv._l2(l2_offset), lo, hi,
                                                             big_endian=True))
        self.dirty = {}


DRIVER = QcowDriver
