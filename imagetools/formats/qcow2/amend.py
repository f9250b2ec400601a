"""Changing the options of an existing qcow2 image (qemu-img amend).

QEMU 7.2's qcow2_amend_options, in its order and with its messages: the
options are checked; an upgrade to v3 comes first (snapshot table entries
get their v3 extra data); then a new refcount width; the data file options
and the header; the backing file may not change; lazy refcounts on or off;
a new size; a downgrade to v2 comes last (zero clusters are expanded, the
v3-only features must be gone).

Every step keeps the image consistent when interrupted:

* a refcount width change builds the new refcount blocks and table in
  clusters the old structure already counts, then switches the header (one
  write) and frees the old structure;
* zero clusters are expanded as writes are done (data, refcounts, then the
  tables; L2 tables only snapshots use are written after their clusters'
  refcounts), and the version changes last, in one header write.

Progress is reported as QEMU reports it (``progress(done, total)``).
"""

from __future__ import annotations

from array import array

from imagetools.errors import ImageError, UnsupportedError, c_hex
from imagetools.formats.qcow2 import header as hdr
from imagetools.formats.qcow2.layout import (
    L1E_OFFSET_MASK, L2E_OFFSET_MASK, QCOW_OFLAG_COPIED, REFT_OFFSET_MASK, ZERO_ALLOC,
    ZERO_PLAIN)
from imagetools.formats.qcow2.tables import be64_bytes, read_be64_array

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable

    from imagetools.formats.qcow2.driver import Qcow2Driver

_V3_ONLY = "compatibility level 1.1 and above (use compat=1.1 or greater)"


class _Helper:
    """QEMU's qcow2_amend_helper_cb: one progress scale over several operations."""

    def __init__(self, progress, total_operations: int) -> None:
        self.progress = progress
        self.total = total_operations
        self.current = self.last = None
        self.done_ops = 0
        self.offset_completed = 0
        self.last_size = 0

    def start(self, name: str) -> None:
        self.current = name

    def __call__(self, offset: int, size: int) -> None:
        if self.progress is None:
            return
        if self.current != self.last:
            if self.last is not None:
                self.offset_completed += self.last_size
                self.done_ops += 1
            self.last = self.current
        self.last_size = size
        current = self.offset_completed + size
        projected = current * (self.total - self.done_ops - 1) // (self.done_ops + 1)
        self.progress(self.offset_completed + offset, current + projected)


def amend(drv: "Qcow2Driver", options: dict[str, Any], *, force: bool = False,
          progress: Callable[[int, int], None] | None = None) -> None:
    h = drv.header
    old_version = new_version = h.version
    new_size = 0
    backing_given = "backing_file" in options or "backing_fmt" in options
    lazy = drv.lazy_refcounts
    data_file_raw = drv.data_file_raw
    data_file = None
    refcount_bits = h.refcount_bits
    for name, value in options.items():
        if name == "compat":
            if value in ("0.10", "v2"):
                new_version = 2
            elif value in ("1.1", "v3"):
                new_version = 3
            else:
                raise ImageError(f"Unknown compatibility level {value}")
        elif name == "size":
            new_size = value
        elif name.startswith("encrypt."):
            if not drv.encrypted:
                raise ImageError("Can't amend encryption options - encryption not present")
            if h.crypt_method != hdr.CRYPT_LUKS:
                raise UnsupportedError("Only LUKS encryption options can be amended")
            raise UnsupportedError("Amending LUKS encryption options is not supported by qimg")
        elif name == "lazy_refcounts":
            lazy = value
        elif name == "refcount_bits":
            if value <= 0 or value > 64 or value & (value - 1):
                raise ImageError("Refcount width must be a power of two and may not exceed "
                                 "64 bits")
            refcount_bits = value
        elif name == "data_file":
            data_file = value
            if data_file and drv.data_filename is None:
                raise ImageError("data-file can only be set for images that use an external "
                                 "data file")
        elif name == "data_file_raw":
            data_file_raw = value
            if data_file_raw and not drv.data_file_raw:
                raise ImageError("data-file-raw cannot be set on existing images")
    drv._writable_metadata()
    drv.refuse_uncounted_metadata()
    helper = _Helper(progress, (new_version != old_version) + (refcount_bits != h.refcount_bits))
    if new_version > old_version:
        helper.start("upgrade")
        _upgrade(drv, helper)
    if refcount_bits != drv.header.refcount_bits:
        if new_version < 3 and refcount_bits != 16:
            raise ImageError("Refcount widths other than 16 bits require compatibility level "
                             "1.1 or above (use compat=1.1 or greater)")
        helper.start("refcount order")
        change_refcount_order(drv, refcount_bits.bit_length() - 1, helper)
    h = drv.header
    if data_file_raw:
        h.autoclear_features |= hdr.AUTOCLEAR_DATA_FILE_RAW
    else:
        h.autoclear_features &= ~hdr.AUTOCLEAR_DATA_FILE_RAW
    if data_file is not None:
        h.set_extension(hdr.EXT_DATA_FILE, data_file.encode() if data_file else None)
    drv.writeback()
    drv.update_header()
    if backing_given:
        if options.get("backing_file") != h.backing_file or \
                options.get("backing_fmt") != h.backing_format:
            raise ImageError("Cannot amend the backing file\n"
                             "You can use 'qemu-img rebase' instead.")
    if lazy != drv.lazy_refcounts:
        _set_lazy(drv, lazy, new_version)
    if new_size:
        drv.truncate(new_size)
    if new_version < old_version:
        helper.start("downgrade")
        _downgrade(drv, helper)


