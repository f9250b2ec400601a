"""The active L1 table and the L2 table cache of a qcow2 image.

Tables live in memory as arrays of native 64-bit integers (one word per
entry, or two -- entry and subcluster bitmap -- with extended L2). L2
tables are cached by host offset with LRU eviction of clean tables; dirty
tables stay until written back (the driver decides when: its writeback
writes refcounts first, then L2 tables, then the L1 entries that changed).
"""

from __future__ import annotations

import struct
from itertools import compress

from imagetools.errors import CorruptImageError
from imagetools.formats.hostfile import HostFile
from imagetools.formats.qcow2.layout import Layout

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from array import array

# ``array`` is imported where it is used: it imports ``collections`` (about
# 1.4 ms), and a command that only reads the header (``info``) needs neither.

_NATIVE_LE = struct.pack("=H", 1) == struct.pack("<H", 1)


def be64_array(raw: bytes) -> array:
    """Big-endian 64-bit table entries as native integers."""
    from array import array
    values = array("Q", raw)
    if _NATIVE_LE:
        values.byteswap()
    return values


def read_be64_array(file: HostFile, offset: int, count: int) -> array:
    return be64_array(file.pread_full(offset, 8 * count))


def be64_bytes(values: array) -> bytes:
    from array import array
    if _NATIVE_LE:
        values = array("Q", values)
        values.byteswap()
    return values.tobytes()


def plain_entries(words: array, cluster_bits: int) -> tuple[list[int], bytes, array] | None:
    """Whole-table view of a standard L2 table whose entries are all plain.

    Plain: unallocated, data or zero clusters -- no compressed or reserved
    bits and every host offset aligned. Returns ``(clusters, flags,
    indices)``: the host cluster index of every entry that has a host
    cluster, in table order; the flag byte (0x80 COPIED or 0) of each of
    those; and per entry its host cluster index or 0. None when an entry
    needs the entry-by-entry rules (or the machine is big-endian).

    Everything runs at C speed on the entries' bytes (see
    :func:`_plain_bytes` and :func:`_index_bytes`).
    """
    from array import array
    raw = _plain_bytes(words, cluster_bits, b"\x00\x01")
    if raw is None:
        return None
    indices = array("Q", _index_bytes(raw, cluster_bits))
    return list(filter(None, indices)), bytes(compress(raw[7::8], indices)), indices


