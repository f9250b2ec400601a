"""Changing the virtual size of a qcow2 image (qemu-img resize, amend size=).

QEMU 7.2's qcow2_co_truncate, step by step and with its messages:

* growing makes the L1 table big enough (a new, larger table is written in
  free clusters, then one header write switches to it); when the backing
  file reaches beyond the old end, the new area is made to read as zeros
  (zero clusters; a v2 image cannot have them and the resize fails, as in
  QEMU); ``--preallocation=metadata`` allocates L2 tables and data clusters,
  ``falloc`` / ``full`` put a new refcount table and the data behind the
  used part of the file (QEMU's qcow2_refcount_area) and reserve or zero it;
* shrinking drops every cluster past the new end, then L2 tables the L1
  table no longer covers, then refcount blocks that count nothing, and
  truncates the file after the last used cluster;
* the new size is written to the header last.

Every step keeps the image consistent for ``qemu-img check`` (at worst
clusters leak), so an interrupted resize leaves the old size and all data
below the new end.
"""

from __future__ import annotations

import errno
import struct
from array import array

from imagetools.errors import ImageError, ImageIOError, UnsupportedError
from imagetools.formats.qcow2.header import QCOW_MAX_L1_SIZE
from imagetools.formats.qcow2.layout import (
    L1E_OFFSET_MASK, NORMAL, QCOW_OFLAG_COPIED, REFT_OFFSET_MASK,
    UNALLOCATED_PLAIN, ZERO_PLAIN)
from imagetools.formats.qcow2.tables import L1Table, be64_bytes

TYPE_CHECKING = False
if TYPE_CHECKING:
    from imagetools.formats.qcow2.driver import Qcow2Driver

PREALLOC_MODES = ("off", "metadata", "falloc", "full")


def truncate(drv: "Qcow2Driver", size: int, prealloc: str = "off") -> None:
    """Resize ``drv`` to ``size`` bytes (see the module docstring)."""
    from imagetools.formats.base import check_new_size
    check_new_size(size)
    if prealloc not in PREALLOC_MODES:
        raise UnsupportedError(f"Unsupported preallocation mode '{prealloc}'")
    if size % 512:
        raise ImageError("The new size must be a multiple of 512")
    if drv.header.version < 3 and drv.snapshots():
        raise UnsupportedError("Can't resize a v2 image which has snapshots")
    drv._writable_metadata()
    old = drv.size
    if size < old and prealloc != "off":
        raise ImageError("Preallocation can't be used for shrinking an image")
    new_l1 = drv.layout.l1_entries_for(size)
    backing = drv.backing
    zero_write = size > old and backing is not None and backing.size > old
    if size < old:
        _shrink(drv, size, new_l1)
    else:
        grow_l1(drv, new_l1)
    drv._size = size
    try:
        if prealloc == "off":
            if drv.data_file is not None:
                drv.data_file.truncate(size)
        elif prealloc == "metadata" or drv.data_file is not None:
            _prealloc_metadata(drv, old, size, prealloc)
        else:
            _prealloc_data(drv, old, size, prealloc)
        if zero_write:
            _zero_new_area(drv, old, size)
        drv.writeback()
    except BaseException:
        drv._size = old
        raise
    _write_size(drv, old, size)