def _set_lazy(drv: "Qcow2Driver", on: bool, new_version: int) -> None:
    h = drv.header
    if on:
        if new_version < 3:
            raise ImageError(f"Lazy refcounts only supported with {_V3_ONLY}")
        h.compatible_features |= hdr.COMPAT_LAZY_REFCOUNTS
    else:
        _mark_clean(drv)
        h.compatible_features &= ~hdr.COMPAT_LAZY_REFCOUNTS
    drv.update_header()


def _mark_clean(drv: "Qcow2Driver") -> None:
    if drv.is_dirty():
        drv.writeback()
        drv._sync()
        drv._set_incompat(hdr.INCOMPAT_DIRTY, False)


# -- compat ------------------------------------------------------------------------

def _upgrade(drv: "Qcow2Driver", progress: _Helper) -> None:
    progress(0, 2)
    if any(len(sn.extra) < 16 for sn in drv.snapshots()):
        from imagetools.formats.qcow2.snapshot_ops import rewrite_table
        rewrite_table(drv)
    progress(1, 2)
    h = drv.header
    h.version = 3
    drv.update_header()
    drv._reload_metadata()
    progress(2, 2)


def _downgrade(drv: "Qcow2Driver", progress: _Helper) -> None:
    h = drv.header
    if h.refcount_order != 4:
        raise UnsupportedError("compat=0.10 requires refcount_bits=16")
    if drv.data_file is not None:
        raise UnsupportedError("Cannot downgrade an image with a data file")
    for sn in drv.snapshots():
        if sn.vm_state_size > 0xFFFFFFFF or sn.disk_size != drv.size:
            raise UnsupportedError("Internal snapshots prevent downgrade of image")
    _mark_clean(drv)
    if h.incompatible_features & ~hdr.INCOMPAT_COMPRESSION:
        raise UnsupportedError("Cannot downgrade an image with incompatible features "
                               f"{h.incompatible_features & ~hdr.INCOMPAT_COMPRESSION:#x} set")
    h.compatible_features = 0
    h.autoclear_features = 0
    expand_zero_clusters(drv, progress)
    if h.compression_type != hdr.COMPRESSION_ZLIB:
        if _has_compressed_clusters(drv):
            raise UnsupportedError("Cannot downgrade an image with zstd compression type and "
                                   "existing compressed clusters")
        h.incompatible_features &= ~hdr.INCOMPAT_COMPRESSION
        h.compression_type = hdr.COMPRESSION_ZLIB
    h.version = 2
    drv.update_header()
    drv._reload_metadata()


