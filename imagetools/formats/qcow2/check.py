"""Consistency check of a qcow2 image, as ``qemu-img check`` does it (detection).

The algorithm is QEMU 7.2's: build an in-memory refcount table by walking
everything that references host clusters (header, active and snapshot L1/L2
tables and their data clusters, the snapshot table, the refcount table and
blocks, the encryption header, persistent bitmaps), compare it with the
refcounts stored in the image (``Leaked cluster N refcount=R reference=0``,
``ERROR cluster N refcount=R reference=S``), then check the COPIED flags.
Every problem is recorded with the exact line qemu-img prints on stderr, in
the same order, and counted in the same fields, so the CLI only formats.

Repair (``check -r``) runs the same walk with ``fix`` bits (FIX_LEAKS,
FIX_ERRORS) where QEMU repairs on the way (an unaligned preallocated
cluster, a refcount block past the end of the file, refcounts that differ
from the references, COPIED flags); :mod:`.repair` drives it and rebuilds
the refcount structure when ``rebuild`` says it is broken.

Memory is bounded by the host file: references are only counted up to one
cluster past the end of the file (beyond that QEMU reports them as errors),
and the computed refcounts live in a compact array.
"""

from __future__ import annotations

from array import array

from imagetools.formats.qcow2 import header as hdr
from imagetools.formats.qcow2.layout import (
    COMPRESSED, L1E_OFFSET_MASK, L1E_RESERVED_MASK, L2E_OFFSET_MASK, L2E_STD_RESERVED_MASK,
    NORMAL, QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_COPIED, QCOW_OFLAG_ZERO, REFT_OFFSET_MASK,
    UNALLOCATED_PLAIN, ZERO_ALLOC)
from imagetools.formats.qcow2.tables import (
    _NATIVE_LE, contiguous_pairs, plain_clusters, read_be64_array)

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from typing import Any

    from imagetools.formats.qcow2.driver import Qcow2Driver

REFT_RESERVED_MASK = 0x1FF
FIX_LEAKS = 1
FIX_ERRORS = 2
QCOW_MAX_L1_SIZE = hdr.QCOW_MAX_L1_SIZE


class CheckResult:
    """What ``qemu-img check`` reports (qemu's BdrvCheckResult + its stderr lines).

    ``messages`` are the diagnostic lines (without newline) in the order
    qemu-img prints them on stderr. ``to_json()`` gives the ImageCheck
    members (schema order; only the optional ones that are non-zero), and
    ``exit_code`` qemu-img's status (0 clean, 2 corruptions, 3 only leaks,
    1 the check itself failed).
    """

    def __init__(self, filename: str = "", fmt: str = "qcow2") -> None:
        self.filename = filename
        self.format = fmt
        self.corruptions = 0
        self.leaks = 0
        self.check_errors = 0
        self.corruptions_fixed = 0
        self.leaks_fixed = 0
        self.image_end_offset = 0
        self.total_clusters = 0
        self.allocated_clusters = 0
        self.fragmented_clusters = 0
        self.compressed_clusters = 0
        self.messages: list[str] = []
        #: the refcount structure itself is broken (repair must rebuild it)
        self.rebuild = False
        #: errno of a repair that could not complete (qemu-img: "Check failed: ...")
        self.repair_errno: int | None = None
        #: why the check could not run (qemu-img: "Check failed: <failed>"),
        #: after the error lines that led to it
        self.failed: str | None = None
        self.failed_lines: list[str] = []

    def report(self, line: str) -> None:
        self.messages.append(line)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"filename": self.filename, "format": self.format,
                               "check-errors": self.check_errors}
        for key, value in (("image-end-offset", self.image_end_offset),
                           ("corruptions", self.corruptions), ("leaks", self.leaks),
                           ("corruptions-fixed", self.corruptions_fixed),
                           ("leaks-fixed", self.leaks_fixed),
                           ("total-clusters", self.total_clusters),
                           ("allocated-clusters", self.allocated_clusters),
                           ("fragmented-clusters", self.fragmented_clusters),
                           ("compressed-clusters", self.compressed_clusters)):
            if value:
                out[key] = value
        return out

    @property
    def exit_code(self) -> int:
        if self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0

    def __repr__(self) -> str:
        return (f"CheckResult(corruptions={self.corruptions}, leaks={self.leaks}, "
                f"check_errors={self.check_errors}, end={self.image_end_offset})")


