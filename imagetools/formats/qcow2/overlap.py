"""Where a qcow2 image keeps its metadata, for QEMU's overlap protection.

:func:`metadata_clusters` names every host cluster that holds metadata with
the name QEMU's overlap check uses ("active L2 table", "refcount block",
...); the write path refuses data writes into them and marks the image
corrupt, as QEMU does.
"""

from __future__ import annotations

from imagetools.formats.qcow2.layout import L1E_OFFSET_MASK, REFT_OFFSET_MASK
from imagetools.formats.qcow2.tables import read_be64_array

TYPE_CHECKING = False
if TYPE_CHECKING:
    from imagetools.formats.qcow2.driver import Qcow2Driver


def metadata_clusters(drv: "Qcow2Driver") -> dict[int, str]:
    """Host clusters holding metadata, with QEMU's overlap-check names."""
    cs = drv.cluster_size
    cbits = drv.cluster_bits
    h = drv.header
    meta: dict[int, str] = {0: "qcow2_header"}

    def add(offset: int, size: int, name: str) -> None:
        if size <= 0:
            return
        for c in range(offset >> cbits, ((offset + size - 1) >> cbits) + 1):
            meta.setdefault(c, name)

    add(drv.l1.offset, len(drv.l1) * 8, "active L1 table")
    rc = drv.refcounts
    add(rc.table_offset, len(rc.table) * 8, "refcount table")
    if h.nb_snapshots:
        from imagetools.formats.qcow2.snapshots import snapshot_table_size
        add(h.snapshots_offset, snapshot_table_size(drv.file, h), "snapshot table")
    for sn in drv.snapshots():
        add(sn.l1_table_offset, sn.l1_size * 8, "inactive L1 table")
    for entry in drv.l1.values:
        if entry & L1E_OFFSET_MASK:
            add(entry & L1E_OFFSET_MASK, cs, "active L2 table")
    for raw in rc.table:
        if raw & REFT_OFFSET_MASK:
            add(raw & REFT_OFFSET_MASK, cs, "refcount block")
    for sn in drv.snapshots():
        if sn.l1_size and sn.l1_table_offset % cs == 0:
            for entry in read_be64_array(drv.file, sn.l1_table_offset, sn.l1_size):
                if entry & L1E_OFFSET_MASK:
                    add(entry & L1E_OFFSET_MASK, cs, "inactive L2 table")
    return meta

