"""Taking, applying and deleting internal snapshots of a qcow2 image.

The bookkeeping is QEMU's (block/qcow2-snapshot.c): a snapshot owns a copy
of the active L1 table taken as it was (flags included); every L2 table and
data cluster reachable through an L1 table counts one reference per L1 table
("path"), so taking a snapshot adds one to each of them, deleting removes
one, applying adds the snapshot's paths and removes the old active ones.
COPIED flags in the active tables then say exactly "refcount is 1". IDs are
one more than the highest numeric ID; a snapshot records the virtual size,
and applying one with another size resizes the image to it.

Each operation is one crash-safe metadata transaction (:mod:`.txn`), so an
interrupted command leaves either the old or the new image. Images with an
external data file have no internal snapshots (ENOTSUP, as QEMU).
"""

from __future__ import annotations

import errno
from array import array

from imagetools.errors import ImageIOError
from imagetools.formats.base import SnapshotInfo
from imagetools.formats.qcow2.header import QCOW_MAX_L1_SIZE, QCOW_MAX_SNAPSHOTS
from imagetools.formats.qcow2.snapshots import find_by_id_and_name, new_snapshot_id
from imagetools.formats.qcow2.txn import Txn

TYPE_CHECKING = False
if TYPE_CHECKING:
    from imagetools.formats.qcow2.driver import Qcow2Driver


def _not_supported(drv: "Qcow2Driver") -> None:
    if drv.data_file is not None:
        raise ImageIOError("Operation not supported", errno.ENOTSUP)


def create(drv: "Qcow2Driver", name: str, *, date_sec: int, date_nsec: int,
           vm_clock_nsec: int = 0, vm_state_size: int = 0,
           icount: int | None = None) -> SnapshotInfo:
    """Take snapshot ``name`` of the current state; returns its entry."""
    if len(drv.snapshots()) >= QCOW_MAX_SNAPSHOTS:
        raise ImageIOError("File too large", errno.EFBIG)
    _not_supported(drv)
    drv._writable_metadata()
    txn = Txn(drv)
    l1 = array("Q", txn.l1)
    txn.add_paths(l1, +1)
    info = SnapshotInfo(new_snapshot_id(drv.snapshots()), name, vm_state_size, date_sec,
                        date_nsec, vm_clock_nsec, icount, drv.size, 0, len(l1))
    txn.add_snapshot(info, l1)
    txn.commit(discard=True)
    return info


def apply(drv: "Qcow2Driver", name_or_id: str) -> None:
    """Make the snapshot's state the current one (an ID first, then a name)."""
    _not_supported(drv)
    snaps = drv.snapshots()
    index = find_by_id_and_name(snaps, name_or_id, None)
    if index < 0:
        index = find_by_id_and_name(snaps, None, name_or_id)
    if index < 0:
        raise ImageIOError("No such file or directory", errno.ENOENT)
    snap = snaps[index]
    _validate_l1(drv, snap)
    drv._writable_metadata()
    txn = Txn(drv)
    sn_l1 = txn.snapshot_l1(index)
    size = snap.disk_size if snap.disk_size is not None else drv.size
    l1_size = max(len(txn.l1), snap.l1_size)
    if size > drv.size:
        l1_size = max(l1_size, drv.layout.l1_entries_for(size))
    txn.add_paths(sn_l1, +1)
    txn.add_paths(txn.l1, -1)
    new_l1 = array("Q", sn_l1)
    new_l1.extend(array("Q", bytes(8 * (l1_size - len(new_l1)))))
    txn.l1 = new_l1
    txn.size = size
    txn.commit(discard=True)


def delete(drv: "Qcow2Driver", snapshot_id: str | None, name: str | None) -> None:
    """Delete the first snapshot matching the ID and/or name given."""
    _not_supported(drv)
    snaps = drv.snapshots()
    index = find_by_id_and_name(snaps, snapshot_id, name)
    if index < 0:
        raise ImageIOError("Can't find the snapshot", errno.ENOENT)
    _validate_l1(drv, snaps[index])
    drv._writable_metadata()
    txn = Txn(drv)
    txn.add_paths(txn.snapshot_l1(index), -1)
    txn.remove_snapshot(index)
    txn.commit(discard=True)


def _validate_l1(drv: "Qcow2Driver", snap: SnapshotInfo) -> None:
    """QEMU's qcow2_validate_table for a snapshot's L1 table."""
    if snap.l1_size > QCOW_MAX_L1_SIZE // 8:
        raise ImageIOError("Snapshot L1 table too large", errno.EFBIG)
    if snap.l1_table_offset % drv.cluster_size or \
            (1 << 63) - 1 - 8 * snap.l1_size < snap.l1_table_offset:
        raise ImageIOError("Snapshot L1 table offset invalid", errno.EINVAL)


def rewrite_table(drv: "Qcow2Driver") -> None:
    """Write the snapshot table anew in QEMU 7.2's format (qcow2_write_snapshots).

    Only the table moves (no refcount of anything it describes changes), so
    QEMU's order is crash-safe here: the new clusters are counted first,
    the table is written, one 12-byte header write switches to it, and the
    old table is freed last; an interruption leaves at most a leak.
    """
    import struct
    from imagetools.formats.qcow2.snapshots import encode_table, snapshot_table_size
    drv._writable_metadata()
    drv.writeback()
    drv._before_metadata_write()
    h = drv.header
    rc = drv.refcounts
    cs = drv.cluster_size
    old_offset = h.snapshots_offset
    old_size = snapshot_table_size(drv.file, h) if h.nb_snapshots else 0
    snaps = drv.snapshots()
    table = encode_table(snaps)
    offset = rc.allocate(-(-len(table) // cs)) * cs if table else 0
    drv.writeback()
    if table:
        drv.file.pwrite(offset, table)
    drv._sync()
    drv.file.pwrite(60, struct.pack(">IQ", len(snaps), offset))
    drv._sync()
    h.nb_snapshots, h.snapshots_offset = len(snaps), offset
    if old_size:
        first = old_offset // cs
        count = (old_offset + old_size - 1) // cs - first + 1
        # an old table that nothing counts (it lay past the end of the file)
        # has nothing to free; QEMU fails there and leaks a cluster
        if all(rc.get(c) for c in range(first, first + count)):
            rc.defer_free(first, count, discard=True)
    drv.writeback()
    drv._reload_metadata()
