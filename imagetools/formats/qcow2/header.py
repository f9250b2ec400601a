"""The qcow2 header and header extensions: parsing, validation, rewriting.

Field names follow docs/interop/qcow2 (../shared/spec/qcow2.txt). Parsing
checks every field before anything else uses it and fails with the message
QEMU 7.2 gives (``Unsupported qcow2 version 5``, ``Unsupported cluster
size: 2^8``, ``Unsupported qcow2 feature(s): ...``); sizes that QEMU caps
(L1 table 32 MiB, refcount table 8 MiB, 65536 snapshots) are capped here
too, so a hostile header can never make us allocate or read unbounded
memory.

Header extensions are kept in file order, unknown ones verbatim, so that a
rewrite of the header (dirty bit, backing file change, ...) preserves them.
"""

from __future__ import annotations

import struct

from imagetools.errors import CorruptImageError, ImageError, UnsupportedError

QCOW_MAGIC = b"QFI\xfb"

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
QCOW_MAX_L1_SIZE = 0x2000000          # bytes (32 MiB)
QCOW_MAX_REFTABLE_SIZE = 0x800000     # bytes (8 MiB)
QCOW_MAX_SNAPSHOTS = 65536
QCOW_MAX_BACKING_NAME = 1023

# incompatible feature bits
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_MASK = 0x1F
# compatible feature bits
COMPAT_LAZY_REFCOUNTS = 1 << 0
# autoclear feature bits
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
AUTOCLEAR_MASK = 0x3

CRYPT_NONE, CRYPT_AES, CRYPT_LUKS = 0, 1, 2
COMPRESSION_ZLIB, COMPRESSION_ZSTD = 0, 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_CRYPTO_HEADER = 0x0537BE77
EXT_BITMAPS = 0x23852875
EXT_DATA_FILE = 0x44415441

V2_HEADER_LENGTH = 72
V3_HEADER_LENGTH = 104      # the fields through header_length
QEMU_HEADER_LENGTH = 112    # what QEMU 7.2 writes (compression_type + padding)

_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
_V3 = struct.Struct(">QQQII")

#: the feature name table QEMU 7.2 writes (type, bit, name)
FEATURE_TABLE = (
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
)


def encode_feature_table(table=FEATURE_TABLE) -> bytes:
    return b"".join(struct.pack(">BB46s", t, b, name.encode()) for t, b, name in table)


class HeaderExtension:
    """One header extension: ``kind`` (the magic) and its ``data`` bytes."""

    __slots__ = ("kind", "data")

    def __init__(self, kind: int, data: bytes) -> None:
        self.kind = kind
        self.data = data

    def encode(self) -> bytes:
        pad = -len(self.data) % 8
        return struct.pack(">II", self.kind, len(self.data)) + self.data + bytes(pad)

    def __repr__(self) -> str:
        return f"HeaderExtension({self.kind:#x}, {len(self.data)} bytes)"