def plain_clusters(words: array, cluster_bits: int) -> tuple[list[int], bool] | None:
    """:func:`plain_entries` for counting references: ``(clusters, copied)``.

    ``clusters`` as there; ``copied`` whether every entry that has a host
    cluster has QCOW_OFLAG_COPIED (found with whole-table operations
    rather than a flag byte per cluster).
    """
    from array import array
    raw = _plain_bytes(words, cluster_bits, b"\x00\x01")
    if raw is None:
        return None
    moved = _index_bytes(raw, cluster_bits)
    n = len(words)
    present = 0         # byte i not 0: entry i has a host cluster (OR has no carries)
    for lane in range(8 - cluster_bits // 8):
        present |= int.from_bytes(moved[lane::8], "little")
    uncopied = int.from_bytes(raw[7::8].translate(_ZERO_TO_FF), "little")
    indices = array("Q", moved)
    if present.to_bytes(n, "little").count(0):
        clusters = list(filter(None, indices))
    else:
        clusters = indices.tolist()           # a full table: nothing to leave out
    return clusters, not present & uncopied


def data_hosts(words: array, cluster_bits: int) -> tuple[array, bytes] | None:
    """Host offsets of standard L2 entries that are all unallocated or data.

    Data: an aligned host offset, no zero, compressed or reserved bits
    (COPIED may be set); unallocated: the entry is 0. Returns ``(hosts,
    present)``: every entry's host offset (0 for the unallocated ones) and
    a byte per entry, 1 for data and 0 for unallocated; None when an entry
    is anything else (or the machine is big-endian). The offsets are the
    entries with their flag byte cleared.
    """
    from array import array
    raw = _plain_bytes(words, cluster_bits, b"\x00")
    if raw is None:
        return None
    n = len(words)
    offsets = 0             # byte i not 0: entry i has an offset (OR has no carries)
    for lane in range(1, 7):
        offsets |= int.from_bytes(raw[lane::8], "little")
    present = offsets.to_bytes(n, "little").translate(_NONZERO)
    if int.from_bytes(raw[7::8], "little") & ~(int.from_bytes(present, "little") * 0xFF):
        return None                 # COPIED without an offset: not data (or data file's 0)
    cleared = bytearray(raw)
    cleared[7::8] = bytes(n)
    return array("Q", cleared), present


def _plain_bytes(words: array, cluster_bits: int, low: bytes) -> bytes | None:
    """The entries' bytes (little-endian) if no entry has the compressed or
    a reserved bit, an unaligned host offset or a low byte outside ``low``;
    else None (and always on a big-endian machine). Tested with
    bytes.translate on the flag, low and alignment bytes of all entries."""
    if not _NATIVE_LE:
        return None
    raw = words.tobytes()
    if raw[7::8].translate(None, b"\x00\x80") or raw[0::8].translate(None, low):
        return None
    below = (1 << (cluster_bits - 8)) - 1      # reserved bit 8 and the alignment bits
    zeros = bytes(len(words))
    if raw[1::8].translate(_masked(below & 0xFF)) != zeros:
        return None
    if below >> 8 and raw[2::8].translate(_masked(below >> 8)) != zeros:
        return None
    return raw


def _index_bytes(raw: bytes, cluster_bits: int) -> bytes | bytearray:
    """Each plain entry's host cluster index, as little-endian 8-byte words.

    The bytes of bits cluster_bits..55 moved down, shifted as one big
    integer for cluster sizes that are not whole bytes (the alignment bits
    that cross into the next entry down are zero).
    """
    shift = cluster_bits // 8
    moved = bytearray(len(raw))
    for j in range(7 - shift):
        moved[j::8] = raw[j + shift::8]
    if cluster_bits % 8:
        return (int.from_bytes(moved, "little") >> (cluster_bits % 8)).to_bytes(len(raw),
                                                                                  "little")
    return moved


def contiguous_pairs(values: array, step: int) -> int:
    """How many of ``values`` (after the first) are the one before plus ``step``.

    Each value plus ``step`` is compared with the next as 8-byte fields of
    two big integers (XOR: a zero field is a match, found by OR-ing each
    field's bytes into one); values stay below 2**56 (host offsets, cluster
    indices), so the addition never carries into the next field.
    """
    n = len(values) - 1
    if n <= 0:
        return 0
    order = "little" if _NATIVE_LE else "big"
    whole = int.from_bytes(values.tobytes(), order)
    # the fields without the last one and without the first (one conversion)
    high, low = whole >> 64, whole & ((1 << (64 * n)) - 1)
    before, after = (low, high) if _NATIVE_LE else (high, low)
    diff = after ^ (before + int.from_bytes(step.to_bytes(8, order) * n, order))
    fields = diff.to_bytes(8 * n, order)
    folded = 0                       # byte i is 0 where field i is 0
    for lane in range(8):
        folded |= int.from_bytes(fields[lane::8], "little")
    return folded.to_bytes(n, "little").count(0)


def with_copied(words: array, indices: array, copied: bool) -> array:
    """A plain table (see :func:`plain_entries`) with QCOW_OFLAG_COPIED set,
    or cleared, on every entry that has a host cluster; the others as they
    were. The flag bytes are merged as one big integer."""
    from array import array
    raw = bytearray(words.tobytes())
    n = len(words)
    has = bytes(map(bool, indices)).translate(_ONE_TO_FF)      # 0xFF per entry to change
    mask = int.from_bytes(has, "little")
    flags = int.from_bytes(raw[7::8], "little") & ~mask
    if copied:
        flags |= mask & int.from_bytes(b"\x80" * n, "little")
    raw[7::8] = flags.to_bytes(n, "little")
    return array("Q", raw)


_MASKED: dict[int, bytes] = {}
_ONE_TO_FF = bytes([0, 0xFF]) + bytes(254)
_ZERO_TO_FF = bytes([0xFF]) + bytes(255)
_NONZERO = bytes([0]) + bytes([1]) * 255


def _masked(mask: int) -> bytes:
    """The bytes.translate table byte -> byte & mask (made when first used)."""
    table = _MASKED.get(mask)
    if table is None:
        table = _MASKED[mask] = bytes(b & mask for b in range(256))
    return table


class L2Table:
    __slots__ = ("offset", "values", "dirty")

    def __init__(self, offset: int, values: array, dirty: bool = False) -> None:
        self.offset = offset
        self.values = values
        self.dirty = dirty


class L2Cache:
    """L2 tables by host offset; clean ones are evicted beyond ``max_tables``."""

    def __init__(self, file: HostFile, layout: Layout, max_bytes: int = 64 << 20) -> None:
        self.file = file
        self.layout = layout
        self.words = layout.l2_entries * layout.l2_entry_words
        self.max_tables = max(16, max_bytes // layout.cluster_size)
        #: insertion order is recency order (a hit moves a table to the end)
        self.tables: dict[int, L2Table] = {}
        self.file_length = file.length()

    def get(self, offset: int) -> L2Table:
        table = self.tables.pop(offset, None)
        if table is not None:
            self.tables[offset] = table
            return table
        if offset % self.layout.cluster_size:
            raise CorruptImageError(f"L2 table offset {offset:#x} unaligned")
        table = L2Table(offset, read_be64_array(self.file, offset, self.words))
        self._insert(table)
        return table

    def new(self, offset: int, values: array | None = None) -> L2Table:
        """A table that exists only in memory so far (dirty)."""
        from array import array
        if values is None:
            values = array("Q", bytes(8 * self.words))
        table = L2Table(offset, values, dirty=True)
        self._insert(table)
        return table

    def _insert(self, table: L2Table) -> None:
        self.tables[table.offset] = table
        if len(self.tables) > self.max_tables:
            for off in list(self.tables):
                if len(self.tables) <= self.max_tables:
                    break
                if not self.tables[off].dirty:
                    del self.tables[off]

    def forget(self, offset: int) -> None:
        self.tables.pop(offset, None)

    @property
    def dirty_count(self) -> int:
        return sum(1 for t in self.tables.values() if t.dirty)

    def write_dirty(self) -> None:
        for table in sorted(self.tables.values(), key=lambda t: t.offset):
            if table.dirty:
                self.file.pwrite(table.offset, be64_bytes(table.values))
                table.dirty = False


class L1Table:
    """The active L1 table (all of it in memory; QEMU caps it at 32 MiB).

    Read when the image opens (as QEMU does: a table that cannot be read
    fails the open), decoded into ``values`` when first used.
    """

    def __init__(self, file: HostFile, offset: int, size: int) -> None:
        self.file = file
        self.offset = offset
        self._raw: bytes | None = file.pread_full(offset, 8 * size) if size else b""
        self._values: array | None = None
        self.dirty: set[int] = set()

    @property
    def values(self) -> array:
        if self._values is None:
            self._values, self._raw = be64_array(self._raw), None
        return self._values

    def __len__(self) -> int:
        return len(self._raw) // 8 if self._values is None else len(self._values)

    def set(self, index: int, value: int) -> None:
        self.values[index] = value
        self.dirty.add(index)

    def write_dirty(self) -> None:
        from array import array
        if not self.dirty:
            return
        indices = sorted(self.dirty)
        run_start = prev = indices[0]
        for i in indices[1:] + [None]:
            if i is not None and i == prev + 1:
                prev = i
                continue
            chunk = array("Q", self.values[run_start:prev + 1])
            self.file.pwrite(self.offset + 8 * run_start, be64_bytes(chunk))
            if i is not None:
                run_start = prev = i
        self.dirty.clear()
