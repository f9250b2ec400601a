"""Repairing qcow2 refcounts (what QEMU does to a dirty image opened for writing).

``repair_refcounts`` recomputes every reference with the check's walk and
makes the stored refcounts and COPIED flags match, in memory; the driver's
writeback then puts them on disk in its usual order. A refcount structure
that would need rebuilding is refused: that is ``qemu-img check -r all``'s
job (the snapshot/repair issue builds it on this module).
"""

from __future__ import annotations

from imagetools.formats.qcow2.check import CheckResult, _calculate_refcounts, _Counter
from imagetools.formats.qcow2.layout import (
    L1E_OFFSET_MASK, L2E_OFFSET_MASK, NORMAL, QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_COPIED,
    ZERO_ALLOC)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from imagetools.formats.qcow2.driver import Qcow2Driver


def repair_refcounts(drv: "Qcow2Driver") -> CheckResult:
    """Make the stored refcounts and COPIED flags match the references.

    This is what QEMU does when it opens a dirty image (a crash with lazy
    refcounts) for writing: leaks are freed, missing increments restored and
    COPIED flags corrected. A refcount structure that would need rebuilding
    (missing or misplaced refcount blocks, broken tables) is refused with an
    ImageError; ``qemu-img check -r all`` is the tool for that.
    """
    from imagetools.errors import ImageError
    res = CheckResult(drv.filename, "qcow2")
    counter = _Counter(drv, res)
    _calculate_refcounts(drv, res, counter)
    if res.rebuild or res.corruptions:
        raise ImageError("Could not repair dirty image: the refcount structure is damaged "
                         "(run 'qemu-img check -r all')")
    rc = drv.refcounts
    entries = drv.layout.refblock_entries
    counts = counter.counts
    for index in range(-(-counter.nb_clusters // entries)):
        lo = index * entries
        hi = min(counter.nb_clusters, lo + entries)
        computed = counts[lo:hi]
        blk = rc._load(index)
        if blk is None:
            if any(computed):
                raise ImageError("Could not repair dirty image: a refcount block is missing "
                                 "(run 'qemu-img check -r all')")
            continue
        stored = blk.values[:hi - lo]
        if stored == computed:
            continue
        for i in range(hi - lo):
            if stored[i] != computed[i]:
                rc.set_one(lo + i, computed[i])
                if computed[i] < stored[i]:
                    res.leaks_fixed += 1
                else:
                    res.corruptions_fixed += 1
    _fix_oflag_copied(drv, res)
    return res


def _fix_oflag_copied(drv: "Qcow2Driver", res: CheckResult) -> None:
    layout = drv.layout
    rc = drv.refcounts
    cbits = drv.cluster_bits
    step = 2 if layout.extended_l2 else 1
    for l1i, l1_entry in enumerate(drv.l1.values):
        l2_offset = l1_entry & L1E_OFFSET_MASK
        if not l2_offset:
            continue
        copied = rc.get(l2_offset >> cbits) == 1
        if copied != bool(l1_entry & QCOW_OFLAG_COPIED):
            drv.l1.set(l1i, (l1_entry | QCOW_OFLAG_COPIED) if copied
                       else (l1_entry & ~QCOW_OFLAG_COPIED))
            res.corruptions_fixed += 1
        table = drv.l2_cache.get(l2_offset)
        for j in range(layout.l2_entries):
            entry = table.values[j * step]
            if not entry or entry & QCOW_OFLAG_COMPRESSED:
                continue
            if layout.cluster_type(entry) not in (NORMAL, ZERO_ALLOC):
                continue
            one = drv.data_file is not None or \
                rc.get((entry & L2E_OFFSET_MASK) >> cbits) == 1
            if one != bool(entry & QCOW_OFLAG_COPIED):
                table.values[j * step] = (entry | QCOW_OFLAG_COPIED) if one \
                    else (entry & ~QCOW_OFLAG_COPIED)
                table.dirty = True
                res.corruptions_fixed += 1
