"""Emptying a qcow2 image after a commit (QEMU's qcow2_make_empty).

A v3 image without snapshots, bitmaps, LUKS header or external data file is
reset completely, to QEMU's layout: header, refcount table in cluster 1,
one refcount block in cluster 2, a zeroed L1 table from cluster 3, and the
file cut after it. QEMU gets there by marking the image dirty and
overwriting its refcount structures; here every write leaves a consistent
image instead: the L1 table is zeroed first (everything it referenced is
then only leaked), the refcount block is rewritten to count the remaining
metadata, the other refcount blocks leave the table, and the file is cut.
Structures found elsewhere (after a snapshot transaction, for instance) are
first switched to a temporary empty image past the end of the file, then to
the final layout, so clusters 1 and up are never written while in use.

The general way (QEMU's too for v2 images, snapshots and data files)
discards every cluster of the active tables, one L2 table at a time; like
QEMU's, it gives every L1 entry an (empty) L2 table on the way.
"""

from __future__ import annotations

import struct

from imagetools.formats.qcow2 import header as hdr
from imagetools.formats.qcow2.layout import (
    L2E_OFFSET_MASK, QCOW_OFLAG_COMPRESSED, REFT_OFFSET_MASK)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from imagetools.formats.qcow2.driver import Qcow2Driver


def make_empty(drv: "Qcow2Driver") -> None:
    drv._writable_metadata()
    drv.writeback()
    h = drv.header
    cs = drv.cluster_size
    l1_clusters = -(-len(drv.l1) * 8 // cs)
    simple = (h.version >= 3 and not drv.snapshots() and not _has_bitmaps(drv)
              and h.crypt_method != hdr.CRYPT_LUKS and drv.data_file is None
              and 3 + l1_clusters <= drv.layout.refblock_entries)
    if simple and _canonical_layout(drv):
        _reset(drv, l1_clusters)
    elif simple and _relocate(drv, l1_clusters):
        pass
    else:
        _discard_everything(drv)


def _has_bitmaps(drv: "Qcow2Driver") -> bool:
    return drv.header.extension(hdr.EXT_BITMAPS) is not None and bool(drv.bitmaps())


def _canonical_layout(drv: "Qcow2Driver") -> bool:
    rc = drv.refcounts
    cs = drv.cluster_size
    return (rc.table_offset == cs and rc.table_clusters == 1 and len(rc.table) > 0
            and rc.table[0] & REFT_OFFSET_MASK == 2 * cs
            and (not len(drv.l1) or drv.l1.offset == 3 * cs))


def _reset(drv: "Qcow2Driver", l1_clusters: int) -> None:
    file = drv.file
    cs = drv.cluster_size
    rc = drv.refcounts
    if len(drv.l1):
        file.pwrite(drv.l1.offset, bytes(8 * len(drv.l1)))
        drv._sync()
    values = rc._new_block_values()
    for cluster in range(3 + l1_clusters):
        values[cluster] = 1
    file.pwrite(2 * cs, rc._encode(values))
    drv._sync()
    if any(entry & REFT_OFFSET_MASK for entry in rc.table[1:]):
        file.pwrite(cs, struct.pack(">Q", 2 * cs).ljust(cs, b"\0"))
        drv._sync()
    file.truncate((3 + l1_clusters) * cs)
    drv._sync()
    drv._reload_metadata()


def _relocate(drv: "Qcow2Driver", l1_clusters: int) -> bool:
    """QEMU's layout for an image whose structures are elsewhere (after a
    snapshot transaction, a grown table, ...), in two switches: first to a
    temporary empty image past the end of the file, then -- with clusters 1
    and up now unused -- to the final one. False if that cannot be done in
    the first refcount block's range (the general way is taken then)."""
    file = drv.file
    cs = drv.cluster_size
    rc = drv.refcounts
    entries = drv.layout.refblock_entries
    final = 3 + l1_clusters
    temp = max(final, -(-file.length() // cs))
    if temp + 2 + l1_clusters > entries:
        return False
    if len(drv.l1):
        file.pwrite(drv.l1.offset, bytes(8 * len(drv.l1)))     # everything is leaked now
        drv._sync()
    for table_at, block_at, l1_at, counted in (
            (temp, temp + 1, temp + 2, [0] + list(range(temp, temp + 2 + l1_clusters))),
            (1, 2, 3, list(range(final)))):
        values = rc._new_block_values()
        for cluster in counted:
            values[cluster] = 1
        if len(drv.l1):
            file.pwrite(l1_at * cs, bytes(8 * len(drv.l1)))
        file.pwrite(block_at * cs, rc._encode(values))
        file.pwrite(table_at * cs, struct.pack(">Q", block_at * cs).ljust(cs, b"\0"))
        drv._sync()
        file.pwrite(40, struct.pack(">QQI", l1_at * cs if len(drv.l1) else 0, table_at * cs, 1))
        drv._sync()
    file.truncate(final * cs)
    drv._sync()
    drv._reload_metadata()
    return True


def _discard_everything(drv: "Qcow2Driver") -> None:
    layout = drv.layout
    mask = layout.l2_entries - 1
    total = layout.clusters(drv.size)
    for l1i in range(layout.l1_entries_for(drv.size)):
        table = drv._l2_for_write(l1i)
        first = l1i * layout.l2_entries
        for ci in range(first, min(total, first + layout.l2_entries)):
            entry, bitmap = drv._entry(table.values, ci & mask)
            if entry or bitmap:
                drv._set_entry(table, ci & mask, 0, 0)
                if entry & (L2E_OFFSET_MASK | QCOW_OFLAG_COMPRESSED):
                    drv._free_entry(entry, request=True)
        drv.writeback()            # freed clusters are reused by the next table
