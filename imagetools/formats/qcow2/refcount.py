"""qcow2 reference counts: the two-level table, its cache and the allocator.

The refcount table (one contiguous run of clusters) points at refcount
blocks (one cluster each) holding ``refcount_bits``-wide counters, one per
host cluster. This module keeps the table and the blocks it has loaded in
memory as arrays of native integers, hands out contiguous runs of free
clusters, and writes changed metadata back in the order that keeps the file
consistent if we are killed half way:

1. refcount blocks (a block is always written before a table entry points
   at it), then the table entries that changed;
2. a grown table is written in full at its new place, flushed, and only then
   does the header switch to it (one 12-byte write); the old table's
   clusters are freed afterwards.

Refcount *decrements* are never applied here directly by the data path:
the driver queues them (:meth:`Refcounts.defer_free`) and applies them after
the L2 tables that stopped referencing those clusters are on disk, so a
cluster is never reused while an on-disk table still points at it.

Sub-byte widths (1, 2, 4 bits) are expanded to one byte per entry in
memory; on disk bit 0 is the least significant bit, as the spec says.
"""

from __future__ import annotations

import struct
TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from array import array
    from typing import Callable

# ``array`` is imported where it is used (it imports ``collections``, about
# 1.4 ms of a start-up that ``info`` does not otherwise need).

from imagetools.errors import CorruptImageError, ImageError, c_hex
from imagetools.formats.hostfile import HostFile
from imagetools.formats.qcow2.header import QCOW_MAX_REFTABLE_SIZE
from imagetools.formats.qcow2.layout import REFT_OFFSET_MASK, Layout
from imagetools.formats.qcow2.tables import be64_array, be64_bytes

#: array typecodes of the refcount widths (sizes asserted where the first
#: table is decoded)
_TYPECODES = {8: "B", 16: "H", 32: "I", 64: "Q"}


class RefBlock:
    """One refcount block in memory."""

    __slots__ = ("offset", "values", "dirty")

    def __init__(self, offset: int, values: array, dirty: bool = False) -> None:
        self.offset = offset
        self.values = values
        self.dirty = dirty


