"""Creating qcow2 images as ``qemu-img create -f qcow2`` does.

The layout is QEMU 7.2's: the header cluster, the refcount table in cluster
1, one refcount block in cluster 2, the L1 table from cluster 3 (written
only as far as its entries go, so a fresh 64 MiB image is 196616 bytes).
Header extensions come in QEMU's order (backing format, external data file,
feature name table -- only for clusters above 4 KiB, as 7.2 writes it),
then the end marker and the backing file name.

Preallocation: ``metadata`` allocates every L2 table and data cluster (L2
table first, then its clusters) and leaves the data sparse; ``falloc``
also reserves the space; ``full`` writes zeros. With a backing file only
``extended_l2`` images can be preallocated (their subclusters stay
unallocated), as in QEMU.

Options (the ``-o`` names; values as typed or already converted): compat
(0.10 | v2 | 1.1 | v3), cluster_size, extended_l2, preallocation,
compression_type (zlib | zstd), lazy_refcounts, refcount_bits,
backing_file, backing_fmt, data_file, data_file_raw, and the file-protocol
nocow / extent_size_hint (accepted). Encryption options are refused.
Messages are qemu-img's.
"""

from __future__ import annotations

import struct

from imagetools.errors import ImageError, UnsupportedError
from imagetools.formats.hostfile import HostFile
from imagetools.formats.qcow2 import header as hdr
from imagetools.formats.qcow2.layout import QCOW_OFLAG_COPIED, Layout

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from typing import Any

KNOWN_OPTIONS = {
    "size", "compat", "backing_file", "backing_fmt", "data_file", "data_file_raw",
    "encryption", "cluster_size", "extended_l2", "preallocation", "lazy_refcounts",
    "refcount_bits", "compression_type", "nocow", "extent_size_hint",
}
PREALLOC_MODES = ("off", "metadata", "falloc", "full")
_V3_ONLY = "only supported with compatibility level 1.1 and above (use version=v3 or greater)"


def parse_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("on", "yes", "true", "y"):
        return True
    if text in ("off", "no", "false", "n"):
        return False
    raise ImageError(f"Parameter '{name}' expects 'on' or 'off'")


