"""Writes of the table-mapped formats: copy-on-write allocation of whole units.

:func:`cluster_write` groups the units a request touches into runs of
already-mapped units (written in place, one pwrite per contiguous host
range) and runs of units to allocate (copy-on-write from the backing file or
zeros, one pwrite of the guest data, then the table update the format asks
for). Metadata is committed once per request, after the data, so a crash
leaves at worst a leaked unit. A format plugs in through :class:`ClusterMap`.
"""

from __future__ import annotations

from typing import Any

class ClusterMap:
    """What :func:`cluster_write` needs from a format (one extent of it).

    ``unit``                    allocation unit in bytes
    ``file``                    the HostFile the data goes to
    ``lookup(index)``           host offset of unit ``index`` or None when it
                                must be allocated; may raise for units that
                                cannot be written in place
    ``cow_zero(index)``         True if the untouched part of a new unit must
                                read as zeros (zero cluster/grain), not come
                                from the backing file
    ``allocate(index, count)``  host offset for ``count`` new contiguous units
                                (the file may be extended by the caller)
    ``map_units(index, count, host)``  record the new mapping (in memory;
                                ``commit`` writes it)
    ``commit()``                write the changed metadata
    ``fill_backing(guest_offset, view)``  backing bytes for copy-on-write
    ``base``                    guest offset of unit 0 (vmdk extents)
    """

    unit = 0
    base = 0
    file: Any = None
    #: most units one ``allocate`` call may cover (None: no limit); 1 for
    #: formats whose units are not contiguous on the host (vpc bitmaps)
    max_batch: int | None = None

    def lookup(self, index: int) -> int | None:
        raise NotImplementedError

    def cow_zero(self, index: int) -> bool:
        return False

    def allocate(self, index: int, count: int) -> int:
        raise NotImplementedError

    def map_units(self, index: int, count: int, host: int) -> None:
        raise NotImplementedError

    def commit(self) -> None:
        pass

    def fill_backing(self, guest_offset: int, view: memoryview) -> None:
        view[:] = bytes(len(view))


#: most units allocated in one go (bounds the copy-on-write buffer)
MAX_BATCH_BYTES = 32 << 20


def cluster_write(cmap: ClusterMap, offset: int, view: memoryview) -> None:
    """Write guest bytes ``view`` at ``offset`` (relative to ``cmap.base``).

    Units already mapped are written in place; unmapped ones are allocated in
    contiguous batches and written whole (head and tail from the backing
    file, or zeros), then mapped. Metadata is committed once at the end,
    after the data, so a crash leaves at worst a leaked unit.
    """
    unit = cmap.unit
    file = cmap.file
    end = offset + len(view)
    pos = offset
    try:
        while pos < end:
            index = pos // unit
            host = cmap.lookup(index)
            if host is not None:
                stop = min(end, (index + 1) * unit)
                host_pos = host + pos - index * unit
                # extend over following units stored right after this one
                while stop < end:
                    nxt = cmap.lookup(stop // unit)
                    if nxt is None or nxt != host_pos + (stop - pos):
                        break
                    stop = min(end, stop + unit)
                file.pwrite(host_pos, view[pos - offset:stop - offset])
                pos = stop
                continue
            count = 1
            max_units = max(1, MAX_BATCH_BYTES // unit)
            if cmap.max_batch is not None:
                max_units = min(max_units, cmap.max_batch)
            while (count < max_units and (index + count) * unit < end
                   and cmap.lookup(index + count) is None):
                count += 1
            _allocating_write(cmap, index, count, offset, view)
            pos = min(end, (index + count) * unit)
    finally:
        cmap.commit()


#: copy-on-write moves at most this much at a time (units can be huge)
COW_CHUNK = 4 << 20


def _allocating_write(cmap: ClusterMap, index: int, count: int, offset: int,
                      view: memoryview) -> None:
    unit = cmap.unit
    first = index * unit
    last = (index + count) * unit
    end = offset + len(view)
    lo = max(first, offset)
    hi = min(last, end)
    host = cmap.allocate(index, count)
    file = cmap.file
    fresh = host >= file.length()
    if fresh and host + (last - first) > file.length():
        file.truncate(host + (last - first))       # new units read as zeros
    if lo > first:
        _cow_range(cmap, index, first, host, lo - first, fresh)
    file.pwrite(host + (lo - first), view[lo - offset:hi - offset])
    if hi < last:
        _cow_range(cmap, (hi - 1) // unit, hi, host + (hi - first), last - hi, fresh)
    cmap.map_units(index, count, host)


def _cow_range(cmap: ClusterMap, index: int, guest: int, host: int, length: int,
               fresh: bool) -> None:
    """Fill the untouched part of new units from the copy-on-write source.

    Zeros need no write on a freshly grown file; anything else is copied in
    bounded chunks.
    """
    if cmap.cow_zero(index) and fresh:
        return
    done = 0
    while done < length:
        n = min(COW_CHUNK, length - done)
        buf = bytearray(n)
        if not cmap.cow_zero(index):
            cmap.fill_backing(cmap.base + guest + done, memoryview(buf))
        if not fresh or any(buf):
            cmap.file.pwrite(host + done, buf)
        done += n


def write_zeroes_plain(cmap: ClusterMap, offset: int, length: int, *,
                       has_backing: bool) -> None:
    """``write_zeroes`` for formats without a zero-cluster marker.

    Mapped units get zero data written in place. Unmapped units already
    read as zeros unless a backing file shows through them; only then are
    they allocated and written (as QEMU's generic fallback would).
    """
    zeros = memoryview(bytes(min(length, 1 << 20)))
    unit = cmap.unit
    pos, end = offset, offset + length
    try:
        while pos < end:
            index = pos // unit
            stop = min(end, (index + 1) * unit)
            host = cmap.lookup(index)
            if host is not None:
                hpos = host + pos - index * unit
                n = stop - pos
                while n:
                    k = min(n, len(zeros))
                    cmap.file.pwrite(hpos, zeros[:k])
                    hpos += k
                    n -= k
            elif has_backing:
                while pos < stop:
                    k = min(stop - pos, len(zeros))
                    cluster_write(cmap, pos, zeros[:k])
                    pos += k
            pos = stop
    finally:
        cmap.commit()