class Refcounts:
    """The refcount structures of one open image."""

    def __init__(self, file: HostFile, layout: Layout, table_offset: int,
                 table_clusters: int, *, update_header: Callable[[int, int], None] | None,
                 read_only: bool) -> None:
        self.file = file
        self.layout = layout
        self.table_offset = table_offset
        self.table_clusters = table_clusters
        self.update_header = update_header
        self.read_only = read_only
        nbytes = table_clusters * layout.cluster_size
        # read now (a table that cannot be read fails the open, as in QEMU),
        # decoded into ``table`` when first used
        self._raw_table: bytes | None = file.pread_full(table_offset, nbytes)
        self._table: array | None = None
        self.table_dirty: set[int] = set()
        self.blocks: dict[int, RefBlock] = {}
        self.free_hint = 0
        self.pending_free: list[tuple[int, int]] = []
        #: clusters of the previous table, freed once the header moved on
        self.old_tables: list[tuple[int, int]] = []
        bits = layout.refcount_bits
        self._code = _TYPECODES.get(bits, "B")
        self._subbyte = bits < 8
        #: told about every cluster that becomes refcount metadata
        self.on_metadata: Callable[[int, str], None] | None = None

    @property
    def table(self) -> array:
        """The refcount table: refcount block offsets, native integers."""
        if self._table is None:
            from array import array
            assert array("I").itemsize == 4 and array("Q").itemsize == 8
            self._table, self._raw_table = be64_array(self._raw_table), None
        return self._table

    @table.setter
    def table(self, table: array) -> None:
        self._table, self._raw_table = table, None

    # -- reading ----------------------------------------------------------

    def block_offset(self, index: int) -> int:
        if index >= len(self.table):
            return 0
        return self.table[index] & REFT_OFFSET_MASK

    def _load(self, index: int) -> RefBlock | None:
        blk = self.blocks.get(index)
        if blk is not None:
            return blk
        offset = self.block_offset(index)
        if not offset:
            return None
        if offset % self.layout.cluster_size:
            raise CorruptImageError(f"Refblock offset {offset:#x} unaligned (reftable index: "
                                    f"{c_hex(index)})")
        raw = self.file.pread_full(offset, self.layout.cluster_size)
        blk = RefBlock(offset, self._decode(raw))
        self.blocks[index] = blk
        return blk

    def _decode(self, raw: bytes) -> array:
        from array import array
        bits = self.layout.refcount_bits
        if self._subbyte:
            per = 8 // bits
            mask = (1 << bits) - 1
            out = array("B", bytes(len(raw) * per))
            for k in range(per):
                shift = k * bits
                table = bytes(((b >> shift) & mask) for b in range(256))
                out[k::per] = array("B", raw.translate(table))
            return out
        values = array(self._code, raw)
        if bits > 8:
            values.byteswap()
        return values

    def _encode(self, values: array) -> bytes:
        from array import array
        bits = self.layout.refcount_bits
        if self._subbyte:
            per = 8 // bits
            n = len(values) // per
            acc = 0
            for k in range(per):
                shift = k * bits
                table = bytes(((v << shift) & 0xFF) for v in range(256))
                acc |= int.from_bytes(values[k::per].tobytes().translate(table), "big")
            return acc.to_bytes(n, "big")
        if bits > 8:
            copy = array(self._code, values)
            copy.byteswap()
            return copy.tobytes()
        return values.tobytes()

    def get(self, cluster: int) -> int:
        """Refcount of host cluster ``cluster`` (0 where no block exists)."""
        blk = self._load(cluster >> self.layout.refblock_bits)
        if blk is None:
            return 0
        return blk.values[cluster & (self.layout.refblock_entries - 1)]

    # -- changing ---------------------------------------------------------

    def _new_block_values(self) -> array:
        from array import array
        return array(self._code, bytes(self.layout.refblock_entries
                                       * (1 if self._subbyte else array(self._code).itemsize)))

    def change(self, first: int, count: int, delta: int) -> None:
        """Add ``delta`` to the refcounts of ``count`` clusters from ``first``.

        The blocks must exist (the allocator creates them); a refcount that
        would leave ``0..refcount_max`` is an error and nothing changes.
        """
        from array import array
        entries = self.layout.refblock_entries
        bits = self.layout.refblock_bits
        maxv = self.layout.refcount_max
        # validate first so that a failure changes nothing
        pos, end = first, first + count
        while pos < end:
            blk = self._load(pos >> bits)
            stop = min(end, ((pos >> bits) + 1) << bits)
            if blk is None:
                if delta < 0:
                    raise CorruptImageError(f"Refcount underflow at cluster {pos:#x}")
                raise ImageError(f"qcow2: no refcount block for cluster {pos:#x}")
            vals = blk.values
            lo, hi = pos & (entries - 1), ((stop - 1) & (entries - 1)) + 1
            if delta > 0 and max(vals[lo:hi]) + delta > maxv:
                raise ImageError("Refcount overflow: the refcount width of this image is "
                                 "too small")
            if delta < 0 and min(vals[lo:hi]) + delta < 0:
                raise CorruptImageError(f"Refcount underflow at cluster {pos:#x}")
            pos = stop
        pos = first
        while pos < end:
            blk = self._load(pos >> bits)
            stop = min(end, ((pos >> bits) + 1) << bits)
            vals = blk.values
            lo, hi = pos & (entries - 1), ((stop - 1) & (entries - 1)) + 1
            if delta == 1 and not any(vals[lo:hi]):
                vals[lo:hi] = array(self._code, [1]) * (hi - lo)
            else:
                for i in range(lo, hi):
                    vals[i] += delta
            blk.dirty = True
            pos = stop
        if delta < 0 and first < self.free_hint:
            self.free_hint = first

    def set_one(self, cluster: int, value: int) -> None:
        """Set one refcount outright (repair and self-describing blocks)."""
        blk = self._load(cluster >> self.layout.refblock_bits)
        if blk is None:
            raise ImageError(f"qcow2: no refcount block for cluster {cluster:#x}")
        blk.values[cluster & (self.layout.refblock_entries - 1)] = value
        blk.dirty = True

    def defer_free(self, first: int, count: int, *, discard: bool = False) -> None:
        """Queue a decrement to apply once the L2 tables no longer point here.

        ``discard``: the guest asked for it (discard, zero write with unmap);
        clusters that become free are then also punched out of the host file,
        as QEMU passes such discards down.
        """
        self.pending_free.append((first, count, discard))

    def apply_pending_frees(self) -> None:
        pending, self.pending_free = self.pending_free, []
        holes: list[int] = []
        for first, count, discard in pending:
            self.change(first, count, -1)
            if discard:
                holes.extend(c for c in range(first, first + count) if self.get(c) == 0)
        self._punch(sorted(set(holes)))

    def _punch(self, clusters: list[int]) -> None:
        cs = self.layout.cluster_size
        i = 0
        while i < len(clusters):
            j = i
            while j + 1 < len(clusters) and clusters[j + 1] == clusters[j] + 1:
                j += 1
            self.file.punch_hole(clusters[i] * cs, (j - i + 1) * cs)
            i = j + 1

    # -- allocation -------------------------------------------------------

    def _free_run_in(self, pos: int, limit: int, need: int) -> tuple[int, int]:
        """First free cluster >= pos in the block holding pos, and the run length.

        Returns (start, length) with length possibly < need (run hits the
        block end or a used cluster); (limit, 0) if none in this block.
        """
        bits = self.layout.refblock_bits
        entries = self.layout.refblock_entries
        index = pos >> bits
        block_end = min(limit, (index + 1) << bits)
        blk = self._load(index)
        if blk is None:
            return pos, block_end - pos
        vals = blk.values
        lo = pos & (entries - 1)
        hi = ((block_end - 1) & (entries - 1)) + 1
        try:
            i = vals.index(0, lo, hi)
        except ValueError:
            return block_end, 0
        j = i + 1
        want = min(hi, i + need)
        while j < want and vals[j] == 0:
            j += 1
        base = index << bits
        return base + i, j - i

    def find_free(self, count: int, start: int | None = None) -> int:
        """First cluster of a run of ``count`` free clusters (beyond EOF if needed)."""
        pos = self.free_hint if start is None else start
        limit = 1 << 62
        while True:
            run_start, n = self._free_run_in(pos, limit, count)
            if n == 0:
                pos = run_start
                continue
            # extend across following blocks
            total = n
            nxt = run_start + n
            while total < count:
                s, m = self._free_run_in(nxt, limit, count - total)
                if s != nxt or m == 0:
                    break
                total += m
                nxt += m
            if total >= count:
                return run_start
            pos = nxt

    def allocate(self, count: int) -> int:
        """Allocate ``count`` contiguous clusters (refcount 1); returns the first index.

        QEMU's qcow2_alloc_clusters, placement included: the run is the first
        free one from the free-cluster hint; when a refcount block it needs
        is missing, the block is made first (see :meth:`_alloc_block`) and the
        search starts again -- from the run's start if part of it was already
        counted (QEMU undoes that part), else from behind the new block.
        """
        if self.read_only:
            raise ImageError("qcow2: cannot allocate clusters in a read-only image")
        bits = self.layout.refblock_bits
        while True:
            first = self.find_free(count)
            self.free_hint = first + count
            missing = self._missing_blocks(first, count)
            if not missing:
                self.change(first, count, 1)
                return first
            self._alloc_block(missing[0])
            if missing[0] << bits > first:
                self.free_hint = min(self.free_hint, first)

    def allocate_at(self, first: int, count: int) -> bool:
        """Claim exactly clusters ``first..first+count-1`` if they are free."""
        if self._missing_blocks(first, count):
            return False
        if any(self.get(c) for c in range(first, first + count)):
            return False
        self.change(first, count, 1)
        if first <= self.free_hint < first + count:
            self.free_hint = first + count
        return True

    def _missing_blocks(self, first: int, count: int) -> list[int]:
        bits = self.layout.refblock_bits
        return [i for i in range(first >> bits, ((first + count - 1) >> bits) + 1)
                if not self.block_offset(i) and i not in self.blocks]

    def _alloc_block(self, index: int) -> None:
        """Make refcount block ``index`` where QEMU's alloc_refcount_block puts
        it: in the first free cluster from the hint. It counts itself when it
        lies in its own range; else the block covering that cluster counts it,
        and if that one is missing too, it is made first instead (the caller
        comes back). A table too small for ``index`` is replaced by a larger
        one together with new blocks past everything used (QEMU's way).
        """
        bits = self.layout.refblock_bits
        cluster = self.find_free(1)
        self.free_hint = cluster + 1
        home = cluster >> bits
        if index >= len(self.table):
            self._grow_table_for(index, cluster)
            return
        if home != index and not self.block_offset(home) and home not in self.blocks:
            if home < len(self.table):
                self._alloc_block(home)
            else:
                self._grow_table_for(home, cluster)
            return
        blk = self._new_block(index, cluster)
        self.table[index] = blk.offset
        self.table_dirty.add(index)

    def _new_block(self, index: int, cluster: int) -> RefBlock:
        """Refcount block ``index`` stored in ``cluster`` (counting itself there
        when the cluster is in its own range, else counted by the block that
        covers it), in memory and dirty."""
        values = self._new_block_values()
        blk = RefBlock(cluster * self.layout.cluster_size, values, dirty=True)
        if cluster >> self.layout.refblock_bits == index:
            values[cluster & (self.layout.refblock_entries - 1)] = 1
        else:
            self.change(cluster, 1, 1)
        self.blocks[index] = blk
        if self.on_metadata is not None:
            self.on_metadata(blk.offset, "refcount block")
        return blk

    def _grow_table_for(self, index: int, cluster: int) -> None:
        """The table has no entry ``index``: block ``index`` goes to ``cluster``
        (already the first free one) and a larger table, with new blocks for
        everything up to it, is put behind all that is used -- QEMU's path."""
        bits = self.layout.refblock_bits
        home = cluster >> bits
        if home != index and (home >= len(self.table) or not self.block_offset(home)) \
                and home not in self.blocks:
            index = home                      # QEMU makes that block first
        blk = self._new_block(index, cluster)
        used = max(index + 1, home + 1)
        self.area(used * self.layout.refblock_entries * self.layout.cluster_size, 0,
                  exact=False, new_index=index, new_offset=blk.offset)

    def blocks_needed(self, clusters: int, *, generous: bool = False) -> int:
        """Refcount blocks to count ``clusters`` and the refcount structures
        themselves (qcow2_refcount_metadata_size's fixed point)."""
        cs = self.layout.cluster_size
        per_table_cluster = cs // 8
        per_block = self.layout.refblock_entries
        table = blocks = n = 0
        while True:
            last = n
            blocks = -(-(clusters + table + blocks) // per_block)
            table = -(-blocks // per_table_cluster)
            n = clusters + blocks + table
            if n == last and generous:
                clusters += -(-table // 2)
                n = 0
                generous = False
            elif n == last:
                return blocks

    def area(self, start: int, additional: int, *, exact: bool, new_index: int | None = None,
             new_offset: int = 0) -> int:
        """QEMU's qcow2_refcount_area: refcount blocks for everything up to
        ``additional`` clusters past ``start``, then a new refcount table, are
        written at ``start``; the header switches to the table in one write
        and the old one is freed. Returns where the free space after them
        begins. (An interruption leaves the old structures in force.)"""
        from array import array
        layout = self.layout
        cs = layout.cluster_size
        cbits = layout.cluster_bits
        entries = layout.refblock_entries
        total = self.blocks_needed((start >> cbits) + additional, generous=not exact)
        area_index = (start >> cbits) // entries
        size = total if exact else total + -(-total // 2)
        size = -(-size // (cs // 8)) * (cs // 8)
        if total > QCOW_MAX_REFTABLE_SIZE or size * 8 > QCOW_MAX_REFTABLE_SIZE:
            import errno
            from imagetools.errors import ImageIOError
            raise ImageIOError("File too large", errno.EFBIG)
        table_clusters = size * 8 // cs
        table = array("Q", bytes(8 * size))
        keep = min(len(self.table), size)
        table[:keep] = self.table[:keep]
        if new_index is not None:
            table[new_index] = new_offset
        missing = sum(1 for i in range(area_index, total) if not table[i] & REFT_OFFSET_MASK)
        table_offset = start + missing * cs
        end = table_offset + table_clusters * cs
        block_offset = start
        for i in range(area_index, total):
            if table[i] & REFT_OFFSET_MASK:
                blk = self.blocks.get(i) or self._load(i)
            else:
                blk = RefBlock(block_offset, self._new_block_values(), dirty=True)
                self.blocks[i] = blk
                table[i] = block_offset
                block_offset += cs
                if self.on_metadata is not None:
                    self.on_metadata(blk.offset, "refcount block")
            covered = i * entries * cs
            if covered < end:
                for k in range((start - covered) // cs if covered < start else 0,
                               min((end - covered) // cs, entries)):
                    blk.values[k] = 1
                blk.dirty = True
        self.write_blocks()
        self.file.flush()
        self.file.pwrite(table_offset, be64_bytes(table))
        self.file.flush()
        old_offset, old_clusters = self.table_offset, self.table_clusters
        if self.update_header is not None:
            self.update_header(table_offset, table_clusters)
        self.file.flush()
        self.table = table
        self.table_offset, self.table_clusters = table_offset, table_clusters
        self.table_dirty.clear()
        self._table_moved = False
        if self.on_metadata is not None:
            for k in range(table_clusters):
                self.on_metadata(table_offset + k * cs, "refcount table")
        if old_clusters:
            self.change(old_offset >> cbits, old_clusters, -1)
        return end

    def move_table(self) -> None:
        """Put the refcount table at the first free place (QEMU does this before
        falloc/full preallocation); the old clusters are freed after the switch."""
        cs = self.layout.cluster_size
        clusters = self.table_clusters
        first = self.allocate(clusters)
        self.old_tables.append((self.table_offset, clusters))
        self.table_offset = first * cs
        self.table_dirty = set(range(len(self.table)))
        self._table_moved = True
        if self.on_metadata is not None:
            for k in range(clusters):
                self.on_metadata((first + k) * cs, "refcount table")

    # -- writeback --------------------------------------------------------

    @property
    def dirty(self) -> bool:
        return bool(self.table_dirty) or any(b.dirty for b in self.blocks.values())

    def write_blocks(self) -> None:
        """Write every changed refcount block (step 1 of a writeback)."""
        for blk in sorted(self.blocks.values(), key=lambda b: b.offset):
            if blk.dirty:
                self.file.pwrite(blk.offset, self._encode(blk.values))
                blk.dirty = False

    def write_table(self, flush: Callable[[], None]) -> None:
        """Write changed table entries, or the moved table and switch the header."""
        if not self.table_dirty:
            return
        moved = getattr(self, "_table_moved", False)
        if moved:
            flush()
            self.file.pwrite(self.table_offset, be64_bytes(self.table))
            flush()
            if self.update_header is not None:
                self.update_header(self.table_offset, self.table_clusters)
            flush()
            self._table_moved = False
            self.table_dirty.clear()
            cs = self.layout.cluster_size
            for offset, clusters in self.old_tables:
                self.defer_free(offset // cs, clusters)
            self.old_tables = []
            return
        for index in sorted(self.table_dirty):
            self.file.pwrite(self.table_offset + 8 * index, struct.pack(">Q", self.table[index]))
        self.table_dirty.clear()

    def drop_cache(self) -> None:
        """Forget clean blocks (keeps memory bounded on huge images)."""
        for index in [i for i, b in self.blocks.items() if not b.dirty]:
            del self.blocks[index]
