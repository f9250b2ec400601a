"""Which unexpected argument qemu-ga names first.

When a request carries several arguments the command does not take,
qemu-ga reports one of them: the first left in the GLib hash table its
input visitor filled with the argument names (in QDict order) and emptied
of the names it consumed.  That is GLib 2.74's open-addressing table, whose
iteration order this module reproduces, growth and shrinking included.
"""

from __future__ import annotations

_MIN_SHIFT = 3
_PRIME_MOD = [1, 2, 3, 7, 13, 31, 61, 127, 251, 509, 1021, 2039, 4093, 8191,
              16381, 32749, 65521, 131071, 262139, 524287, 1048573, 2097143,
              4194301, 8388593, 16777213, 33554393, 67108859, 134217689,
              268435399, 536870909, 1073741789, 2147483647]
_UNUSED, _TOMBSTONE = 0, 1


def str_hash(key: bytes) -> int:
    """g_str_hash: djb2 over *signed* chars, 32-bit."""
    h = 5381
    for byte in key:
        if byte >= 0x80:
            byte -= 0x100
        h = (h * 33 + byte) & 0xFFFFFFFF
    return h


class GHashTable:
    """Just enough of GHashTable (string keys, insert/remove/iterate)."""

    def __init__(self) -> None:
        self._set_shift(_MIN_SHIFT)
        self.hashes = [_UNUSED] * self.size
        self.keys: list[bytes | None] = [None] * self.size
        self.nnodes = 0
        self.noccupied = 0

    def _set_shift(self, shift: int) -> None:
        self.size = 1 << shift
        self.mod = _PRIME_MOD[shift]
        self.mask = self.size - 1

    def _index(self, h: int) -> int:
        return (h * 11) % self.mod

    def _lookup(self, key: bytes) -> tuple[int, int]:
        """(slot of ``key`` or where to insert it, its hash)."""
        h = str_hash(key)
        if h <= 1:
            h = 2
        index = self._index(h)
        step = 0
        tombstone = -1
        while self.hashes[index] != _UNUSED:
            if self.hashes[index] == h and self.keys[index] == key:
                return index, h
            if self.hashes[index] == _TOMBSTONE and tombstone < 0:
                tombstone = index
            step += 1
            index = (index + step) & self.mask
        return (tombstone if tombstone >= 0 else index), h

    def insert(self, key: bytes) -> None:
        index, h = self._lookup(key)
        old = self.hashes[index]
        if old > _TOMBSTONE:
            return
        self.hashes[index] = h
        self.keys[index] = key
        self.nnodes += 1
        if old == _UNUSED:
            self.noccupied += 1
            self._maybe_resize()

    def remove(self, key: bytes) -> None:
        index, _ = self._lookup(key)
        if self.hashes[index] <= _TOMBSTONE:
            return
        self.hashes[index] = _TOMBSTONE
        self.keys[index] = None
        self.nnodes -= 1
        self._maybe_resize()

    def _maybe_resize(self) -> None:
        if (self.size > self.nnodes * 4 and self.size > 1 << _MIN_SHIFT) or \
                self.size <= self.noccupied + self.noccupied // 16:
            self._resize()

    def _resize(self) -> None:
        old_size = self.size
        wanted = int(self.nnodes * 1.333)
        shift = 0
        while wanted:
            wanted >>= 1
            shift += 1
        self._set_shift(max(shift, _MIN_SHIFT))
        if self.size > old_size:
            self.hashes += [_UNUSED] * (self.size - old_size)
            self.keys += [None] * (self.size - old_size)
        moved = [False] * max(self.size, old_size)
        # relocate in place, evicting whatever sits at the target slot
        for i in range(old_size):
            node_hash = self.hashes[i]
            if node_hash <= _TOMBSTONE:
                self.hashes[i] = _UNUSED
                continue
            if moved[i]:
                continue
            self.hashes[i] = _UNUSED
            key = self.keys[i]
            self.keys[i] = None
            while True:
                index = self._index(node_hash)
                step = 0
                while moved[index]:
                    step += 1
                    index = (index + step) & self.mask
                moved[index] = True
                replaced_hash = self.hashes[index]
                replaced_key = self.keys[index]
                self.hashes[index] = node_hash
                self.keys[index] = key
                if replaced_hash <= _TOMBSTONE:
                    break
                node_hash, key = replaced_hash, replaced_key
        if self.size < old_size:
            del self.hashes[self.size:]
            del self.keys[self.size:]
        self.noccupied = self.nnodes

    def __iter__(self):
        for h, key in zip(self.hashes, self.keys):
            if h > _TOMBSTONE:
                yield key


def first_unconsumed(all_keys: list[bytes], consumed: list[bytes]) -> bytes | None:
    """The key qemu-ga reports as unexpected, or None if all were consumed."""
    table = GHashTable()
    for key in all_keys:
        table.insert(key)
    for key in consumed:
        table.remove(key)
    return next(iter(table), None)
