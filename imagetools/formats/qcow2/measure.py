"""``qemu-img measure -O qcow2``: file sizes a new qcow2 image would need.

``fully-allocated`` is QEMU's estimate for every guest cluster written:
header, L2 tables (rounded to whole L2 tables), the L1 table (rounded to a
cluster), the data, and the refcount table and blocks for all of that (the
fixed point of "refcounts must count themselves"). ``required`` removes the
data clusters the source does not need: only clusters holding allocated,
non-zero data in the source chain are counted (a data run is extended to
the end of its cluster). ``bitmaps`` is the room the source's persistent
bitmaps would take (data, tables and the directory), present only when both
the source and the target (qcow2 v3) can hold bitmaps.
"""

from __future__ import annotations

from imagetools.errors import ImageError
from imagetools.formats.base import Driver
from imagetools.formats.qcow2 import header as hdr

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from typing import Any


def refcount_metadata_size(clusters: int, cluster_size: int, refcount_order: int) -> int:
    """Bytes of refcount table and blocks needed to count ``clusters`` and themselves."""
    per_table_cluster = cluster_size // 8
    per_block = cluster_size * 8 // (1 << refcount_order)
    table = blocks = 0
    n = 0
    while True:
        last = n
        blocks = -(-(clusters + table + blocks) // per_block)
        table = -(-blocks // per_table_cluster)
        n = clusters + blocks + table
        if n == last:
            return (blocks + table) * cluster_size


def prealloc_size(total_size: int, cluster_size: int, refcount_order: int,
                  extended_l2: bool) -> int:
    """QEMU's qcow2_calc_prealloc_size: the file size with every cluster allocated."""
    aligned = -(-total_size // cluster_size) * cluster_size
    l2e_size = 16 if extended_l2 else 8
    meta = cluster_size
    nl2e = aligned // cluster_size
    per_l2 = cluster_size // l2e_size
    nl2e = -(-nl2e // per_l2) * per_l2
    meta += nl2e * l2e_size
    nl1e = nl2e * l2e_size // cluster_size
    per_l1_cluster = cluster_size // 8
    nl1e = -(-nl1e // per_l1_cluster) * per_l1_cluster
    meta += nl1e * 8
    meta += refcount_metadata_size((meta + aligned) // cluster_size, cluster_size,
                                   refcount_order)
    return meta + aligned


def _dir_entry_size(name_len: int, extra: int = 0) -> int:
    return (24 + name_len + extra + 7) & ~7


def bitmaps_size(source: Driver, cluster_size: int) -> int:
    """Room for the source's persistent bitmaps in a qcow2 target."""
    get = getattr(source, "bitmaps", None)
    if get is None:
        return 0
    total = 0
    dir_size = 0
    for bm in get():
        if bm.flags & 1:           # in use: QEMU does not load it
            continue
        bits = -(-source.size // bm.granularity)
        data_clusters = -(-(-(-bits // 8)) // cluster_size)
        table_clusters = -(-(data_clusters * 8) // cluster_size)
        total += (data_clusters + table_clusters) * cluster_size
        dir_size += _dir_entry_size(len(bm.name.encode()))
    if dir_size:
        total += -(-dir_size // cluster_size) * cluster_size
    return total


def measure(options: dict[str, Any], size: int | None = None,
            source: Driver | None = None) -> dict[str, int]:
    """``{"required", "fully-allocated"[, "bitmaps"]}`` for a qcow2 target."""
    from imagetools.formats.qcow2.create import parse_bool, parse_number, parse_size
    from imagetools.formats.qcow2.create import PREALLOC_MODES
    for key in options:
        if key.startswith("encrypt") and options[key] not in (None, False, "off"):
            raise ImageError("Encrypted qcow2 images are not supported by qimg yet")
    extended_l2 = parse_bool("extended_l2", options.get("extended_l2", False))
    cluster_size = parse_size("cluster_size", options.get("cluster_size", 65536))
    if cluster_size < 512 or cluster_size > 2 << 20 or cluster_size & (cluster_size - 1):
        raise ImageError("Cluster size must be a power of two between 512 and 2048k")
    compat = str(options.get("compat") or "1.1")
    versions = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}
    if compat not in versions:
        raise ImageError(f"Parameter 'version' does not accept value '{compat}'")
    version = versions[compat]
    refcount_bits = parse_number("refcount_bits", options.get("refcount_bits", 16))
    if refcount_bits < 1 or refcount_bits > 64 or refcount_bits & (refcount_bits - 1):
        raise ImageError("Refcount width must be a power of two and may not exceed 64 bits")
    if version < 3 and refcount_bits != 16:
        raise ImageError("Different refcount widths than 16 bits require compatibility "
                         "level 1.1 or above (use version=v3 or greater)")
    prealloc = str(options.get("preallocation") or "off")
    if prealloc not in PREALLOC_MODES:
        raise ImageError(f"Parameter 'preallocation' does not accept value '{prealloc}'")
    refcount_order = refcount_bits.bit_length() - 1
    if source is not None:
        ssize = source.size
        virtual_size = -(-ssize // cluster_size) * cluster_size
        if prealloc in ("full", "falloc"):
            required = virtual_size
        else:
            required = _required_data(source, ssize, cluster_size)
    else:
        virtual_size = -(-(size or 0) // cluster_size) * cluster_size
        required = virtual_size if prealloc in ("full", "falloc") else 0
    l2e_size = 16 if extended_l2 else 8
    l2_tables = -(-(virtual_size // cluster_size) // (cluster_size // l2e_size))
    if l2_tables * 8 > hdr.QCOW_MAX_L1_SIZE:
        raise ImageError("The image size is too large (try using a larger cluster size)")
    fully = prealloc_size(virtual_size, cluster_size, refcount_order, extended_l2)
    out = {"required": fully - virtual_size + required, "fully-allocated": fully}
    if version >= 3 and source is not None and source.format_name == "qcow2" and \
            getattr(source, "header", None) is not None and source.header.version >= 3:
        out["bitmaps"] = bitmaps_size(source, cluster_size)
    return out


def _required_data(source: Driver, ssize: int, cluster_size: int) -> int:
    """Bytes of whole clusters holding allocated, non-zero data in the source chain."""
    required = 0
    cursor = 0
    for ext in source.block_status(0, ssize):
        if ext.end <= cursor:
            continue
        start = max(cursor, ext.start)
        if ext.zero or not (ext.data and ext.present):
            cursor = ext.end
            continue
        end = -(-ext.end // cluster_size) * cluster_size
        required += end - start // cluster_size * cluster_size
        cursor = end
    return required
