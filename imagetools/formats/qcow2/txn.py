"""Crash-safe metadata transactions: refcounts, L1/L2 tables and the snapshot
table of a qcow2 image changed as one step.

Some changes move refcounts and the COPIED flags of the active tables
together: taking, applying or deleting an internal snapshot turns a data
cluster's refcount from 1 to 2 (or back) while its active L2 entry loses (or
gains) QCOW_OFLAG_COPIED. ``qemu-img check`` calls a flag that disagrees
with the refcount a corruption, and the two live in different clusters, so
no order of in-place writes keeps them in step (QEMU itself has that window).
A transaction never writes over live metadata instead:

1. The operation states the new metadata in memory (:class:`Txn`): refcount
   changes, the active L1 table, replaced L2 tables, the snapshot list, the
   virtual size.
2. :meth:`Txn.commit` gives every structure whose content changes a new
   home in clusters that are free before *and* after (refcount 0 on disk and
   in the new counts) and writes it there: L2 tables, L1 tables, the
   snapshot table, refcount blocks and the refcount table.
3. One write of header bytes 24..72 (virtual size, L1 size and offset,
   refcount table offset and size, snapshot count and offset) switches the
   image from the old metadata to the new; a flush comes before and after.
4. Clusters that only the old metadata used are already free in the new
   refcounts; they are punched out of the host file.

Killed before step 3, the image is the old one (the new homes are clusters
nothing refers to and the refcounts call free); after it, the new one. No
state in between is ever visible, so there is not even a leak.

The layout therefore differs from QEMU's after such an operation (changed
tables live in new clusters); the refcounts and flags follow QEMU's rules
exactly, so QEMU reads, applies and deletes what qimg wrote and the other
way round.
"""

from __future__ import annotations

import errno
import struct
from array import array
from itertools import compress
from operator import gt as _gt

from imagetools.errors import CorruptImageError, ImageIOError
from imagetools.formats.base import SnapshotInfo
from imagetools.formats.qcow2.layout import (
    L1E_OFFSET_MASK, L2E_OFFSET_MASK, QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_COPIED,
    REFT_OFFSET_MASK)
from imagetools.formats.qcow2.tables import (be64_bytes, plain_entries, read_be64_array,
                                             with_copied)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from imagetools.formats.qcow2.driver import Qcow2Driver

_LITTLE = struct.pack("=H", 1) == struct.pack("<H", 1)

#: header bytes 24..72: size, crypt_method, l1_size, l1_table_offset,
#: refcount_table_offset, refcount_table_clusters, nb_snapshots, snapshots_offset
_ROOTS = struct.Struct(">QIIQQIIQ")
_ROOTS_AT = 24


class _Snap:
    """A snapshot table entry in a transaction; ``l1`` set when its L1 changes."""

    __slots__ = ("info", "l1", "old_offset", "old_size")

    def __init__(self, info: SnapshotInfo, l1: array | None = None, new: bool = False) -> None:
        self.info = info
        self.l1 = l1
        self.old_offset = 0 if new else info.l1_table_offset
        self.old_size = 0 if new else info.l1_size