class Header:
    """The parsed qcow2 header (all integers, names as in the spec)."""

    def __init__(self) -> None:
        self.version = 3
        self.backing_file_offset = 0
        self.backing_file_size = 0
        self.cluster_bits = 16
        self.size = 0
        self.crypt_method = 0
        self.l1_size = 0
        self.l1_table_offset = 0
        self.refcount_table_offset = 0
        self.refcount_table_clusters = 0
        self.nb_snapshots = 0
        self.snapshots_offset = 0
        self.incompatible_features = 0
        self.compatible_features = 0
        self.autoclear_features = 0
        self.refcount_order = 4
        self.header_length = QEMU_HEADER_LENGTH
        self.compression_type = COMPRESSION_ZLIB
        #: header bytes beyond the fields we know, kept verbatim
        self.unknown_fields = b""
        self.extensions: list[HeaderExtension] = []
        self.backing_file: str | None = None

    # -- derived ---------------------------------------------------------

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    def extension(self, kind: int) -> HeaderExtension | None:
        for ext in self.extensions:
            if ext.kind == kind:
                return ext
        return None

    def set_extension(self, kind: int, data: bytes | None) -> None:
        """Replace (or with None remove) the extension of ``kind``."""
        for i, ext in enumerate(self.extensions):
            if ext.kind == kind:
                if data is None:
                    del self.extensions[i]
                else:
                    ext.data = data
                return
        if data is not None:
            # QEMU writes the backing format first, then the rest
            if kind == EXT_BACKING_FORMAT:
                self.extensions.insert(0, HeaderExtension(kind, data))
            else:
                self.extensions.append(HeaderExtension(kind, data))

    @property
    def backing_format(self) -> str | None:
        ext = self.extension(EXT_BACKING_FORMAT)
        return _cstring(ext.data) if ext else None

    @property
    def data_file(self) -> str | None:
        ext = self.extension(EXT_DATA_FILE)
        return _cstring(ext.data) if ext else None

    def feature_names(self) -> dict[tuple[int, int], str]:
        ext = self.extension(EXT_FEATURE_TABLE)
        names: dict[tuple[int, int], str] = {}
        if ext is None:
            return names
        for pos in range(0, len(ext.data) - 47, 48):
            ftype, bit = ext.data[pos], ext.data[pos + 1]
            name = ext.data[pos + 2:pos + 48].split(b"\0", 1)[0]
            if not name:
                break
            names.setdefault((ftype, bit), name.decode("utf-8", "replace"))
        return names

    # -- encoding --------------------------------------------------------

    def encode(self, cluster_size: int | None = None) -> bytes:
        """The header cluster's used bytes: fields, extensions, end, backing name.

        Raises ImageError when it does not fit in one cluster.
        """
        backing = (self.backing_file or "").encode()
        head = _V2.pack(QCOW_MAGIC, self.version, 0, len(backing), self.cluster_bits,
                        self.size, self.crypt_method, self.l1_size, self.l1_table_offset,
                        self.refcount_table_offset, self.refcount_table_clusters,
                        self.nb_snapshots, self.snapshots_offset)
        if self.version >= 3:
            head += _V3.pack(self.incompatible_features, self.compatible_features,
                             self.autoclear_features, self.refcount_order, self.header_length)
            tail = bytes([self.compression_type]) if self.header_length > 104 else b""
            tail += bytes(max(0, min(self.header_length, 112) - 104 - len(tail)))
            head += tail + self.unknown_fields
            head = head[:self.header_length].ljust(self.header_length, b"\0")
            exts = b"".join(e.encode() for e in self.extensions)
            exts += struct.pack(">II", EXT_END, 0)
        else:
            exts = b"".join(e.encode() for e in self.extensions)
            if exts:
                exts += struct.pack(">II", EXT_END, 0)
        out = bytearray(head + exts)
        if backing:
            struct.pack_into(">Q", out, 8, len(out))
            out += backing
        limit = cluster_size or self.cluster_size
        if len(out) > limit:
            raise ImageError("Cannot update the qcow2 header: it does not fit in one cluster")
        return bytes(out)


def _cstring(data: bytes) -> str:
    """A name stored in an extension, read as QEMU reads it (up to a NUL)."""
    return data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _u32(buf: bytes, off: int) -> int:
    return struct.unpack_from(">I", buf, off)[0]