def _write_size(drv: "Qcow2Driver", old: int, size: int) -> None:
    """The last step: the new size in the header (with resized bitmap tables,
    which QEMU only accepts together with the matching size)."""
    from imagetools.formats.qcow2.bitmaps import resize_bitmaps
    from imagetools.formats.qcow2.header import EXT_BITMAPS
    bitmaps = resize_bitmaps(drv, old, size) if drv.header.extension(EXT_BITMAPS) else None
    drv._sync()
    if bitmaps is None:
        drv.file.pwrite(24, struct.pack(">Q", size))
        drv._sync()
        drv.header.size = size
        return
    data, frees = bitmaps
    drv.header.size = size
    drv.header.set_extension(EXT_BITMAPS, data)
    drv._write_header()
    drv._sync()
    cs = drv.cluster_size
    for offset in frees:
        drv.refcounts.defer_free(offset // cs, 1)
    drv.writeback()
    drv._bitmaps = None
    drv._meta_clusters = None


def grow_l1(drv: "Qcow2Driver", entries: int) -> None:
    """Make the active L1 table ``entries`` long (QEMU's exact-size growth).

    A table beyond QEMU's limit (32 MiB) is refused before anything is
    allocated: QEMU could not open the image, and a size like 1E would ask
    for gigabytes of memory.
    """
    old = drv.l1
    if entries <= len(old):
        return
    if entries > QCOW_MAX_L1_SIZE // 8:
        raise ImageIOError("Failed to grow the L1 table: File too large", errno.EFBIG)
    cs = drv.cluster_size
    rc = drv.refcounts
    drv.writeback()
    first = rc.allocate(-(-8 * entries // cs))
    drv.writeback()                            # the new table is counted first
    values = array("Q", old.values)
    values.extend(array("Q", bytes(8 * (entries - len(values)))))
    offset = first * cs
    drv.file.pwrite(offset, be64_bytes(values))
    drv._sync()
    drv.file.pwrite(36, struct.pack(">IQ", entries, offset))
    drv._sync()
    drv.header.l1_size, drv.header.l1_table_offset = entries, offset
    drv.l1 = L1Table(drv.file, offset, entries)
    drv._meta_clusters = None
    if len(old):
        rc.defer_free(old.offset // cs, -(-8 * len(old) // cs))
    drv.writeback()


# -- shrinking ------------------------------------------------------------------

def _shrink(drv: "Qcow2Driver", size: int, new_l1: int) -> None:
    cs = drv.cluster_size
    start = -(-size // cs) * cs
    if start < drv.size:
        drv._discard_clusters(start, drv.size - start, full=True)
    drv.writeback()
    l1 = drv.l1
    if new_l1 < len(l1):
        gone = [e & L1E_OFFSET_MASK for e in l1.values[new_l1:] if e & L1E_OFFSET_MASK]
        if gone:
            drv.file.pwrite(l1.offset + 8 * new_l1, bytes(8 * (len(l1) - new_l1)))
            drv._sync()
            for i in range(new_l1, len(l1)):
                l1.values[i] = 0
            for offset in gone:
                drv.l2_cache.forget(offset)
                drv.refcounts.defer_free(offset >> drv.cluster_bits, 1, discard=True)
            drv.writeback()
    _drop_unused_refblocks(drv)
    _truncate_tail(drv)


def _drop_unused_refblocks(drv: "Qcow2Driver") -> None:
    """QEMU's qcow2_shrink_reftable: refcount blocks that count nothing (but
    themselves) leave the refcount table; their clusters are freed."""
    rc = drv.refcounts
    layout = drv.layout
    entries = layout.refblock_entries
    table = array("Q", rc.table)
    dropped = []
    for index, raw in enumerate(rc.table):
        offset = raw & REFT_OFFSET_MASK
        if not offset:
            continue
        values = rc._load(index).values
        cluster = offset >> drv.cluster_bits
        own = cluster >> layout.refblock_bits == index
        used = len(values) - values.count(0) - (1 if own and values[cluster & (entries - 1)] else 0)
        if not used:
            table[index] = 0
            dropped.append((index, offset, own))
    if not dropped:
        return
    drv.file.pwrite(rc.table_offset, be64_bytes(table))
    drv._sync()
    for index, offset, own in dropped:
        rc.table[index] = 0
        rc.blocks.pop(index, None)
        if not own:
            rc.change(offset >> drv.cluster_bits, 1, -1)
        drv.file.punch_hole(offset, drv.cluster_size)
    drv.writeback()


def _truncate_tail(drv: "Qcow2Driver") -> None:
    """Cut the file after the last cluster with a refcount (qcow2_get_last_cluster)."""
    last = _last_used_cluster(drv)
    if last < 0:
        raise ImageError("There are no references in the refcount table.")
    if (last + 1) * drv.cluster_size < drv.file.length():
        drv.file.truncate((last + 1) * drv.cluster_size)


# -- growing --------------------------------------------------------------------

def _zero_new_area(drv: "Qcow2Driver", old: int, size: int) -> None:
    """The backing file reaches past the old end: the new area must read zeros."""
    start = -(-old // drv.layout.subcluster_size) * drv.layout.subcluster_size
    if size > start:
        if drv.header.version < 3:
            raise ImageError("Failed to zero out new clusters: Operation not supported")
        drv._zeroize(start, size - start, False)
    if start > old:
        drv.write(old, bytes(min(start, size) - old))


def _prealloc_metadata(drv: "Qcow2Driver", old: int, size: int, mode: str) -> None:
    """L2 tables and data clusters for ``[old, size)`` (QEMU's preallocate_co):
    per L2 table, the table first, then its new clusters in one run."""
    layout = drv.layout
    cs = drv.cluster_size
    cbits = drv.cluster_bits
    first_ci = old >> cbits
    last_ci = (size - 1) >> cbits
    host_end = 0
    ci = first_ci
    while ci <= last_ci:
        l1i = ci // layout.l2_entries
        stop = min(last_ci + 1, (l1i + 1) * layout.l2_entries)
        table = drv._l2_for_write(l1i)
        mask = layout.l2_entries - 1
        todo = [c for c in range(ci, stop)
                if layout.cluster_type(drv._entry(table.values, c & mask)[0])
                in (UNALLOCATED_PLAIN, ZERO_PLAIN)]
        if todo:
            head = old - (todo[0] << cbits) if todo[0] == first_ci else 0
            # QEMU copies what the guest saw in front of the old end (COW)
            fill = drv.read(todo[0] << cbits, head) if head > 0 else b""
            base = (todo[0] if drv.data_file is not None else
                    drv.refcounts.allocate(len(todo)))
            if fill:
                drv.writeback()
                (drv.data_file or drv.file).pwrite(base << cbits, fill)
            host_end = max(host_end, ((todo[-1] if drv.data_file is not None else
                                       base + len(todo) - 1) + 1) * cs)
            target = drv.data_file or drv.file
            if host_end > target.length():
                # the file covers the clusters before any table points at them
                # (QEMU extends it only at the end; check calls that corrupt)
                target.truncate(host_end)
            for k, c in enumerate(todo):
                host = (c if drv.data_file is not None else base + k) << cbits
                drv._set_entry(table, c & mask, host | QCOW_OFLAG_COPIED, 0)
        drv.writeback()
        ci = stop
    target = drv.data_file or drv.file
    if drv.data_file is not None:
        _grow_file(target, size, mode)
    elif host_end > target.length():
        target.truncate(host_end)


def _grow_file(file, size: int, mode: str) -> None:
    length = file.length()
    if size <= length:
        file.truncate(size)
    elif mode == "falloc":
        file.fallocate(length, size - length)
    elif mode == "full":
        file.write_zero_data(length, size - length)
    else:
        file.truncate(size)


def _prealloc_data(drv: "Qcow2Driver", old: int, size: int, mode: str) -> None:
    """falloc/full: new refcount structures, then the data, behind the used part
    of the file; the new clusters are reserved (falloc) or zeroed (full)."""
    layout = drv.layout
    cs = drv.cluster_size
    cbits = drv.cluster_bits
    drv.writeback()
    last = _last_used_cluster(drv)
    file_end = (last + 1) * cs if last >= 0 else -(-drv.file.length() // cs) * cs
    first_ci = old >> cbits
    count = (-(-size // cs)) - first_ci
    if count <= 0:
        return
    l2_tables = -(-count // layout.l2_entries) + 1
    start = refcount_area(drv, file_end, count + l2_tables)
    if not drv.refcounts.allocate_at(start // cs, count):
        raise ImageError("Could not allocate the preallocated area")
    drv.writeback()
    _grow_file(drv.file, start + count * cs, mode)
    head = old - (first_ci << cbits)
    if head:
        # the partial last cluster moves into the new area (QEMU copies its head)
        drv.file.pwrite(start, drv.read(first_ci << cbits, head))
    mask = layout.l2_entries - 1
    ci, host = first_ci, start
    while ci < first_ci + count:
        l1i = ci // layout.l2_entries
        stop = min(first_ci + count, (l1i + 1) * layout.l2_entries)
        table = drv._l2_for_write(l1i)
        for c in range(ci, stop):
            entry = drv._entry(table.values, c & mask)[0]
            if layout.cluster_type(entry) == NORMAL or entry & (1 << 62):
                drv._free_entry(entry)
            drv._set_entry(table, c & mask, host | QCOW_OFLAG_COPIED, 0)
            host += cs
        drv.writeback()
        ci = stop


def _last_used_cluster(drv: "Qcow2Driver") -> int:
    """The highest cluster of the file with a refcount, or -1."""
    rc = drv.refcounts
    entries = drv.layout.refblock_entries
    cluster = -(-drv.file.length() // drv.cluster_size) - 1
    while cluster >= 0:
        blk = rc._load(cluster // entries)
        if blk is None:
            cluster = cluster // entries * entries - 1
            continue
        values = blk.values
        for i in range(cluster % entries, -1, -1):
            if values[i]:
                return cluster // entries * entries + i
        cluster = cluster // entries * entries - 1
    return -1


def refcount_area(drv: "Qcow2Driver", start: int, additional: int) -> int:
    """QEMU's qcow2_refcount_area with an exact size (see Refcounts.area)."""
    end = drv.refcounts.area(start, additional, exact=True)
    drv._meta_clusters = None
    drv.writeback()
    return end