def _has_compressed_clusters(drv: "Qcow2Driver") -> bool:
    return any(ext.compressed for ext in drv.block_status(0, drv.size) if ext.depth == 0)


def expand_zero_clusters(drv: "Qcow2Driver", progress: _Helper) -> None:
    """Zero clusters become unallocated (no backing file) or data clusters
    holding zeros, in the active and every snapshot's tables (v2 has none)."""
    snaps = drv.snapshots()
    total = len(drv.l1) + sum(sn.l1_size for sn in snaps)
    visited = [0]
    _expand_in_l1(drv, drv.l1.values, None, visited, total, progress)
    drv.writeback()
    for sn in snaps:
        l1 = read_be64_array(drv.file, sn.l1_table_offset, sn.l1_size) if sn.l1_size else []
        _expand_in_l1(drv, l1, sn, visited, total, progress)


def _expand_in_l1(drv: "Qcow2Driver", l1, snapshot, visited: list[int], total: int,
                  progress: _Helper) -> None:
    layout = drv.layout
    cs = drv.cluster_size
    rc = drv.refcounts
    for l1i, l1_entry in enumerate(l1):
        l2_offset = l1_entry & L1E_OFFSET_MASK
        if l2_offset:
            if l2_offset % cs:
                drv.signal_corruption(f"L2 table offset {l2_offset:#x} unaligned "
                                      f"(L1 index: {c_hex(l1i)})")
            shared = rc.get(l2_offset >> drv.cluster_bits)
            if snapshot is None:
                table = drv.l2_cache.get(l2_offset)
                values = table.values
            else:
                table = None
                values = read_be64_array(drv.file, l2_offset, layout.l2_entries)
            dirty = False
            replaced: list[int] = []
            for j in range(layout.l2_entries):
                entry = values[j]
                type_ = layout.cluster_type(entry)
                if type_ not in (ZERO_PLAIN, ZERO_ALLOC):
                    continue
                if type_ == ZERO_PLAIN and drv.backing is None:
                    values[j] = 0
                    dirty = True
                    continue
                host = entry & L2E_OFFSET_MASK
                if type_ == ZERO_PLAIN or rc.get(host >> drv.cluster_bits) > shared:
                    # QEMU zeroes a preallocated cluster in place even when a
                    # snapshot still reads data from it; qimg takes a new one
                    if type_ == ZERO_ALLOC:
                        replaced.append(host)         # freed once no table points at it
                    host = rc.allocate(1) * cs
                    if shared > 1:
                        rc.change(host >> drv.cluster_bits, 1, shared - 1)
                    drv.writeback()           # counted before anything points at it
                else:
                    drv._guard_in_place(host, cs)
                drv.file.write_zero_data(host, cs)
                values[j] = host | QCOW_OFLAG_COPIED if shared == 1 else host
                dirty = True
            if dirty:
                if table is not None:
                    table.dirty = True
                    drv.writeback()
                else:
                    drv.writeback()
                    drv.file.pwrite(l2_offset, be64_bytes(values))
                    drv._sync()
                for host in replaced:
                    rc.defer_free(host >> drv.cluster_bits, 1)
                drv.writeback()
        visited[0] += 1
        progress(visited[0], total)


# -- refcount width ------------------------------------------------------------------