def parse_number(name: str, value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        return int(str(value), 0)
    except ValueError:
        raise ImageError(f"Parameter '{name}' expects a number") from None


def parse_size(name: str, value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        from imagetools.sizes import parse_size as qemu_parse_size
    except ImportError:   # the CLI normally converts sizes before we see them
        qemu_parse_size = None
    try:
        return qemu_parse_size(str(value)) if qemu_parse_size else int(str(value))
    except (ValueError, ImageError):
        raise ImageError(f"Parameter '{name}' expects a non-negative number below 2^64\n"
                         "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, "
                         "peta-\nand exabytes, respectively.") from None


class CreateSpec:
    """Validated creation parameters."""

    def __init__(self, size: int, options: dict[str, Any]) -> None:
        for key in options:
            if key not in KNOWN_OPTIONS and not key.startswith("encrypt."):
                raise ImageError(f"Invalid parameter '{key}'")
        get = options.get
        if get("encryption") not in (None, False, "off") or any(
                k.startswith("encrypt.") for k in options):
            raise UnsupportedError("Encrypted qcow2 images are not supported by qimg yet")
        compat = str(get("compat") or "1.1")
        versions = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}
        if compat not in versions:
            raise ImageError(f"Parameter 'version' does not accept value '{compat}'")
        self.version = versions[compat]
        prealloc = str(get("preallocation") or "off")
        if prealloc not in PREALLOC_MODES:
            raise ImageError(f"Parameter 'preallocation' does not accept value '{prealloc}'")
        self.preallocation = prealloc
        ctype = str(get("compression_type") or "zlib")
        if ctype not in ("zlib", "zstd"):
            raise ImageError(f"Parameter 'compression-type' does not accept value '{ctype}'")
        self.compression_type = hdr.COMPRESSION_ZSTD if ctype == "zstd" else hdr.COMPRESSION_ZLIB
        self.extended_l2 = parse_bool("extended_l2", get("extended_l2", False))
        self.lazy_refcounts = parse_bool("lazy_refcounts", get("lazy_refcounts", False))
        self.data_file_raw = parse_bool("data_file_raw", get("data_file_raw", False))
        self.cluster_size = parse_size("cluster_size", get("cluster_size", 65536))
        self.refcount_bits = parse_number("refcount_bits", get("refcount_bits", 16))
        self.backing_file = get("backing_file") or None
        self.backing_fmt = get("backing_fmt") or None
        self.data_file = get("data_file") or None
        self.size = (size + 511) // 512 * 512
        self._validate()

    def _validate(self) -> None:
        cs = self.cluster_size
        if self.extended_l2:
            if self.version < 3:
                raise ImageError(f"Extended L2 entries are {_V3_ONLY}")
            if cs < 16384 and cs > 0 and cs & (cs - 1) == 0:
                raise ImageError("Extended L2 entries are only supported with cluster sizes "
                                 "of at least 16384 bytes")
        if cs < 512 or cs > 2 << 20 or cs & (cs - 1):
            raise ImageError("Cluster size must be a power of two between 512 and 2048k")
        if self.extended_l2 and cs < 16384:
            raise ImageError("Extended L2 entries are only supported with cluster sizes "
                             "of at least 16384 bytes")
        rb = self.refcount_bits
        if rb < 1 or rb > 64 or rb & (rb - 1):
            raise ImageError("Refcount width must be a power of two and may not exceed 64 bits")
        if self.version < 3 and rb != 16:
            raise ImageError("Different refcount widths than 16 bits require compatibility "
                             "level 1.1 or above (use version=v3 or greater)")
        if self.version < 3 and self.lazy_refcounts:
            raise ImageError(f"Lazy refcounts {_V3_ONLY}")
        if self.backing_file and self.preallocation != "off" and not self.extended_l2:
            raise ImageError("Backing file and preallocation can only be used at the same "
                             "time if extended_l2 is on")
        if self.backing_fmt and not self.backing_file:
            raise ImageError("Backing format cannot be used without backing file")
        if self.data_file_raw and not self.data_file:
            raise ImageError("data-file-raw requires data-file")
        if self.data_file_raw and self.backing_file:
            raise ImageError("Backing file and data-file-raw cannot be used at the same time")
        if self.data_file and self.version < 3:
            raise ImageError(f"External data files are {_V3_ONLY}")
        if self.compression_type != hdr.COMPRESSION_ZLIB and self.version < 3:
            raise ImageError(f"Non-zlib compression type is {_V3_ONLY}")
        if self.backing_file and len(self.backing_file.encode()) > hdr.QCOW_MAX_BACKING_NAME:
            raise ImageError("Backing file name too long")
        l2_entries = cs // (16 if self.extended_l2 else 8)
        l1_entries = -(-self.size // (cs * l2_entries))
        from imagetools.formats.base import BDRV_MAX_LENGTH
        if self.size > BDRV_MAX_LENGTH:
            # QEMU sizes the new image with a block-layer truncate, which
            # refuses this before the driver's L1 check
            raise ImageError(f"Could not resize image: offset({self.size}) exceeds "
                             f"maximum({BDRV_MAX_LENGTH})")
        if l1_entries > hdr.QCOW_MAX_L1_SIZE // 8:
            raise ImageError("The image size is too large for file format 'qcow2' (try using "
                             "a larger cluster size)")
        self.l1_entries = l1_entries
        self.refcount_order = rb.bit_length() - 1
        if self.data_file_raw and self.preallocation == "off":
            # a raw data file is the image: every cluster is mapped 1:1 from the start
            self.preallocation = "metadata"


def build_header(spec: CreateSpec) -> hdr.Header:
    """The header of a fresh image (tables at QEMU's places)."""
    cs = spec.cluster_size
    h = hdr.Header()
    h.version = spec.version
    h.cluster_bits = cs.bit_length() - 1
    h.size = spec.size
    h.refcount_table_offset = cs
    h.refcount_table_clusters = 1
    h.refcount_order = spec.refcount_order
    h.l1_size = spec.l1_entries
    h.l1_table_offset = 3 * cs if spec.l1_entries else 0
    h.backing_file = spec.backing_file
    if spec.version >= 3:
        h.header_length = hdr.QEMU_HEADER_LENGTH
        h.compression_type = spec.compression_type
        if spec.compression_type != hdr.COMPRESSION_ZLIB:
            h.incompatible_features |= hdr.INCOMPAT_COMPRESSION
        if spec.extended_l2:
            h.incompatible_features |= hdr.INCOMPAT_EXTL2
        if spec.data_file:
            h.incompatible_features |= hdr.INCOMPAT_DATA_FILE
        if spec.data_file_raw:
            h.autoclear_features |= hdr.AUTOCLEAR_DATA_FILE_RAW
        if spec.lazy_refcounts:
            h.compatible_features |= hdr.COMPAT_LAZY_REFCOUNTS
    else:
        h.header_length = hdr.V2_HEADER_LENGTH
    if spec.backing_file and spec.backing_fmt:
        h.extensions.append(hdr.HeaderExtension(hdr.EXT_BACKING_FORMAT,
                                                spec.backing_fmt.encode()))
    if spec.data_file:
        h.extensions.append(hdr.HeaderExtension(hdr.EXT_DATA_FILE, spec.data_file.encode()))
    if spec.version >= 3 and cs > 4096:
        h.extensions.append(hdr.HeaderExtension(hdr.EXT_FEATURE_TABLE,
                                                hdr.encode_feature_table()))
    return h


def create(filename: str, size: int, options: dict[str, Any]) -> None:
    """Create ``filename`` as a qcow2 image of ``size`` bytes (see module doc)."""
    spec = CreateSpec(size, options)
    h = build_header(spec)
    head = h.encode()
    cs = spec.cluster_size
    if spec.data_file:
        _create_data_file(filename, spec)
    file = HostFile.open(filename, read_only=False, create=True)
    try:
        file.truncate(0)
        layout = Layout(h)
        meta_clusters = 3 + (-(-spec.l1_entries * 8 // cs) if spec.l1_entries else 0)
        # whole clusters, as QEMU writes them (its metadata-preallocation
        # heuristic compares allocated bytes with used clusters)
        file.pwrite(0, head.ljust(cs, b"\0"))
        file.pwrite(cs, struct.pack(">Q", 2 * cs).ljust(cs, b"\0"))
        file.pwrite(2 * cs, _refblock(layout, meta_clusters))
        if spec.l1_entries:
            file.pwrite(3 * cs, bytes(8 * spec.l1_entries))
        else:
            file.truncate(3 * cs)
        file.flush()
        if file.pread_full(0, 4) != hdr.QCOW_MAGIC:
            # QEMU opens the new image to size it; a device that keeps
            # nothing (/dev/null) fails there
            raise ImageError("Image is not in qcow2 format")
    finally:
        file.close()
    if spec.preallocation != "off":
        _preallocate(filename, spec)


def _refblock(layout: Layout, used: int) -> bytes:
    """A refcount block with refcount 1 for clusters 0..used-1."""
    bits = layout.refcount_bits
    entries = layout.refblock_entries
    if used > entries:
        raise ImageError("The L1 table of this image is too large for its first refcount block")
    if bits >= 8:
        width = bits // 8
        one = (1).to_bytes(width, "big")
        return one * used + bytes(width * (entries - used))
    per = 8 // bits
    value = 0
    for i in range(used):
        value |= 1 << (i * bits)
    return value.to_bytes((used + per - 1) // per, "little").ljust(layout.cluster_size, b"\0")


def _create_data_file(filename: str, spec: CreateSpec) -> None:
    from imagetools.formats.raw import create_file
    # QEMU 7.2 creates (and opens) a relative data file name relative to the
    # working directory, not to the image.
    file = HostFile.open(spec.data_file, read_only=False, create=True)
    try:
        mode = spec.preallocation if spec.preallocation in ("falloc", "full") else "off"
        create_file(file, spec.size, mode)
    finally:
        file.close()


def _preallocate(filename: str, spec: CreateSpec) -> None:
    """Allocate every L2 table and data cluster (QEMU's preallocation modes)."""
    from imagetools.formats.qcow2.driver import Qcow2Driver
    drv = Qcow2Driver.open(filename, read_only=False)
    try:
        preallocate(drv, spec.preallocation, has_backing=bool(spec.backing_file))
    finally:
        drv.close()


def preallocate(drv, mode: str, *, has_backing: bool = False) -> None:
    """Allocate host clusters for the whole guest range of ``drv`` (fresh image).

    Each L2 table is allocated, then the data clusters it maps, as QEMU's
    metadata preallocation lays them out. Extended-L2 clusters keep all
    subclusters unallocated (so a backing file still shows through).
    """
    layout = drv.layout
    cs = drv.cluster_size
    total = layout.clusters(drv.size)
    ranges = []
    if mode in ("falloc", "full") and drv.data_file is None:
        # QEMU first moves the refcount table behind the L1 table; the first
        # L2 table then takes the table's old place and the data follows.
        drv.refcounts.move_table()
        drv.writeback()
    for l1i in range(layout.l1_entries_for(drv.size)):
        table = drv._l2_for_write(l1i)
        first_ci = l1i * layout.l2_entries
        count = min(layout.l2_entries, total - first_ci)
        if drv.data_file is not None:
            base = first_ci * cs
        else:
            base = drv.refcounts.allocate(count) * cs
            ranges.append((base, count * cs))
        for k in range(count):
            drv._set_entry(table, k, (base + k * cs) | QCOW_OFLAG_COPIED, 0)
        drv.writeback()
    file = drv.file
    end = max((start + n for start, n in ranges), default=0)
    if end > file.length():
        file.truncate(end)
    for start, n in ranges:
        if mode == "full":
            file.write_zero_data(start, n)
        elif mode == "falloc":
            file.fallocate(start, n)
    drv.writeback()