class _Counter:
    """The in-memory refcount table (QEMU's "IMRT")."""

    def __init__(self, drv: "Qcow2Driver", res: CheckResult) -> None:
        self.drv = drv
        self.res = res
        self.cs = drv.cluster_size
        self.cbits = drv.cluster_bits
        self.file_len = drv.file.length()
        self.nb_clusters = -(-self.file_len // self.cs)
        self.max = drv.layout.refcount_max
        bits = drv.layout.refcount_bits
        self.code = "B" if bits <= 8 else "H" if bits == 16 else "I" if bits == 32 else "Q"
        self.counts = array(self.code, bytes(array(self.code).itemsize * self.nb_clusters))
        #: active L2 tables as read by the walk (reused by the COPIED check)
        self.active_l2: dict[int, array] = {}
        #: the stored refcounts, flat (filled by the comparison)
        self.stored: array | None = None
        #: what to repair on the way (FIX_LEAKS | FIX_ERRORS; 0 for a check)
        self.fix = 0
        #: the L2 table being walked (for repairs of its entries)
        self.l2_offset = 0
        #: active L2 tables the whole-table path counted: offset -> (cluster
        #: indices of the entries with a host cluster, whether all of those
        #: entries have QCOW_OFLAG_COPIED)
        self.plain_l2: dict[int, tuple[array, bool]] = {}

    def inc(self, offset: int, size: int, times: int = 1) -> None:
        if size <= 0 or times <= 0:
            return
        end = offset + size
        if end > self.file_len and end - self.file_len >= self.cs:
            for _ in range(min(times, 4)):
                self.res.report("ERROR: counting reference for region exceeding the end of "
                                f"the file by one cluster or more: offset {offset:#x} size "
                                f"{size:#x}")
            self.res.corruptions += times
            return
        first = offset >> self.cbits
        last = (end - 1) >> self.cbits
        counts = self.counts
        if last >= len(counts):
            counts.extend(array(self.code, bytes(counts.itemsize * (last + 1 - len(counts)))))
            self.nb_clusters = len(counts)
        for k in range(first, last + 1):
            value = counts[k]
            if value + times <= self.max:
                counts[k] = value + times
                continue
            over = value + times - self.max
            counts[k] = self.max
            for _ in range(min(over, 4)):
                self.res.report(f"ERROR: overflow cluster offset={k << self.cbits:#x}")
                self.res.report("Use qemu-img amend to increase the refcount entry width or "
                                "qemu-img convert to create a clean copy if the image cannot "
                                "be opened for writing")
            self.res.corruptions += over


def check_image(drv: "Qcow2Driver") -> CheckResult:
    """Check ``drv`` (an open qcow2 image, metadata written back) for consistency."""
    res = CheckResult(drv.filename, "qcow2")
    if drv.open_failed:
        # QEMU's check stops at an unreadable snapshot table (its line is
        # an error report: the CLI prints it with the program name)
        res.failed_lines = list(drv.open_errors)
        res.failed = drv.open_failed
        return res
    res.total_clusters = -(-drv.size // drv.cluster_size)
    counter = _Counter(drv, res)
    check_snapshot_table(drv, res)
    _calculate_refcounts(drv, res, counter)
    highest = _compare_refcounts(drv, res, counter)
    _check_oflag_copied(drv, res, counter)
    res.image_end_offset = (highest + 1) * drv.cluster_size
    return res


def check_snapshot_table(drv: "Qcow2Driver", res: CheckResult, fix: int = 0) -> int:
    """What QEMU finds reading the snapshot table; returns the entries to rewrite."""
    for line in getattr(drv, "open_errors", ()):
        res.report(line)
        res.corruptions += 1
    repairs = 0
    for i, sn in enumerate(drv.snapshots()):
        if sn.incomplete:
            if fix & FIX_ERRORS:
                res.report(f"Repairing snapshot table entry {i} is incomplete")
                repairs += 1
            else:
                res.report(f"ERROR snapshot table entry {i} is incomplete")
                res.corruptions += 1
    return repairs


def _calculate_refcounts(drv: "Qcow2Driver", res: CheckResult, counter: _Counter) -> None:
    h = drv.header
    cs = drv.cluster_size
    snaps = drv.snapshots()
    counter.inc(0, cs)
    _check_l1(drv, res, counter, h.l1_table_offset, h.l1_size, active=True)
    if drv.data_file is not None and snaps:
        res.report(f"ERROR {len(snaps)} snapshots in image with data file")
        res.corruptions += 1
    seen_l1: dict[tuple[int, int], int] = {}
    for sn in snaps:
        if sn.l1_table_offset % cs:
            res.report(f"ERROR snapshot {sn.id} ({sn.name}) l1_offset={sn.l1_table_offset:#x}: "
                       "L1 table is not cluster aligned; snapshot table entry corrupted")
            res.corruptions += 1
            continue
        if sn.l1_size > QCOW_MAX_L1_SIZE // 8:
            res.report(f"ERROR snapshot {sn.id} ({sn.name}) l1_size={sn.l1_size:#x}: "
                       "L1 table is too large; snapshot table entry corrupted")
            res.corruptions += 1
            continue
        key = (sn.l1_table_offset, sn.l1_size)
        seen_l1[key] = seen_l1.get(key, 0) + 1
    budget = 4 * counter.file_len + (64 << 20)     # hostile overlapping L1 tables
    for (l1_offset, l1_size), count in seen_l1.items():
        budget -= 8 * l1_size
        if budget < 0:
            res.report("ERROR snapshot L1 tables are larger than the image file can hold")
            res.corruptions += 1
            break
        _check_l1(drv, res, counter, l1_offset, l1_size, active=False, times=count)
    if h.nb_snapshots:
        from imagetools.formats.qcow2.snapshots import snapshot_table_size
        counter.inc(h.snapshots_offset, snapshot_table_size(drv.file, h))
    rc = drv.refcounts
    counter.inc(rc.table_offset, len(rc.table) * 8)
    crypto = h.extension(hdr.EXT_CRYPTO_HEADER)
    if crypto is not None and len(crypto.data) == 16:
        offset = int.from_bytes(crypto.data[:8], "big")
        length = int.from_bytes(crypto.data[8:], "big")
        counter.inc(offset, length)
    _count_bitmaps(drv, counter)
    _check_refblocks(drv, res, counter)


def _count_bitmaps(drv: "Qcow2Driver", counter: _Counter) -> None:
    if drv.header.extension(hdr.EXT_BITMAPS) is None:
        return                       # (and the bitmaps module is not even imported)
    from imagetools.formats.qcow2.bitmaps import (
        BME_TABLE_ENTRY_OFFSET_MASK, bitmaps_extension, read_bitmap_table)
    ext = bitmaps_extension(drv.header)
    if ext is None:
        return
    counter.inc(ext.directory_offset, ext.directory_size)
    for bm in drv.bitmaps():
        counter.inc(bm.table_offset, bm.table_size * 8)
        try:
            table = read_bitmap_table(drv.file, bm, drv.size, drv.cluster_size)
        except Exception as err:   # noqa: BLE001 - a broken table is a finding
            counter.res.report(f"ERROR bitmap '{bm.name}': {err}")
            counter.res.corruptions += 1
            continue
        for entry in table:
            offset = entry & BME_TABLE_ENTRY_OFFSET_MASK
            if offset:
                counter.inc(offset, drv.cluster_size)


def _check_l1(drv: "Qcow2Driver", res: CheckResult, counter: _Counter, l1_offset: int,
              l1_size: int, *, active: bool, times: int = 1) -> None:
    cs = drv.cluster_size
    for _ in range(times):
        counter.inc(l1_offset, l1_size * 8)
    if active:
        l1 = drv.l1.values
    elif not l1_size or l1_offset >= counter.file_len:
        l1 = []                           # past the end of the file: all zeros
    else:
        l1 = read_be64_array(drv.file, l1_offset, l1_size)
    # An L2 table referenced many times (hostile or not) is walked once and
    # counted as often as it is referenced, so the work stays bounded by the
    # file size rather than by the L1 size. Normal tables keep QEMU's order.
    multiplicity: dict[int, int] = {}
    for entry in l1:
        off = entry & L1E_OFFSET_MASK
        if off:
            multiplicity[off] = multiplicity.get(off, 0) + 1
    done: set[int] = set()
    for entry in l1:
        if not entry:
            continue
        if entry & L1E_RESERVED_MASK:
            for _ in range(times):
                res.report(f"ERROR found L1 entry with reserved bits set: {entry:x}")
                res.corruptions += 1
        l2_offset = entry & L1E_OFFSET_MASK
        if not l2_offset:
            continue
        many = multiplicity[l2_offset] > 4
        if many and l2_offset in done:
            continue
        count = times * (multiplicity[l2_offset] if many else 1)
        done.add(l2_offset)
        counter.inc(l2_offset, cs, count)
        if l2_offset % cs:
            for _ in range(min(count, 4)):
                res.report(f"ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; "
                           "L1 entry corrupted")
            res.corruptions += count
            if counter.fix:
                # QEMU would "repair" entries of a table read at a wrong place,
                # overwriting whatever is there (guest data): never through it
                continue
        if l2_offset >= counter.file_len:
            continue      # reads as zeros: nothing in it to count
        _check_l2(drv, res, counter, l2_offset, active, times=count)


def _check_l2(drv: "Qcow2Driver", res: CheckResult, counter: _Counter, l2_offset: int,
              active: bool, times: int = 1) -> None:
    layout = drv.layout
    cs = drv.cluster_size
    ext = layout.extended_l2
    cached = drv.l2_cache.tables.get(l2_offset)
    if cached is None and counter.fix and l2_offset < counter.file_len:
        cached = drv.l2_cache.get(l2_offset)        # repairs change the cached table
    if cached is not None:
        words = cached.values
    else:
        words = read_be64_array(drv.file, l2_offset, layout.l2_entries * layout.l2_entry_words)
    if active:
        counter.active_l2[l2_offset] = words
    counter.l2_offset = l2_offset
    state = [0]                       # next contiguous host offset (fragmentation)
    if ext or times != 1 or drv.data_file is not None:
        step = 2 if ext else 1
        for i in range(layout.l2_entries):
            entry = words[i * step]
            bitmap = words[i * step + 1] if ext else 0
            if entry or bitmap:
                _check_l2_entry(drv, res, counter, i, entry, bitmap, active, times, state)
        return
    if _plain_l2(drv, res, counter, l2_offset, words, active):
        return
    # the common case, kept lean: standard entries, each referenced once
    counts = counter.counts
    ncount = len(counts)
    maxv = counter.max
    file_len = counter.file_len
    cbits = drv.cluster_bits
    csmask = cs - 1
    odd = QCOW_OFLAG_COMPRESSED | L2E_STD_RESERVED_MASK
    allocated = fragmented = 0
    next_contiguous = 0
    for i, entry in enumerate(words):
        if not entry:
            continue
        if entry & odd or (counter.fix and entry & L2E_OFFSET_MASK & csmask):
            # the slow path (it may repair the entry)
            state[0] = next_contiguous
            res.allocated_clusters += allocated
            res.fragmented_clusters += fragmented
            allocated = fragmented = 0
            _check_l2_entry(drv, res, counter, i, entry, 0, active, 1, state)
            next_contiguous = state[0]
            counts = counter.counts
            ncount = len(counts)
            continue
        offset = entry & L2E_OFFSET_MASK
        if not offset:
            continue                  # zero cluster or unallocated
        if active:
            allocated += 1
            if next_contiguous and offset != next_contiguous:
                fragmented += 1
            next_contiguous = offset + cs
        k = offset >> cbits
        if offset & csmask or k >= ncount or offset >= file_len or counts[k] >= maxv:
            if offset & csmask:
                res.corruptions += 1
                kind = "Preallocated" if entry & QCOW_OFLAG_ZERO else "Data"
                res.report(f"ERROR offset={offset:x}: {kind} cluster is not properly aligned; "
                           "L2 entry corrupted.")
            counter.inc(offset, cs)
            counts = counter.counts
            ncount = len(counts)
        else:
            counts[k] += 1
    res.allocated_clusters += allocated
    res.fragmented_clusters += fragmented


def _plain_l2(drv: "Qcow2Driver", res: CheckResult, counter: _Counter, l2_offset: int,
              words: array, active: bool) -> bool:
    """Count an L2 table in whole-table passes if nothing in it needs a rule.

    Qualifies a plain table (:func:`~.tables.plain_clusters`: unallocated,
    data or zero clusters, nothing compressed, reserved or unaligned) whose
    host clusters are inside the file, with refcounts of 8 bits or more;
    only the refcount increments are a Python loop, and not even that for
    a table of contiguous clusters not counted before (:func:`_count_run`).
    Returns False (nothing changed) when the table needs the entry-by-entry
    walk.
    """
    if drv.layout.refcount_bits < 8:
        return False
    plain = plain_clusters(words, drv.cluster_bits)
    if plain is None:
        return False                 # compressed, reserved or unaligned: the full rules
    ks, copied = plain
    if not ks:
        return True
    counts = counter.counts
    # counted here: clusters up to the last whole one of the file
    limit = min(len(counts), counter.file_len >> drv.cluster_bits)
    run = ks[-1] - ks[0] == len(ks) - 1          # perhaps one run of clusters
    clusters = array("Q", ks) if active or run else None
    run = run and not _discontiguous(clusters)
    if not (run and _count_run(counts, ks[0], len(ks), limit)) and \
            not _count_each(counts, ks, limit):
        return False
    if active:
        # clusters: kept for the COPIED check (8 bytes a cluster)
        res.allocated_clusters += len(clusters)
        res.fragmented_clusters += 0 if run else _discontiguous(clusters)
        counter.plain_l2[l2_offset] = (clusters, copied)
    return True


def _count_each(counts: array, ks: list[int], limit: int) -> bool:
    """One reference to each of clusters ``ks``, one by one; False (nothing
    changed) if one is at or past ``limit`` or its refcount would overflow."""
    # a cluster past the view (IndexError) is reported one by one by the
    # entry walk, as is a refcount over the width (ValueError); both undo
    # what was counted
    view = memoryview(counts)[:limit]
    it = iter(ks)
    try:
        for k in it:
            view[k] += 1
    except (IndexError, ValueError):
        # the failed one was not counted, and the loop left the iterator
        # just after it: what is left in it says how many were
        done = len(ks) - 1 - len(list(it))
        for k in ks[:done]:
            view[k] -= 1
        return False
    finally:
        view.release()               # counts may grow again
    return True


def _count_run(counts: array, first: int, n: int, limit: int) -> bool:
    """One reference to each of clusters ``first`` .. ``first + n - 1`` at once
    if none of them has one yet (a table of contiguous clusters, the usual
    image): their refcounts become 1. False (nothing changed) otherwise."""
    if first + n > limit:
        return False
    width = counts.itemsize
    raw = memoryview(counts).cast("B")
    try:
        lo, hi = first * width, (first + n) * width
        if raw[lo:hi].tobytes().count(0) != hi - lo:
            return False
        raw[lo:hi] = _ONE[width] * n
    finally:
        raw.release()                # counts may grow again
    return True


#: a refcount of 1 in the counts' byte order, by width
_ONE = {w: (1).to_bytes(w, "little" if _NATIVE_LE else "big") for w in (1, 2, 4, 8)}


def _discontiguous(clusters: array) -> int:
    """How many of ``clusters`` (after the first) do not follow the one before."""
    return max(0, len(clusters) - 1 - contiguous_pairs(clusters, 1))


def _ones_at_most(counts: array, stored: array) -> bool:
    """``stored`` equals ``counts`` and no value is above 1 (whole-array tests)."""
    if len(stored) != len(counts) or stored != counts:
        return False
    raw = counts.tobytes()
    width = counts.itemsize
    low = raw[0::width] if _NATIVE_LE else raw[width - 1::width]
    return not raw.translate(None, b"\x00\x01") and low.count(1) == raw.count(1)


def _check_l2_entry(drv: "Qcow2Driver", res: CheckResult, counter: _Counter, i: int,
                    entry: int, bitmap: int, active: bool, times: int, state: list) -> None:
    """One L2 entry, every rule (the slow path)."""
    layout = drv.layout
    cs = drv.cluster_size
    ext = layout.extended_l2
    has_data_file = drv.data_file is not None
    type_ = layout.cluster_type(entry)
    if type_ != COMPRESSED and entry & L2E_STD_RESERVED_MASK:
        res.report(f"ERROR found l2 entry with reserved bits set: {entry:x}")
        res.corruptions += 1
    if type_ == COMPRESSED:
        if entry & QCOW_OFLAG_COPIED:
            res.report(f"ERROR: coffset=0x{entry & layout.cluster_offset_mask:x}: copied "
                       "flag must never be set for compressed clusters")
            entry &= ~QCOW_OFLAG_COPIED
            res.corruptions += 1
        if has_data_file:
            res.report(f"ERROR compressed cluster {i} with data file, entry=0x{entry:x}")
            res.corruptions += 1
            return
        if bitmap:
            res.report(f"ERROR compressed cluster {i} with non-zero subcluster allocation "
                       f"bitmap, entry=0x{entry:x}")
            res.corruptions += 1
            return
        coffset, csize = layout.compressed_range(entry)
        counter.inc(coffset, csize, times)
        if active:
            res.allocated_clusters += times
            res.compressed_clusters += times
            res.fragmented_clusters += times
    elif type_ in (NORMAL, ZERO_ALLOC):
        offset = entry & L2E_OFFSET_MASK
        if (bitmap >> 32) & bitmap:
            res.corruptions += 1
            res.report(f"ERROR offset={offset:x}: Allocated cluster has corrupted subcluster "
                       "allocation bitmap")
        if offset % cs:
            res.corruptions += 1
            contains_data = bool(bitmap & 0xFFFFFFFF) if ext else \
                not entry & QCOW_OFLAG_ZERO
            kind = "Data" if contains_data else "Preallocated"
            fixing = not contains_data and counter.fix & FIX_ERRORS
            res.report(f"{'Repairing' if fixing else 'ERROR'} offset={offset:x}: {kind} cluster "
                       "is not properly aligned; L2 entry corrupted.")
            if fixing:
                from imagetools.formats.qcow2.repair import zero_l2_entry
                zero_l2_entry(drv, counter.l2_offset, i)
                res.corruptions -= 1
                res.corruptions_fixed += 1
                return
        if active:
            res.allocated_clusters += times
            if state[0] and offset != state[0]:
                res.fragmented_clusters += times
            state[0] = offset + cs
        if not has_data_file:
            counter.inc(offset, cs, times)
    elif type_ == UNALLOCATED_PLAIN:
        if bitmap & 0xFFFFFFFF:
            res.corruptions += 1
            res.report("ERROR: Unallocated cluster has non-zero subcluster allocation map")


def _check_refblocks(drv: "Qcow2Driver", res: CheckResult, counter: _Counter) -> None:
    rc = drv.refcounts
    cs = drv.cluster_size
    for i, raw in enumerate(rc.table):
        if not raw:
            continue
        if raw & REFT_RESERVED_MASK:
            res.report(f"ERROR refcount table entry {i} has reserved bits set")
            res.corruptions += 1
            res.rebuild = True
            continue
        offset = raw & REFT_OFFSET_MASK
        cluster = offset >> drv.cluster_bits
        if offset % cs:
            res.report(f"ERROR refcount block {i} is not cluster aligned; refcount table "
                       "entry corrupted")
            res.corruptions += 1
            res.rebuild = True
            continue
        if cluster >= counter.nb_clusters:
            res.corruptions += 1
            fixing = bool(counter.fix & FIX_ERRORS)
            res.report(f"{'Repairing' if fixing else 'ERROR'} refcount block {i} is outside "
                       "image")
            if fixing:
                # QEMU grows the file so that the block is inside (it reads
                # as zeros, which the comparison then sends to a rebuild)
                try:
                    drv.file.truncate(offset + cs)
                except Exception as err:   # noqa: BLE001 - reported as QEMU does
                    res.rebuild = True
                    res.report(f"ERROR could not resize image: {err}")
                    continue
                counter.file_len = drv.file.length()
                counter.nb_clusters = max(counter.nb_clusters, -(-counter.file_len // cs))
                if cluster >= len(counter.counts):
                    counter.counts.extend(array(counter.code, bytes(
                        counter.counts.itemsize * (cluster + 1 - len(counter.counts)))))
                # still counted as a corruption: the rebuild that must follow
                # (the grown part reads as zeros) counts it as fixed
                counter.inc(offset, cs)
                continue
            res.rebuild = True
            continue
        counter.inc(offset, cs)
        if counter.counts[cluster] != 1:
            res.report(f"ERROR refcount block {i} refcount={counter.counts[cluster]}")
            res.corruptions += 1
            res.rebuild = True


def _stored_block(drv: "Qcow2Driver", index: int):
    """The stored refcounts of block ``index`` (None if absent or unreadable)."""
    try:
        blk = drv.refcounts._load(index)
    except Exception:        # noqa: BLE001 - reported by the caller as a check error
        return "error"
    return None if blk is None else blk.values


def _compare_refcounts(drv: "Qcow2Driver", res: CheckResult, counter: _Counter,
                       fix: int = 0) -> int:
    """Compare stored and computed refcounts; returns the highest used cluster.

    With ``fix``, leaks (FIX_LEAKS) and refcounts below the references
    (FIX_ERRORS) are set to the references, as QEMU repairs them; a stored
    refcount of 0 for a used cluster needs a rebuild instead.
    """
    layout = drv.layout
    entries = layout.refblock_entries
    counts = counter.counts
    highest = 0
    n = counter.nb_clusters
    index = 0
    zero_block = None
    flat = array(counts.typecode)
    counter.stored = flat
    while index * entries < n:
        lo = index * entries
        hi = min(n, lo + entries)
        computed = counts[lo:hi]
        stored = _stored_block(drv, index)
        if stored == "error":
            for i in range(lo, hi):
                res.report(f"Can't get refcount for cluster {i}: Input/output error")
                res.check_errors += 1
            flat.extend(array(counts.typecode, bytes(counts.itemsize * (hi - lo))))
            index += 1
            continue
        if stored is None:
            if zero_block is None or len(zero_block) != hi - lo:
                zero_block = array(counts.typecode, bytes(counts.itemsize * (hi - lo)))
            stored_part = zero_block
        else:
            stored_part = stored[:hi - lo]
        flat.extend(stored_part)
        if stored_part == computed:
            raw = computed.tobytes().rstrip(b"\0")
            if raw:
                highest = lo + (len(raw) - 1) // counts.itemsize
        else:
            for i in range(hi - lo):
                r1, r2 = stored_part[i], computed[i]
                if r1 or r2:
                    highest = lo + i
                if r1 == r2:
                    continue
                if r1 == 0:
                    res.rebuild = True
                elif (r1 > r2 and fix & FIX_LEAKS) or (r1 < r2 and fix & FIX_ERRORS):
                    res.report(f"Repairing cluster {lo + i} refcount={r1} reference={r2}")
                    from imagetools.formats.qcow2.repair import set_refcount
                    set_refcount(drv, lo + i, r2)
                    flat[lo + i] = r2
                    if r1 > r2:
                        res.leaks_fixed += 1
                    else:
                        res.corruptions_fixed += 1
                    continue
                if r1 < r2:
                    res.report(f"ERROR cluster {lo + i} refcount={r1} reference={r2}")
                    res.corruptions += 1
                else:
                    res.report(f"Leaked cluster {lo + i} refcount={r1} reference={r2}")
                    res.leaks += 1
        index += 1
    return highest


def _check_oflag_copied(drv: "Qcow2Driver", res: CheckResult, counter: _Counter,
                        fix: int = 0) -> None:
    """COPIED flags of the active tables against the stored refcounts.

    Repaired with FIX_ERRORS, and with FIX_LEAKS alone when the refcounts
    are known to be right by now (QEMU's rule).
    """
    repair = bool(fix & FIX_ERRORS) or (bool(fix & FIX_LEAKS) and not (
        res.check_errors or res.corruptions or res.leaks))
    word = "Repairing" if repair else "ERROR"
    layout = drv.layout
    rc = drv.refcounts
    cbits = drv.cluster_bits
    has_data_file = drv.data_file is not None
    ext = layout.extended_l2
    stored = counter.stored if counter.stored is not None else array("B")
    nstored = len(stored)

    def refcount(cluster: int) -> int | None:
        if cluster < nstored:
            return stored[cluster]
        try:
            return rc.get(cluster)
        except Exception:      # noqa: BLE001 - already reported by the comparison
            return None

    # the clusters of the tables _plain_l2 counted have refcount 1 if the
    # stored refcounts are the counted ones and none is above 1
    single = bool(counter.plain_l2) and _ones_at_most(counter.counts, stored)
    odd = QCOW_OFLAG_COMPRESSED
    for l1i, l1_entry in enumerate(drv.l1.values):
        l2_offset = l1_entry & L1E_OFFSET_MASK
        if not l2_offset:
            continue
        r = refcount(l2_offset >> cbits)
        if r is None:
            continue
        if (r == 1) != bool(l1_entry & QCOW_OFLAG_COPIED):
            res.report(f"{word} OFLAG_COPIED L2 cluster: l1_index={l1i} l1_entry={l1_entry:x} "
                       f"refcount={r}")
            if repair:
                drv.l1.set(l1i, (l1_entry | QCOW_OFLAG_COPIED) if r == 1
                           else (l1_entry & ~QCOW_OFLAG_COPIED))
                res.corruptions_fixed += 1
            else:
                res.corruptions += 1
        if repair and l2_offset % drv.cluster_size:
            continue                  # not a table we may write to (see _check_l1)
        plain = counter.plain_l2.get(l2_offset)
        if plain is not None and not has_data_file:
            # counted whole (see _plain_l2): every entry COPIED and every
            # cluster with refcount 1, or the table is walked entry by entry
            ks, copied = plain
            if copied and (single or max(ks) < nstored and
                           list(map(stored.__getitem__, ks)).count(1) == len(ks)):
                continue
        words = counter.active_l2.get(l2_offset)
        if words is None:
            words = read_be64_array(drv.file, l2_offset, layout.l2_entries * (2 if ext else 1))
        entries = words[::2] if ext else words
        for j, entry in enumerate(entries):
            if not entry or entry & odd:
                continue
            offset = entry & L2E_OFFSET_MASK
            if not offset and not (has_data_file and entry & QCOW_OFLAG_COPIED):
                continue
            if has_data_file:
                r = 1
            else:
                r = refcount(offset >> cbits)
                if r is None:
                    continue
            if (r == 1) != bool(entry & QCOW_OFLAG_COPIED):
                res.report(f"{word} OFLAG_COPIED data cluster: l2_entry={entry:x} "
                           f"refcount={r}")
                if repair:
                    table = drv.l2_cache.get(l2_offset)
                    table.values[j * (2 if ext else 1)] = (entry | QCOW_OFLAG_COPIED) \
                        if r == 1 else (entry & ~QCOW_OFLAG_COPIED)
                    table.dirty = True
                    res.corruptions_fixed += 1
                else:
                    res.corruptions += 1
