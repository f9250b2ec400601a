"""Repairing qcow2 refcounts: ``qemu-img check -r leaks|all`` and dirty images.

:func:`check_and_repair` is QEMU 7.2's qcow2_check_refcounts with repair
bits: the check's walk (:mod:`.check`) repairs on the way what QEMU repairs
there (an unaligned preallocated cluster becomes a zero cluster, a refcount
block past the end of the file gets the file grown), then refcounts are
compared with the references. A stored refcount of 0 for a used cluster,
or a broken refcount table, needs the refcount structure rebuilt
(``-r all``; ``-r leaks`` fails with EIO as qemu-img does): new refcount
blocks and a new table are written from the computed references into
clusters nothing uses, and one header write switches to them, so an
interrupted rebuild leaves the old structure in place. Otherwise leaks
(FIX_LEAKS) and refcounts that are too low (FIX_ERRORS) are set to the
references, and COPIED flags are corrected. Messages and counters are
qemu-img's, line for line.

The same repair (all bits) is what QEMU does when a dirty image (a crash
with lazy refcounts) is opened for writing; the driver calls it then.
"""

from __future__ import annotations

import errno
import struct

from imagetools.formats.qcow2 import header as hdr
from imagetools.formats.qcow2.check import (
    FIX_ERRORS, FIX_LEAKS, CheckResult, _calculate_refcounts, _check_oflag_copied,
    _compare_refcounts, _Counter, check_image, check_snapshot_table)
from imagetools.formats.qcow2.layout import QCOW_OFLAG_ZERO
from imagetools.formats.qcow2.tables import be64_bytes

TYPE_CHECKING = False
if TYPE_CHECKING:
    from imagetools.formats.qcow2.driver import Qcow2Driver

MODES = {"leaks": FIX_LEAKS, "all": FIX_LEAKS | FIX_ERRORS}

_NUMBERS = ("corruptions", "leaks", "check_errors", "corruptions_fixed", "leaks_fixed",
            "allocated_clusters", "fragmented_clusters", "compressed_clusters")


def _numbers(res: CheckResult) -> dict[str, int]:
    return {name: getattr(res, name) for name in _NUMBERS}


def _restore(res: CheckResult, numbers: dict[str, int]) -> None:
    for name, value in numbers.items():
        setattr(res, name, value)


# -- repairs the check's walk asks for -------------------------------------------

def set_refcount(drv: "Qcow2Driver", cluster: int, value: int) -> None:
    """Store refcount ``value`` for ``cluster`` (written at the next writeback);
    a cluster that becomes free is punched out of the file afterwards."""
    drv.refcounts.set_one(cluster, value)
    if value == 0:
        drv.__dict__.setdefault("_repair_freed", []).append(cluster)


def zero_l2_entry(drv: "Qcow2Driver", l2_offset: int, index: int) -> None:
    """Make entry ``index`` of the L2 table at ``l2_offset`` a plain zero cluster."""
    ext = drv.layout.extended_l2
    value = 0 if ext else QCOW_OFLAG_ZERO
    at = l2_offset + index * (16 if ext else 8)
    drv.file.pwrite(at, struct.pack(">Q", value))
    drv.file.flush()
    cached = drv.l2_cache.tables.get(l2_offset)
    if cached is not None:
        cached.values[index * (2 if ext else 1)] = value


# -- check -r ------------------------------------------------------------------