def parse_header(buf: bytes, file_length: int, *, check_mode: bool = False) -> Header:
    """Parse and validate the header cluster ``buf`` (zero padded past EOF).

    ``file_length`` is the host file's length (a header shorter than the
    fields it declares is refused). Messages are QEMU 7.2's where it has one.
    ``check_mode`` (QEMU's BDRV_O_CHECK) accepts an image without a refcount
    table, so that ``check`` can report what is wrong with it.
    """
    if len(buf) < V3_HEADER_LENGTH:
        buf = buf.ljust(V3_HEADER_LENGTH, b"\0")
    h = Header()
    (magic, h.version, h.backing_file_offset, h.backing_file_size, h.cluster_bits, h.size,
     h.crypt_method, h.l1_size, h.l1_table_offset, h.refcount_table_offset,
     h.refcount_table_clusters, h.nb_snapshots, h.snapshots_offset) = _V2.unpack_from(buf, 0)
    if magic != QCOW_MAGIC:
        raise ImageError("Image is not in qcow2 format")
    if h.version < 2 or h.version > 3:
        raise UnsupportedError(f"Unsupported qcow2 version {h.version}")
    if h.cluster_bits < MIN_CLUSTER_BITS or h.cluster_bits > MAX_CLUSTER_BITS:
        raise UnsupportedError(f"Unsupported cluster size: 2^{h.cluster_bits}")
    cluster_size = 1 << h.cluster_bits
    if h.version == 2:
        h.incompatible_features = h.compatible_features = h.autoclear_features = 0
        h.refcount_order = 4
        h.header_length = V2_HEADER_LENGTH
    else:
        (h.incompatible_features, h.compatible_features, h.autoclear_features,
         h.refcount_order, h.header_length) = _V3.unpack_from(buf, 72)
        if h.header_length < V3_HEADER_LENGTH:
            raise CorruptImageError("qcow2 header too short")
    if file_length < min(h.header_length, V3_HEADER_LENGTH if h.version == 3 else 72):
        raise CorruptImageError("qcow2 header too short")
    if h.header_length > cluster_size:
        raise CorruptImageError("qcow2 header exceeds cluster size")
    if h.backing_file_offset > cluster_size:
        raise CorruptImageError("Invalid backing file offset")
    if h.header_length > 104:
        h.compression_type = buf[104]
        h.unknown_fields = bytes(buf[112:h.header_length]) if h.header_length > 112 else b""
    _validate_compression(h)
    ext_end = h.backing_file_offset or cluster_size
    h.extensions = _parse_extensions(buf, h.header_length, ext_end, strict=True)
    unknown = h.incompatible_features & ~INCOMPAT_MASK
    if unknown:
        raise UnsupportedError(_unsupported_features(h, unknown))
    if h.refcount_order > 6:
        raise CorruptImageError("Reference count entry width too large; may not exceed 64 bits")
    if h.refcount_table_clusters == 0 and not check_mode:
        raise CorruptImageError("Image does not contain a reference count table")
    _validate_table(h.refcount_table_offset, h.refcount_table_clusters, cluster_size,
                    QCOW_MAX_REFTABLE_SIZE, "Reference count table", cluster_size)
    _validate_table(h.snapshots_offset, h.nb_snapshots, 40, 40 * QCOW_MAX_SNAPSHOTS,
                    "Snapshot table", cluster_size)
    _validate_table(h.l1_table_offset, h.l1_size, 8, QCOW_MAX_L1_SIZE, "Active L1 table",
                    cluster_size)
    l2_entries = cluster_size // (16 if h.extended_l2 else 8)
    if h.extended_l2 and cluster_size // 32 < 512:
        raise UnsupportedError(f"Unsupported subcluster size: {cluster_size // 32}")
    if h.size >= 1 << 63:
        raise CorruptImageError("Image is too big")
    l1_needed = -(-h.size // (cluster_size * l2_entries))
    if l1_needed > 0x7FFFFFFF:
        raise CorruptImageError("Image is too big")
    if h.l1_size < l1_needed:
        raise CorruptImageError("L1 table is too small")
    if h.backing_file_offset:
        n = h.backing_file_size
        if n > min(QCOW_MAX_BACKING_NAME, cluster_size - h.backing_file_offset):
            raise CorruptImageError("Backing file name too long")
        raw = bytes(buf[h.backing_file_offset:h.backing_file_offset + n])
        # QEMU reads it as a C string: a NUL ends it
        h.backing_file = raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    # Tables that lie (partly) past the end of the file are not refused:
    # QEMU reads zeros there, opens the image and lets check report and
    # repair it. The limits above bound what such a table can make us read.
    return h


def _validate_compression(h: Header) -> None:
    if h.compression_type not in COMPRESSION_NAMES:
        raise UnsupportedError(f"qcow2: unknown compression type: {h.compression_type}")
    if h.compression_type == COMPRESSION_ZLIB:
        if h.incompatible_features & INCOMPAT_COMPRESSION:
            raise CorruptImageError("qcow2: Compression type incompatible feature bit must "
                                    "not be set")
    elif not h.incompatible_features & INCOMPAT_COMPRESSION:
        raise CorruptImageError("qcow2: Compression type incompatible feature bit must be set")


def _validate_table(offset: int, entries: int, entry_len: int, max_bytes: int, name: str,
                    cluster_size: int) -> None:
    if entries > max_bytes // entry_len:
        raise CorruptImageError(f"{name} too large")
    if (1 << 63) - 1 - entries * entry_len < offset or offset % cluster_size:
        raise CorruptImageError(f"{name} offset invalid")


def _parse_extensions(buf: bytes, start: int, end: int, *, strict: bool) -> list[HeaderExtension]:
    exts: list[HeaderExtension] = []
    offset = start
    while offset < end:
        if offset + 8 > len(buf):
            break
        kind, length = struct.unpack_from(">II", buf, offset)
        offset += 8
        if offset > end or length > end - offset:
            if strict:
                raise CorruptImageError("Header extension too large")
            break
        if kind == EXT_END:
            break
        data = bytes(buf[offset:offset + length])
        if kind == EXT_BACKING_FORMAT and length >= 16:
            raise CorruptImageError(f"ERROR: ext_backing_format: len={length} too large (>=16)")
        exts.append(HeaderExtension(kind, data))
        offset += (length + 7) & ~7
    return exts


def _unsupported_features(h: Header, mask: int) -> str:
    names = h.feature_names()
    parts = []
    for (ftype, bit), name in names.items():
        if ftype == 0 and mask & (1 << bit):
            parts.append(name[:46])
            mask &= ~(1 << bit)
    if mask:
        parts.append(f"Unknown incompatible feature: {mask:x}")
    return "Unsupported qcow2 feature(s): " + ", ".join(parts)