def change_refcount_order(drv: "Qcow2Driver", order: int, progress: _Helper) -> None:
    """New refcount blocks and table for ``1 << order``-bit refcounts (QEMU's
    qcow2_change_refcount_order: allocation walks, then a writing walk)."""
    from imagetools.formats.qcow2.refcount import Refcounts
    rc = drv.refcounts
    layout = drv.layout
    cs = drv.cluster_size
    cbits = drv.cluster_bits
    drv.writeback()
    new_bits = 1 << order
    new_entries = cs * 8 // new_bits
    new_max = (1 << new_bits) - 1
    table_size = len(rc.table)
    old_entries = layout.refblock_entries
    candidates = sorted({b for i in range(table_size) if rc.block_offset(i)
                         for b in range(i * old_entries // new_entries,
                                        ((i + 1) * old_entries - 1) // new_entries + 1)})
    blocks: dict[int, int] = {}
    new_table_size = 0
    table_offset = table_clusters = 0
    walk = 0
    while True:
        total_walks = max(walk + 2, 3)
        new_allocation = False
        emitted = [0]

        def emit_to(index: int) -> None:
            # QEMU reports each old table entry as its walk reaches it
            while emitted[0] <= min(index, table_size - 1):
                progress(walk * table_size + emitted[0], total_walks * table_size)
                emitted[0] += 1

        for b in candidates:
            lo = b * new_entries
            counts = _old_counts(rc, lo, lo + new_entries)
            if counts.count(0) == len(counts):
                continue
            if max(counts) > new_max:
                c = next(k for k, v in enumerate(counts) if v > new_max)
                emit_to((lo + c) // old_entries)
                raise ImageError(f"Cannot decrease refcount entry width to {new_bits} bits: "
                                 f"Cluster at offset {c_hex((lo + c) * cs)} has a refcount of "
                                 f"{counts[c]}")
            emit_to((lo + new_entries - 1) // old_entries)
            if b not in blocks:
                blocks[b] = rc.allocate(1) * cs
                new_allocation = True
            if b >= new_table_size:
                new_table_size = -(-(b + 1) * 8 // cs) * cs // 8
        emit_to(table_size - 1)
        progress((walk + 1) * table_size, total_walks * table_size)
        walk += 1
        if new_allocation:
            if table_offset:
                rc.change(table_offset >> cbits, table_clusters, -1)
            table_clusters = -(-new_table_size * 8 // cs)
            table_offset = rc.allocate(table_clusters) * cs
            continue
        break
    drv.writeback()                     # the new structures are counted in the old one
    new_layout_header = hdr.Header()
    new_layout_header.__dict__.update(drv.header.__dict__)
    new_layout_header.refcount_order = order
    from imagetools.formats.qcow2.layout import Layout
    new_layout = Layout(new_layout_header)
    scratch = Refcounts(drv.file, new_layout, 0, 0, update_header=None, read_only=False)
    for index in range(table_size):
        progress(walk * table_size + index, (walk + 1) * table_size)
    for b, offset in sorted(blocks.items()):
        lo = b * new_entries
        counts = _old_counts(rc, lo, lo + new_entries)
        values = scratch._new_block_values()
        values[:len(counts)] = array(values.typecode, counts)
        drv.file.pwrite(offset, scratch._encode(values))
    progress((walk + 1) * table_size, (walk + 1) * table_size)
    table = array("Q", bytes(table_clusters * cs))
    for b, offset in blocks.items():
        table[b] = offset
    drv.file.pwrite(table_offset, be64_bytes(table))
    drv._sync()
    old_blocks = [raw & REFT_OFFSET_MASK for raw in rc.table if raw & REFT_OFFSET_MASK]
    old_table = (rc.table_offset, rc.table_clusters)
    h = drv.header
    h.refcount_order = order
    h.refcount_table_offset, h.refcount_table_clusters = table_offset, table_clusters
    drv.update_header()
    drv._reload_metadata()
    rc = drv.refcounts
    for offset in old_blocks:
        rc.change(offset >> cbits, 1, -1)
    rc.change(old_table[0] >> cbits, old_table[1], -1)
    drv.writeback()


def _old_counts(rc, lo: int, hi: int) -> array:
    """Stored refcounts of clusters ``[lo, hi)`` from the current structure."""
    entries = rc.layout.refblock_entries
    out = array("Q")
    pos = lo
    while pos < hi:
        index = pos // entries
        stop = min(hi, (index + 1) * entries)
        blk = rc._load(index)
        if blk is None:
            out.extend(array("Q", bytes(8 * (stop - pos))))
        else:
            out.extend(array("Q", blk.values[pos - index * entries:stop - index * entries]))
        pos = stop
    return out