class Txn:
    """The new metadata of ``drv``, built in memory and committed atomically."""

    def __init__(self, drv: "Qcow2Driver") -> None:
        drv.writeback()
        # a table nothing counts (past the end of the file) would look free
        # here and be kept, moved or overwritten wrongly
        drv.refuse_uncounted_metadata()
        drv._before_metadata_write()
        self.drv = drv
        self.layout = drv.layout
        self.cs = drv.cluster_size
        self.cbits = drv.cluster_bits
        self.file_len = drv.file.length()
        self.stored = self._load_refcounts()
        self.counts = array(self.stored.typecode, self.stored)
        self.size = drv.size
        self.l1 = array("Q", drv.l1.values)
        self.snaps = [_Snap(info) for info in drv.snapshots()]
        self.snaps_changed = False
        #: replaced L2 tables: old host offset -> new words
        self.l2: dict[int, array] = {}
        self._hint = 0
        #: plain_entries of the tables looked at: id(words) -> (words, result)
        self._plain: dict[int, tuple] = {}

    # -- reading the current metadata ------------------------------------------

    def _load_refcounts(self) -> array:
        rc = self.drv.refcounts
        entries = self.layout.refblock_entries
        flat = array(rc._code)
        last = max(compress(range(len(rc.table)), map(REFT_OFFSET_MASK.__and__, rc.table)),
                   default=-1)
        zero = array(rc._code, bytes(flat.itemsize * entries))
        for index in range(last + 1):
            blk = rc._load(index)
            flat.extend(zero if blk is None else blk.values[:entries])
        return flat

    def l2_values(self, offset: int) -> array:
        """Words of the L2 table at ``offset`` (as replaced in this transaction)."""
        table = self.l2.get(offset)
        if table is not None:
            return table
        if offset % self.cs or offset + self.cs > self.file_len + self.cs:
            raise CorruptImageError(f"L2 table offset {offset:#x} is invalid")
        return self.drv.l2_cache.get(offset).values

    def plain(self, words: array):
        """:func:`~.tables.plain_entries` of ``words`` (a table this transaction
        does not change in place), computed once per table."""
        seen = self._plain.get(id(words))
        if seen is not None and seen[0] is words:
            return seen[1]
        result = plain_entries(words, self.cbits)
        self._plain[id(words)] = (words, result)
        return result

    def snapshot_l1(self, index: int) -> array:
        """The L1 table of snapshot ``index`` (as changed in this transaction)."""
        snap = self.snaps[index]
        if snap.l1 is not None:
            return snap.l1
        info = snap.info
        if info.l1_table_offset % self.cs or \
                info.l1_table_offset + 8 * info.l1_size > self.file_len + self.cs:
            raise CorruptImageError("Snapshot L1 table offset invalid")
        return read_be64_array(self.drv.file, info.l1_table_offset, info.l1_size)

    # -- refcounts -----------------------------------------------------------------

    def add(self, cluster: int, delta: int) -> None:
        counts = self.counts
        if cluster >= len(counts):
            counts.extend(array(counts.typecode,
                                bytes(counts.itemsize * (cluster + 1 - len(counts)))))
        value = counts[cluster] + delta
        if value < 0:
            raise CorruptImageError(f"Refcount underflow at cluster {cluster:#x}")
        if value > self.layout.refcount_max:
            raise ImageIOError("Invalid argument", errno.EINVAL)   # as QEMU's update_refcount
        counts[cluster] = value

    def add_bytes(self, offset: int, nbytes: int, delta: int) -> None:
        """Change the refcount of every cluster ``[offset, offset+nbytes)`` touches."""
        if nbytes <= 0:
            return
        for cluster in range(offset >> self.cbits, ((offset + nbytes - 1) >> self.cbits) + 1):
            self.add(cluster, delta)

    def add_paths(self, l1_values: array, delta: int) -> None:
        """Change by ``delta`` the refcount of every L2 table and data cluster
        reachable through ``l1_values`` (QEMU's qcow2_update_snapshot_refcount)."""
        layout = self.layout
        cbits = self.cbits
        has_data_file = self.drv.data_file is not None
        step = layout.l2_entry_words
        odd = QCOW_OFLAG_COMPRESSED | (self.cs - 1) & L2E_OFFSET_MASK
        for l1_entry in l1_values:
            l2_offset = l1_entry & L1E_OFFSET_MASK
            if not l2_offset:
                continue
            self.add(l2_offset >> cbits, delta)
            words = self.l2_values(l2_offset)
            if step == 1 and not has_data_file:
                plain = self.plain(words)
                if plain is not None:           # the common table: whole-table passes
                    self._add_many(plain[0], delta)
                    continue
            entries = words[::step] if step > 1 else words
            special = [e for e in entries if e & odd]
            for entry in special:
                if entry & QCOW_OFLAG_COMPRESSED:
                    coffset, nbytes = layout.compressed_range(entry)
                    self.add_bytes(coffset, nbytes, delta)
                elif not has_data_file:
                    raise CorruptImageError(f"Cluster allocation offset "
                                            f"{entry & L2E_OFFSET_MASK:#x} unaligned")
            if has_data_file:
                continue
            hosts = [(e & L2E_OFFSET_MASK) >> cbits for e in entries
                     if e & L2E_OFFSET_MASK and not e & odd]
            self._add_many(hosts, delta)

    def _add_many(self, clusters: list[int], delta: int) -> None:
        """``add`` for many clusters (the common case of add_paths, kept lean)."""
        if not clusters:
            return
        counts = self.counts
        top = max(clusters)
        if top >= len(counts):
            self.add(top, 0)
        limit = self.layout.refcount_max
        first = clusters[0]
        if delta in (1, -1) and clusters[-1] - first == len(clusters) - 1 > 64 and \
                _LITTLE and clusters == list(range(first, first + len(clusters))):
            self._add_run(first, len(clusters), delta)
            return
        for c in clusters:
            counts[c] += delta if 0 <= counts[c] + delta <= limit else \
                self._bad(c, counts[c] + delta)

    def _add_run(self, first: int, count: int, delta: int) -> None:
        """``delta`` (+1 or -1) on the ``count`` clusters from ``first`` (a table
        written in one run, the common case): the run's refcounts are added
        to as the fields of one big integer, which never carries from one
        field to the next once every value is known to stay in range."""
        counts = self.counts
        part = counts[first:first + count]
        edge = self.layout.refcount_max if delta > 0 else 0
        if edge in part:
            bad = first + part.index(edge)
            self._bad(bad, counts[bad] + delta)
        size = part.itemsize * count
        ones = int.from_bytes(array(part.typecode, [1]).tobytes() * count, "little")
        value = int.from_bytes(part.tobytes(), "little")
        value = value + ones if delta > 0 else value - ones
        counts[first:first + count] = array(part.typecode, value.to_bytes(size, "little"))

    def _bad(self, cluster: int, value: int) -> int:
        if value < 0:
            raise CorruptImageError(f"Refcount underflow at cluster {cluster:#x}")
        raise ImageIOError("Invalid argument", errno.EINVAL)   # as QEMU's update_refcount

    # -- snapshots -------------------------------------------------------------------

    def add_snapshot(self, info: SnapshotInfo, l1_values: array) -> None:
        self.snaps.append(_Snap(info, array("Q", l1_values), new=True))
        self.snaps_changed = True

    def remove_snapshot(self, index: int) -> None:
        """Drop entry ``index``; its L1 table's clusters are freed (the caller
        takes care of what the L1 table refers to)."""
        snap = self.snaps.pop(index)
        if snap.old_size:
            self.add_bytes(snap.old_offset, 8 * snap.old_size, -1)
        self.snaps_changed = True

    # -- COPIED flags ------------------------------------------------------------------

    def fix_active_copied(self) -> None:
        """Set QCOW_OFLAG_COPIED in the active L2 tables exactly where the new
        refcount of the data cluster is 1 (QEMU's rule; compressed never)."""
        step = self.layout.l2_entry_words
        counts = self.counts
        n = len(counts)
        cbits = self.cbits
        data_file = self.drv.data_file is not None
        copied = QCOW_OFLAG_COPIED
        mask = L2E_OFFSET_MASK
        compressed = QCOW_OFLAG_COMPRESSED
        seen: set[int] = set()
        for l1_entry in self.l1:
            l2_offset = l1_entry & L1E_OFFSET_MASK
            if not l2_offset or l2_offset in seen:
                continue
            seen.add(l2_offset)
            words = self.l2_values(l2_offset)
            if step == 1 and not data_file:
                new = self._plain_copied(words, counts)
                if new is not None:
                    if new is not words:
                        self.l2[l2_offset] = new
                    continue
            entries = words[::step] if step > 1 else words
            if data_file:
                want = [e | copied if (e & mask or e & copied) and not e & compressed else e
                        for e in entries]
            else:
                want = [e if not e & mask or e & compressed else
                        (e | copied) if (e & mask) >> cbits < n and counts[(e & mask) >> cbits] == 1
                        else (e & ~copied) for e in entries]
            new = array("Q", want)
            if new == entries:
                continue
            if step > 1:
                full = array("Q", words)
                full[::step] = new
                new = full
            self.l2[l2_offset] = new

    def _plain_copied(self, words: array, counts: array) -> array | None:
        """fix_active_copied for a plain table where the answer is the same for
        every entry with a host cluster (all refcounts 1: COPIED everywhere,
        none 1: nowhere -- what snapshot -c, -d and -a leave): the table
        itself if nothing changes, the new words, or None (entry by entry)."""
        plain = self.plain(words)
        if plain is None:
            return None
        clusters, flags, indices = plain
        if not clusters:
            return words
        if max(clusters) >= len(counts):
            return None
        ones = list(map(counts.__getitem__, clusters)).count(1)
        if ones == len(clusters):
            return words if flags.count(0x80) == len(flags) else \
                with_copied(words, indices, True)
        if ones == 0:
            return words if not flags.count(0x80) else with_copied(words, indices, False)
        return None

    # -- committing ----------------------------------------------------------------

    def _is_free(self, cluster: int) -> bool:
        return (cluster >= len(self.counts) or not self.counts[cluster]) and \
            (cluster >= len(self.stored) or not self.stored[cluster])

    def _alloc(self, count: int) -> int:
        """First run of ``count`` clusters free before and after; counted as used."""
        counts = self.counts
        c = self._hint
        while True:
            if c < len(counts) and counts[c]:
                try:
                    c = counts.index(0, c)
                except ValueError:
                    c = len(counts)
            if not self._is_free(c):
                c += 1
                continue
            run = 1
            while run < count and self._is_free(c + run):
                run += 1
            if run >= count:
                break
            c += run
        for k in range(count):
            self.add(c + k, 1)
        self._hint = c + count
        return c

    def _alloc_bytes(self, nbytes: int) -> int:
        return self._alloc(max(1, -(-nbytes // self.cs))) * self.cs if nbytes else 0

    def commit(self, *, discard: bool = True) -> None:
        """Write the new metadata and switch the header to it (module doc)."""
        drv = self.drv
        self.fix_active_copied()
        l2_homes = self._home_l2_tables()
        l1_offset, l1_home_new = self._home_active_l1()
        snap_table = self._home_snapshots()
        table_offset, table_clusters, table, blocks = self._home_refcounts()
        # every new structure, then the refcounts that count them
        file = drv.file
        for home, words in l2_homes:
            file.pwrite(home, be64_bytes(words))
        for snap in self.snaps:
            if snap.l1 is not None and snap.l1:
                file.pwrite(snap.info.l1_table_offset, be64_bytes(snap.l1))
        if l1_home_new and len(self.l1):
            file.pwrite(l1_offset, be64_bytes(self.l1))
        nb_snapshots, snapshots_offset, table_bytes = snap_table
        if table_bytes:
            file.pwrite(snapshots_offset, table_bytes)
        rc = drv.refcounts
        entries = self.layout.refblock_entries
        for index, home in sorted(blocks.items()):
            if home:
                part = self.counts[index * entries:(index + 1) * entries]
                if len(part) < entries:
                    part.extend(array(part.typecode, bytes(part.itemsize * (entries - len(part)))))
                file.pwrite(home, rc._encode(part))
        if table is not None:
            file.pwrite(table_offset, be64_bytes(table).ljust(table_clusters * self.cs, b"\0"))
        drv._sync()
        h = drv.header
        file.pwrite(_ROOTS_AT, _ROOTS.pack(self.size, h.crypt_method, len(self.l1), l1_offset,
                                           table_offset, table_clusters, nb_snapshots,
                                           snapshots_offset))
        drv._sync()
        drv._reload_metadata()
        if discard:
            self._punch_freed()

    def _home_l2_tables(self) -> list[tuple[int, array]]:
        """New places for changed L2 tables; every L1 table follows them."""
        moves: dict[int, int] = {}
        homes = []
        for old, words in sorted(self.l2.items()):
            count = self.counts[old >> self.cbits] if (old >> self.cbits) < len(self.counts) else 0
            if not count:
                continue
            home = self._alloc(1) << self.cbits
            self.add(home >> self.cbits, count - 1)
            self.add(old >> self.cbits, -count)
            moves[old] = home
            homes.append((home, words))
        if not moves:
            return homes

        def remap(l1: array) -> array | None:
            out = None
            for i, entry in enumerate(l1):
                home = moves.get(entry & L1E_OFFSET_MASK)
                if home is not None:
                    if out is None:
                        out = array("Q", l1)
                    out[i] = (entry & ~L1E_OFFSET_MASK) | home
            return out

        new_active = remap(self.l1)
        if new_active is not None:
            self.l1 = new_active
        for index, snap in enumerate(self.snaps):
            new = remap(self.snapshot_l1(index))
            if new is not None:
                snap.l1 = new
                self.snaps_changed = True
        return homes

    def _home_active_l1(self) -> tuple[int, bool]:
        """Flags of the active L1 entries, and its (new) home if it changed."""
        cbits = self.cbits
        n = len(self.counts)
        for i, entry in enumerate(self.l1):
            off = entry & L1E_OFFSET_MASK
            if not off:
                continue
            one = (off >> cbits) < n and self.counts[off >> cbits] == 1
            self.l1[i] = (entry | QCOW_OFLAG_COPIED) if one else (entry & ~QCOW_OFLAG_COPIED)
        drv = self.drv
        old = drv.l1
        if len(self.l1) == len(old) and self.l1 == old.values:
            return old.offset, False
        if len(old):
            self.add_bytes(old.offset, 8 * len(old), -1)
        return self._alloc_bytes(8 * len(self.l1)), True

    def _home_snapshots(self) -> tuple[int, int, bytes]:
        """(count, offset, bytes) of the snapshot table, rehomed when it changed."""
        h = self.drv.header
        if not self.snaps_changed:
            return h.nb_snapshots, h.snapshots_offset, b""
        from imagetools.formats.qcow2.snapshots import encode_table, snapshot_table_size
        for snap in self.snaps:
            if snap.l1 is None:
                continue
            if snap.old_size:
                self.add_bytes(snap.old_offset, 8 * snap.old_size, -1)
                snap.old_size = 0
            snap.info.l1_size = len(snap.l1)
            snap.info.l1_table_offset = self._alloc_bytes(8 * len(snap.l1))
        if h.nb_snapshots:
            self.add_bytes(h.snapshots_offset, snapshot_table_size(self.drv.file, h), -1)
        if not self.snaps:
            return 0, 0, b""
        table = encode_table([s.info for s in self.snaps])
        return len(self.snaps), self._alloc_bytes(len(table)), table

    def _home_refcounts(self):
        """New refcount blocks where counts change, and a new refcount table.

        Homes change counts themselves, so this repeats until nothing moves.
        Returns (table offset, table clusters, table entries or None, {block
        index: new home, or 0 for a block no longer needed}).
        """
        rc = self.drv.refcounts
        cs, cbits = self.cs, self.cbits
        entries = self.layout.refblock_entries
        old_table = rc.table
        blocks: dict[int, int] = {}
        released: set[int] = set()
        table_home, table_clusters = 0, rc.table_clusters

        def old_home(index: int) -> int:
            return old_table[index] & REFT_OFFSET_MASK if index < len(old_table) else 0

        def release_old(index: int) -> None:
            if index not in released and old_home(index):
                released.add(index)
                self.add(old_home(index) >> cbits, -1)

        old_present = list(compress(range(len(old_table)),
                                    map(REFT_OFFSET_MASK.__and__, old_table)))
        while True:
            changed = False
            indices = set(range(-(-len(self.counts) // entries))).union(old_present)
            for index in sorted(indices):
                part = self.counts[index * entries:(index + 1) * entries]
                needed = part.count(0) != len(part)
                home = blocks.get(index)
                if needed:
                    if home or (home is None and old_home(index)
                                and self._same_block(index, part)):
                        continue
                    blocks[index] = self._alloc(1) * cs
                    release_old(index)
                    changed = True
                elif home or (home is None and old_home(index)):
                    if home:
                        self.add(home >> cbits, -1)
                    blocks[index] = 0
                    release_old(index)
                    changed = True
            last = max((i for i in indices if blocks.get(i, old_home(i))), default=0)
            need = max(rc.table_clusters, -(-8 * (last + 1) // cs))
            if blocks and (not table_home or need > table_clusters):
                if table_home:
                    self.add_bytes(table_home, table_clusters * cs, -1)
                else:
                    self.add_bytes(rc.table_offset, rc.table_clusters * cs, -1)
                table_clusters = need
                table_home = self._alloc(table_clusters) * cs
                changed = True
            if not changed:
                break
        if not table_home:
            return rc.table_offset, rc.table_clusters, None, {}
        table = array("Q", bytes(table_clusters * cs))
        table[:min(len(old_table), len(table))] = old_table[:len(table)]
        for index, home in blocks.items():
            table[index] = home
        return table_home, table_clusters, table, blocks

    def _same_block(self, index: int, part: array) -> bool:
        entries = self.layout.refblock_entries
        stored = self.stored[index * entries:(index + 1) * entries]
        if len(stored) < len(part):
            stored.extend(array(stored.typecode, bytes(stored.itemsize * (len(part) - len(stored)))))
        return stored[:len(part)] == part and not any(self.counts[index * entries + len(part):
                                                                   (index + 1) * entries])

    def _punch_freed(self) -> None:
        """Punch the clusters only the old metadata used out of the file."""
        stored, counts = self.stored, self.counts
        # only clusters counted before can be freed (the flat stored refcounts
        # end in whole refcount blocks, mostly zeros past the end of the file)
        used = len(stored.tobytes().rstrip(b"\0"))
        n = min(len(counts), -(-used // stored.itemsize))
        if counts[:n].count(0) * 16 > n:
            # in use before (stored != 0), not any more (count 0), at C speed
            freed = list(compress(range(n), map(_gt, map(bool, stored[:n]),
                                                map(bool, counts[:n]))))
        else:                         # few free clusters: look at those only
            freed = []
            find = counts.index
            cluster = -1
            while True:
                try:
                    cluster = find(0, cluster + 1, n)
                except ValueError:
                    break
                if stored[cluster]:
                    freed.append(cluster)
        freed += [c for c in range(n, -(-used // stored.itemsize)) if stored[c]]
        if freed:
            self.drv.refcounts._punch(freed)