def check_and_repair(drv: "Qcow2Driver", fix: int) -> CheckResult:
    """Check ``drv`` and repair what ``fix`` allows; the first pass's result.

    ``res.repair_errno`` is set (EIO) when the image needs a rebuild that ``fix``
    does not allow; then nothing was changed by the comparison.
    """
    if drv.open_failed:
        return check_image(drv)             # nothing can be repaired: "Check failed"
    drv.writeback()
    res = CheckResult(drv.filename, "qcow2")
    res.total_clusters = -(-drv.size // drv.cluster_size)
    snapshot_repairs = check_snapshot_table(drv, res, fix)
    counter = _Counter(drv, res)
    counter.fix = fix
    _calculate_refcounts(drv, res, counter)
    before = _numbers(res)
    highest = _compare_refcounts(drv, res, counter)
    if res.rebuild and fix & FIX_ERRORS:
        counter, highest = _rebuild_and_recount(drv, res, fix, counter)
    elif fix:
        if res.rebuild:
            res.report("ERROR need to rebuild refcount structures")
            res.check_errors += 1
            res.repair_errno = errno.EIO
            return res
        if res.leaks or res.corruptions:
            _restore(res, before)
            highest = _compare_refcounts(drv, res, counter, fix)
    _check_oflag_copied(drv, res, counter, fix)
    res.image_end_offset = (highest + 1) * drv.cluster_size
    drv.writeback()
    _punch_freed(drv)
    if drv.__dict__.pop("_repair_switched", False):
        drv._sync()                 # a rebuild's header switch, nothing freed after it
    if snapshot_repairs:
        _rewrite_snapshot_table(drv)
        res.corruptions_fixed += snapshot_repairs
    flags = hdr.INCOMPAT_DIRTY | hdr.INCOMPAT_CORRUPT
    if fix and not res.check_errors and not res.corruptions and \
            drv.header.incompatible_features & flags:
        drv._sync()                 # the repairs are on disk before the bits go
        drv._set_incompat(hdr.INCOMPAT_DIRTY, False)
        drv._set_incompat(hdr.INCOMPAT_CORRUPT, False)
    return res


def _rebuild_and_recount(drv: "Qcow2Driver", res: CheckResult, fix: int, counter: _Counter):
    """Rebuild, count again, free what the old structure leaves behind (QEMU's
    accounting: what the rebuild made right counts as fixed)."""
    old = _numbers(res)
    res.report("Rebuilding refcount structure")
    rebuild_refcount_structure(drv, counter.counts)
    res.corruptions = res.leaks = 0
    res.rebuild = False
    counter = _Counter(drv, res)
    _calculate_refcounts(drv, res, counter)
    fresh_leaks = 0
    highest = 0
    if fix & FIX_LEAKS:
        scratch = CheckResult(drv.filename, "qcow2")
        scratch.messages = res.messages
        highest = _compare_refcounts(drv, scratch, counter, FIX_LEAKS)
        if scratch.rebuild:
            res.report("ERROR rebuilt refcount structure is still broken")
        fresh_leaks = scratch.leaks
    if res.corruptions < old["corruptions"]:
        res.corruptions_fixed += old["corruptions"] - res.corruptions
    if res.leaks < old["leaks"]:
        res.leaks_fixed += old["leaks"] - res.leaks
    res.leaks += fresh_leaks
    return counter, highest


def _punch_freed(drv: "Qcow2Driver") -> None:
    """Punch the clusters the repair freed out of the file.

    After a rebuild these include the old refcount structure, which the
    header stopped using; a flush makes sure that header is on disk first
    (the writeback just before flushed already when it wrote anything).
    """
    freed = drv.__dict__.pop("_repair_freed", None)
    if freed:
        if drv.__dict__.pop("_repair_switched", False):
            drv._sync()
        drv.refcounts._punch(sorted(set(freed)))


def _rewrite_snapshot_table(drv: "Qcow2Driver") -> None:
    from imagetools.formats.qcow2.snapshot_ops import rewrite_table
    rewrite_table(drv)


# -- rebuilding the refcount structure ---------------------------------------------

class _Imrt:
    """The computed refcounts, as QEMU's rebuild allocates from them."""

    def __init__(self, counts) -> None:
        self.counts = counts

    def grow(self, n: int) -> None:
        counts = self.counts
        if n > len(counts):
            counts.extend(type(counts)(counts.typecode, bytes(counts.itemsize * (n - len(counts)))))

    def alloc(self, count: int, first_free: list[int]) -> int:
        """QEMU's alloc_clusters_imrt: the first run of ``count`` free clusters
        from ``first_free[0]`` (which moves to the first free cluster seen)."""
        counts = self.counts
        n = len(counts)
        cluster = first_free[0]
        contiguous = 0
        first_gap = True
        while cluster < n and contiguous < count:
            if counts[cluster]:
                contiguous = 0
                try:
                    cluster = counts.index(0, cluster)
                except ValueError:
                    cluster = n
                continue
            contiguous += 1
            if first_gap:
                first_free[0] = cluster
                first_gap = False
            cluster += 1
        if contiguous < count:
            self.grow(cluster + count - contiguous)
        cluster -= contiguous
        for k in range(count):
            counts[cluster + k] = 1
        return cluster


def rebuild_refcount_structure(drv: "Qcow2Driver", counts) -> None:
    """New refcount blocks and table from the computed references ``counts``
    (QEMU 7.2's algorithm and placement), switched in with one header write.

    The new structures go where ``counts`` says no cluster is used, which
    excludes the old refcount structure, so it stays intact until the switch.
    The switch itself is not flushed here: the old structure must not be
    reused or punched before it is (``_punch_freed`` flushes first).
    """
    imrt = _Imrt(counts)
    cs = drv.cluster_size
    reftable: list[int] = []
    _write_refblocks(drv, imrt, 0, len(imrt.counts), reftable)
    while True:
        table_clusters = -(-len(reftable) * 8 // cs)
        table_cluster = imrt.alloc(table_clusters, [0])
        if not _write_refblocks(drv, imrt, table_cluster, table_cluster + table_clusters,
                                reftable):
            break
    from array import array
    table = array("Q", reftable)
    table.extend(array("Q", bytes(table_clusters * cs - 8 * len(table))))
    drv.file.pwrite(table_cluster * cs, be64_bytes(table))
    drv._sync()
    drv.file.pwrite(48, struct.pack(">QI", table_cluster * cs, table_clusters))
    drv.__dict__["_repair_switched"] = True
    drv._reload_metadata()


def _write_refblocks(drv: "Qcow2Driver", imrt: _Imrt, first: int, end: int,
                     reftable: list[int]) -> bool:
    """Write a refcount block for every block range holding a used cluster in
    ``[first, end)``; returns whether ``reftable`` had to grow."""
    layout = drv.layout
    cs = drv.cluster_size
    bits = layout.refblock_bits
    entries = layout.refblock_entries
    counts = imrt.counts
    first_free = [0]
    grown = False
    index = first >> bits
    while index << bits < end:
        start = index << bits
        part = counts[max(first, start):min(end, start + entries)]
        if part.count(0) == len(part):
            index += 1
            continue
        if index < len(reftable) and reftable[index]:
            offset = reftable[index]
        else:
            first_free[0] = max(first_free[0], start)
            home = imrt.alloc(1, first_free)
            offset = home * cs
            end = max(end, home + 1)
            if len(reftable) <= index:
                size = -(-(index + 1) * 8 // cs) * cs // 8
                reftable.extend([0] * (size - len(reftable)))
                grown = True
            reftable[index] = offset
        imrt.grow(start + entries)
        drv.file.pwrite(offset, drv.refcounts._encode(counts[start:start + entries]))
        index += 1
    return grown
