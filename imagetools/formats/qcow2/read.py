"""The qcow2 read side: the cluster map as runs, reads, block status.

Reading walks the L1/L2 tables in *runs*: consecutive (sub)clusters of the
same type whose host offsets follow each other are one run, so contiguous
data is one pread and block status is one extent per run. Unallocated runs
read from (and report the status of) the backing file; compressed clusters
are decompressed one at a time (the last one is cached). Metadata that
cannot be right (unaligned L2 or data offsets) is signalled as QEMU does.

:class:`Qcow2Reader` is a mixin of :class:`~.driver.Qcow2Driver`.
"""

from __future__ import annotations

import os
from itertools import compress, repeat

from imagetools.errors import CorruptImageError, ImageError, ImageIOError, UnsupportedError, c_hex
from imagetools.formats.base import Extent, MapStatus
from imagetools.formats.hostfile import HostFile
from imagetools.formats.qcow2 import header as hdr
from imagetools.formats.qcow2.tables import contiguous_pairs, data_hosts
from imagetools.formats.qcow2.layout import (
    COMPRESSED, INVALID, L1E_OFFSET_MASK, L2E_OFFSET_MASK, NORMAL, QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_ZERO, UNALLOCATED_ALLOC, UNALLOCATED_PLAIN, ZERO_ALLOC, ZERO_PLAIN)

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from typing import Iterator

#: run types that read from the backing file
_UNALLOCATED = (UNALLOCATED_PLAIN, UNALLOCATED_ALLOC)
#: L2 entry bits that make an entry with a host offset something else than data
_NOT_PLAIN_DATA = QCOW_OFLAG_COMPRESSED | QCOW_OFLAG_ZERO
_NONE_IF_0 = {0: None}
_FLIP = bytes([1, 0]) + bytes(254)
#: where the chain ends: reads as zeros, nothing allocated
_ZEROS_AT_END = MapStatus.of(0, False, True, False)
#: most clusters in one slice of :meth:`Qcow2Reader._slices`
_SLICE_CLUSTERS = 4096


class Run:
    """A guest range ``[start, start+length)`` of one (sub)cluster type.

    ``host`` is the host offset of ``start`` for NORMAL / ZERO_ALLOC /
    UNALLOCATED_ALLOC runs; ``entry`` is the L2 entry for COMPRESSED runs
    (one cluster each).
    """

    __slots__ = ("start", "length", "type", "host", "entry")

    def __init__(self, start: int, length: int, type_: int, host: int | None,
                 entry: int = 0) -> None:
        self.start = start
        self.length = length
        self.type = type_
        self.host = host
        self.entry = entry

    def __repr__(self) -> str:
        return f"Run({self.start:#x}+{self.length:#x} type={self.type} host={self.host})"


class Qcow2Reader:
    """Mixin of :class:`Qcow2Driver`: everything that only reads the image."""

    # -- the cluster map -----------------------------------------------------

    def _l2_values(self, l1_index: int):
        """The L2 table's values for ``l1_index``, or None if unallocated."""
        if l1_index >= len(self.l1):
            return None
        entry = self.l1.values[l1_index]
        offset = entry & L1E_OFFSET_MASK
        if not offset:
            return None
        if offset % self._cluster_size:
            self.signal_corruption(f"L2 table offset {offset:#x} unaligned "
                                   f"(L1 index: {c_hex(l1_index)})",
                                   at=l1_index * self.layout.l2_coverage)
        return self.l2_cache.get(offset).values

    def runs(self, offset: int, length: int) -> Iterator[Run]:
        """The mapping of guest ``[offset, offset+length)`` as merged runs."""
        for start, n, type_, host, entry in self._merged(offset, length):
            yield Run(start, n, type_, host, entry)

    def _merged(self, offset: int, length: int) -> Iterator[tuple]:
        """(start, length, type, host, entry) runs, merged across L2 tables.

        Metadata that cannot be right fails the run it is met in, after the
        runs before it (as QEMU, which meets it when a request starts there).
        """
        p_start = p_len = p_type = p_host = p_entry = None
        for pos, stop in self._slices(offset, length):
            pieces: list[tuple] = []
            failure = None
            try:
                values = self._l2_values(pos // self.layout.l2_coverage)
                if values is None:
                    pieces.append((pos, stop - pos, UNALLOCATED_PLAIN, None, 0))
                else:
                    self._l2_pieces(values, pos, stop, pieces)
            except ImageError as err:
                failure = err
            for start, n, type_, host, entry in pieces:
                if p_type == type_ and type_ != COMPRESSED and p_start + p_len == start and \
                        (host is None if p_host is None else
                         host is not None and p_host + p_len == host):
                    p_len += n
                    continue
                if p_type is not None:
                    yield (p_start, p_len, p_type, p_host, p_entry)
                p_start, p_len, p_type, p_host, p_entry = start, n, type_, host, entry
            if failure is not None:
                if p_type is not None:
                    yield (p_start, p_len, p_type, p_host, p_entry)
                raise failure
        if p_type is not None:
            yield (p_start, p_len, p_type, p_host, p_entry)

    def _slices(self, offset: int, length: int) -> Iterator[tuple[int, int]]:
        """``[offset, offset+length)`` as (start, end) slices inside one L2 table each.

        A slice covers at most _SLICE_CLUSTERS clusters, so that the pieces
        of a table of tiny clusters come in bounded batches.
        """
        end = offset + length
        cov = self.layout.l2_coverage
        most = _SLICE_CLUSTERS << self.cluster_bits
        pos = offset
        while pos < end:
            stop = min(end, (pos // cov + 1) * cov, pos + most)
            yield pos, stop
            pos = stop

    def _l2_pieces(self, values, pos: int, end: int, out: list[tuple]) -> None:
        """Append the (start, length, type, host, entry) pieces of one L2 slice to ``out``.

        Consecutive clusters whose entries differ only by a contiguous host
        offset (or are equal zero entries) come as one piece. An entry that
        cannot be right raises with the pieces before it in ``out``.
        """
        layout = self.layout
        cs = self._cluster_size
        cbits = self.cluster_bits
        append = out.append
        if layout.extended_l2:
            mask = layout.l2_entries - 1
            ci, last = pos >> cbits, (end - 1) >> cbits
            while ci <= last:
                idx = ci & mask
                cstart = ci << cbits
                self._subcluster_pieces(values[2 * idx], values[2 * idx + 1], cstart,
                                        max(pos, cstart), min(end, cstart + cs), append)
                ci += 1
            return
        mask = layout.l2_entries - 1
        ci = pos >> cbits
        table_base = (ci & ~mask) << cbits
        idx = ci & mask
        lim = ((end - 1) >> cbits) & mask
        cluster_type = layout.cluster_type
        unaligned = (cs - 1) & L2E_OFFSET_MASK
        s = pos
        while idx <= lim:
            entry = values[idx]
            j = idx + 1
            host = None
            if not entry:
                while j <= lim and not values[j]:
                    j += 1
                type_ = UNALLOCATED_PLAIN
            else:
                if entry & _NOT_PLAIN_DATA or not entry & L2E_OFFSET_MASK:
                    type_ = cluster_type(entry)
                else:
                    type_ = NORMAL
                if type_ == NORMAL or type_ == ZERO_ALLOC:
                    if entry & unaligned:
                        self._unaligned_cluster(entry, values, idx,
                                                at=table_base + (idx << cbits))
                    expect = entry + cs
                    while j <= lim and values[j] == expect:
                        expect += cs
                        j += 1
                    host = (entry & L2E_OFFSET_MASK) + (s - table_base - (idx << cbits))
                elif type_ != COMPRESSED:
                    while j <= lim and values[j] == entry:
                        j += 1
            stop = table_base + (j << cbits)
            if stop > end:
                stop = end
            append((s, stop - s, type_, host, entry))
            s = stop
            idx = j

    def _unaligned_cluster(self, entry: int, values, idx: int, *, at: int) -> None:
        table = next((t.offset for t in self.l2_cache.tables.values() if t.values is values), 0)
        self.signal_corruption(f"Cluster allocation offset {entry & L2E_OFFSET_MASK:#x} "
                               f"unaligned (L2 offset: {c_hex(table)}, L2 index: "
                               f"{c_hex(idx)})", at=at)

    def signal_corruption(self, message: str, *, fatal: bool = True,
                          at: int | None = None) -> None:
        """Report metadata corruption as QEMU does and fail the request with EIO.

        On a writable image a fatal corruption sets the corrupt bit (so that
        nothing writes into it again until it is repaired); otherwise it is
        only reported. Either way the first report of a session is printed
        (through imagetools.image.warn) and later ones are not. ``at``: the
        guest offset the corrupt entry maps, kept in the error.
        """
        import errno
        from imagetools.image import warn
        fatal = fatal and not self.read_only
        if not self._corruption_reported or (fatal and not self.corrupt):
            self._corruption_reported = True
            if fatal:
                warn(f"qcow2: Marking image as corrupt: {message}; further corruption events "
                     "will be suppressed")
                self._set_incompat(hdr.INCOMPAT_CORRUPT, True)
            else:
                warn(f"qcow2: Image is corrupt: {message}; further non-fatal corruption events "
                     "will be suppressed")
        raise ImageIOError("Input/output error", errno.EIO, offset=at)

    def _subcluster_pieces(self, entry: int, bitmap: int, cstart: int, s: int, e: int,
                           append) -> None:
        layout = self.layout
        if layout.cluster_type(entry) == COMPRESSED:
            append((s, e - s, COMPRESSED, None, entry))
            return
        if entry & (self._cluster_size - 1) & L2E_OFFSET_MASK:
            self.signal_corruption(f"Cluster allocation offset {entry & L2E_OFFSET_MASK:#x} "
                                   "unaligned", at=s)
        sbits = layout.subcluster_bits
        host_base = entry & L2E_OFFSET_MASK
        sc = (s - cstart) >> sbits
        last_sc = (e - 1 - cstart) >> sbits
        while sc <= last_sc:
            type_ = layout.subcluster_type(entry, bitmap, sc)
            if type_ == INVALID:
                raise CorruptImageError(f"Invalid subcluster allocation bitmap "
                                        f"{bitmap:#x} for the cluster at guest {cstart:#x}")
            # extend over following subclusters of the same type
            j = sc + 1
            while j <= last_sc and layout.subcluster_type(entry, bitmap, j) == type_:
                j += 1
            ps = max(s, cstart + (sc << sbits))
            pe = min(e, cstart + (j << sbits))
            host = host_base + (ps - cstart) if type_ in (NORMAL, ZERO_ALLOC,
                                                          UNALLOCATED_ALLOC) else None
            append((ps, pe - ps, type_, host, entry))
            sc = j

    # -- reading -----------------------------------------------------------

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise ImageIOError(f"Request out of range: offset {offset} length {length} "
                               f"(image size {self._size})")

    def _check_crypto(self) -> None:
        if self.encrypted:
            raise UnsupportedError("Encrypted qcow2 images are not supported by qimg yet")

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.read_into(offset, buf)
        return bytes(buf)

    def read_into(self, offset: int, buf) -> None:
        view = memoryview(buf).cast("B")
        length = len(view)
        self._check_range(offset, length)
        if length == 0:
            return
        self._check_crypto()
        data = self.data_file or self.file
        for run in self.runs(offset, length):
            lo = run.start - offset
            part = view[lo:lo + run.length]
            if run.type == NORMAL:
                data.preadinto(run.host, part)
            elif run.type in _UNALLOCATED:
                self._read_backing(run.start, part)
            elif run.type == COMPRESSED:
                cstart = run.start & ~(self._cluster_size - 1)
                cluster = self._decompress(run.entry, cstart)
                part[:] = cluster[run.start - cstart:run.start - cstart + run.length]
            else:
                part[:] = bytes(run.length)

    def read_to_fd(self, offset: int, length: int, dst_fd: int, dst_offset: int) -> None:
        """Guest bytes to ``dst_fd``; data clusters move with copy_file_range."""
        self._check_range(offset, length)
        if not length:
            return
        self._check_crypto()
        data = self.data_file or self.file
        for run in self.runs(offset, length):
            at = dst_offset + (run.start - offset)
            if run.type == NORMAL:
                data.copy_out(run.host, dst_fd, at, run.length)
            elif run.type in _UNALLOCATED and self.backing is not None:
                inside = max(0, min(run.length, self.backing.size - run.start))
                if inside:
                    self.backing.read_to_fd(run.start, inside, dst_fd, at)
                if inside < run.length:
                    _write_zeros_fd(dst_fd, at + inside, run.length - inside)
            elif run.type == COMPRESSED:
                buf = bytearray(run.length)
                self.read_into(run.start, buf)
                _pwrite_all(dst_fd, buf, at)
            else:
                _write_zeros_fd(dst_fd, at, run.length)

    def _read_backing(self, start: int, part: memoryview) -> None:
        n = len(part)
        backing = self.backing
        if backing is None:
            part[:] = bytes(n)
            return
        bsize = backing.size
        avail = max(0, min(n, bsize - start))
        if avail:
            backing.read_into(start, part[:avail])
        if avail < n:
            part[avail:] = bytes(n - avail)

    def _decompress(self, entry: int, cstart: int) -> bytes:
        cached = self._compressed_cache
        if cached is not None and cached[0] == entry:
            return cached[1]
        if self.data_file is not None:
            raise CorruptImageError("Compressed cluster in an image with an external data file")
        coffset, nbytes = self.layout.compressed_range(entry)
        raw = self.file.pread(coffset, nbytes)
        from imagetools.formats.qcow2.compression import decompress   # zlib: only when used
        data = decompress(self.header.compression_type, raw, self._cluster_size)
        self._compressed_cache = (entry, data)
        return data

    # -- block status --------------------------------------------------------

    def block_status(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        if length is None:
            length = self._size - offset
        self._check_range(offset, length)
        if length == 0:
            return
        data_name = self.data_file.filename if self.data_file is not None else self.filename
        data_file = self.data_file or self.file
        crypt = self.encrypted
        recurse = self._metadata_preallocated()
        for start, n, t, host, _ in self._merged(offset, length):
            if t == NORMAL:
                if recurse and not crypt:
                    yield from self._recurse_file(Run(start, n, t, host), data_file, data_name)
                else:
                    yield Extent(start, n, True, False, True, None if crypt else host, 0,
                                 data_name)
            elif t == COMPRESSED:
                yield Extent(start, n, True, False, True, None, 0, data_name, True)
            elif t == ZERO_PLAIN:
                yield Extent(start, n, True, True, False, None, 0, None)
            elif t == ZERO_ALLOC:
                yield Extent(start, n, True, True, False, None if crypt else host, 0, data_name)
            else:
                yield from self._backing_status(Run(start, n, t, host), data_name)

    def map_runs(self, offset: int, length: int) -> Iterator[list[tuple]]:
        """qemu-img map's items (see :meth:`Driver.map_runs`) straight from the L2 tables.

        One batch per slice of an L2 table, with no Extent in between: a
        fragmented image has one item per cluster and map prints one line
        each. Encrypted and metadata-preallocated images (whose data
        clusters need the file's holes) and extended L2 entries
        (subclusters) take the general way through :meth:`block_status`.
        """
        if self.layout.extended_l2 or self.encrypted or self._metadata_preallocated():
            yield from super().map_runs(offset, length)
            return
        self._check_range(offset, length)
        kinds = _MapKinds(self.data_file.filename if self.data_file is not None
                          else self.filename)
        cov = self.layout.l2_coverage
        for pos, stop in self._slices(offset, length):
            out: list[tuple] = []
            try:
                values = self._l2_values(pos // cov)
                if values is None:
                    self._map_unallocated(pos, stop - pos, out)
                else:
                    columns = self._map_slice(values, pos, stop, kinds, out)
                    if columns is not None:
                        yield columns
                        continue
            except Exception:
                if out:
                    yield out          # what came before the failure, then the failure
                raise
            yield out

    def _map_slice(self, values, pos: int, end: int, kinds: _MapKinds,
                   out: list[tuple]) -> ClusterItems | None:
        """Map's items for one slice of a standard L2 table, appended to ``out``.

        Data clusters (contiguous ones as one item) and unallocated runs
        are handled here, entry by entry, or a whole scattered slice at once
        (:meth:`_map_scattered`, which returns them as columns instead when
        there is no backing file); runs of any other entry (zero,
        compressed, unaligned, flags only) go through :meth:`_l2_pieces`.
        """
        cs = self._cluster_size
        cbits = self.cluster_bits
        mask = self.layout.l2_entries - 1
        ci = pos >> cbits
        base = (ci & ~mask) << cbits
        idx = ci & mask
        lim = ((end - 1) >> cbits) & mask
        if not (pos | end) & (cs - 1):
            found = data_hosts(values[idx:lim + 1], cbits)
            # scattered: data clusters, few of which follow each other
            data = 0 if found is None else found[1].count(1)
            if data and 4 * contiguous_pairs(found[0], cs) < data:
                return self._map_scattered(*found, pos, kinds, out)
        other = _NOT_PLAIN_DATA | ((cs - 1) & L2E_OFFSET_MASK)
        append = out.append
        data_status = kinds.data
        s = pos
        while idx <= lim:
            entry = values[idx]
            j = idx + 1
            if entry and not entry & other and entry & L2E_OFFSET_MASK:
                expect = entry + cs
                while j <= lim and values[j] == expect:
                    expect += cs
                    j += 1
                stop = base + (j << cbits)
                if stop > end:
                    stop = end
                append((s, stop - s, data_status,
                        (entry & L2E_OFFSET_MASK) + (s - base - (idx << cbits))))
            elif not entry:
                while j <= lim and not values[j]:
                    j += 1
                stop = base + (j << cbits)
                if stop > end:
                    stop = end
                self._map_unallocated(s, stop - s, out)
            else:
                while j <= lim and values[j] and (values[j] & other
                                                  or not values[j] & L2E_OFFSET_MASK):
                    j += 1
                stop = base + (j << cbits)
                if stop > end:
                    stop = end
                pieces: list[tuple] = []
                try:
                    self._l2_pieces(values, s, stop, pieces)
                except ImageError:
                    self._map_pieces(pieces, kinds, out)     # the items before the bad entry
                    raise
                self._map_pieces(pieces, kinds, out)
            s = stop
            idx = j
        return None

    def _map_scattered(self, hosts, present: bytes, pos: int, kinds: _MapKinds,
                       out: list[tuple]) -> ClusterItems | None:
        """Map's items for whole clusters from ``pos`` whose data is scattered.

        ``hosts`` and ``present``: each cluster's host offset and whether it
        has data (see :func:`~.tables.data_hosts`). Every cluster is an item
        of its own (the caller merges the few that follow each other).
        Without a backing file they are returned as columns
        (:class:`ClusterItems`); with one, they are made by zip at C speed
        and the unallocated runs between them are looked up one run at a time.
        """
        if self.backing is None:
            return ClusterItems(pos, self._cluster_size, hosts, kinds.data, _ZEROS_AT_END)
        cs = self._cluster_size
        n = len(hosts)
        starts = range(pos, pos + n * cs, cs)
        items = list(zip(starts, repeat(cs), repeat(kinds.data), hosts))
        done = 0                       # items before this are in out
        first = last = -2              # the unallocated run being gathered: [first, last]
        for i in compress(range(n), present.translate(_FLIP)):
            if i == last + 1:
                last = i
                continue
            if first >= 0:
                out += items[done:first]
                self._map_unallocated(pos + first * cs, (last + 1 - first) * cs, out)
                done = last + 1
            first = last = i
        if first >= 0:
            out += items[done:first]
            self._map_unallocated(pos + first * cs, (last + 1 - first) * cs, out)
            done = last + 1
        out += items[done:]
        return None

    def _map_pieces(self, pieces: list[tuple], kinds: _MapKinds, out: list[tuple]) -> None:
        """Map's items for (start, length, type, host, entry) pieces (see _l2_pieces)."""
        append = out.append
        for start, n, type_, host, _ in pieces:
            if type_ == NORMAL:
                append((start, n, kinds.data, host))
            elif type_ == UNALLOCATED_PLAIN:
                self._map_unallocated(start, n, out)
            elif type_ == ZERO_PLAIN:
                append((start, n, kinds.zero_plain, None))
            elif type_ == ZERO_ALLOC:
                append((start, n, kinds.zero_alloc, host))
            else:                                   # COMPRESSED
                append((start, n, kinds.compressed, None))

    def _map_unallocated(self, start: int, length: int, out: list[tuple]) -> None:
        """:meth:`_backing_status` in map's items (a run with no host cluster)."""
        backing = self.backing
        inside = max(0, min(length, backing.size - start)) if backing is not None else 0
        if inside:
            for batch in backing.map_runs(start, inside):
                out += [(s, n, status.deeper(), o) for s, n, status, o in batch]
        if inside < length:
            out.append((start + inside, length - inside, _ZEROS_AT_END, None))

    def _backing_status(self, run: Run, data_name: str) -> Iterator[Extent]:
        """Status of a run this image does not allocate (as qemu-img map sees it).

        Where the backing file does not reach (or there is none) the run
        reads as zeros and stays at this depth; an unallocated subcluster of
        an allocated cluster still shows its host offset there, as QEMU's.
        """
        start, length = run.start, run.length
        host = None if self.encrypted else run.host
        backing = self.backing
        bsize = backing.size if backing is not None else 0
        inside = max(0, min(length, bsize - start))
        if inside:
            for ext in backing.block_status(start, inside):
                yield ext.deeper()
        if inside < length:
            off = None if host is None else host + inside
            yield Extent(start + inside, length - inside, False, True, False, off, 0,
                         None if off is None else data_name)

    def _recurse_file(self, run: Run, data_file: HostFile, name: str) -> Iterator[Extent]:
        """Metadata-preallocated images: data clusters that are holes read as zeros."""
        flen = data_file.length()
        pos, end, host = run.start, run.start + run.length, run.host
        while pos < end:
            h = host + (pos - run.start)
            if h >= flen:
                yield Extent(pos, end - pos, True, True, True, h, 0, name)
                return
            for hs, n, is_data in data_file.data_runs(h, min(flen, h + (end - pos))):
                gs = run.start + (hs - host)
                yield Extent(gs, n, True, not is_data, True, hs, 0, name)
            pos = run.start + (min(flen, h + (end - pos)) - host)

    def _metadata_preallocated(self) -> bool:
        """QEMU's heuristic: far more clusters in use than the file really holds."""
        if self._prealloc_detected is None:
            file = self.file
            real_clusters = file.allocated() // self._cluster_size
            threshold = max(real_clusters * 10 // 9, real_clusters + 2)
            end_cluster = -(-file.length() // self._cluster_size)
            if end_cluster < threshold:
                # fewer clusters in the file than the threshold: cannot be
                self._prealloc_detected = False
                return False
            count = 0
            entries = self.layout.refblock_entries
            index = 0
            while index * entries < end_cluster and count < threshold:
                blk = self.refcounts._load(index)
                if blk is not None:
                    vals = blk.values[:end_cluster - index * entries]
                    count += len(vals) - vals.count(0)
                index += 1
            self._prealloc_detected = count >= threshold
        return self._prealloc_detected


class ClusterItems:
    """A batch of map's items (see :meth:`Driver.map_runs`) as columns: one
    item per whole cluster from ``start``.

    ``hosts`` holds each cluster's host offset, 0 for one without data
    (whose status is ``hole`` and offset None; the others' is ``data``).
    Iterating gives the items as tuples; ``ops.map`` reads the columns
    instead, as a fragmented image has an item per cluster.
    """

    __slots__ = ("start", "cluster_size", "hosts", "data", "hole")

    def __init__(self, start: int, cluster_size: int, hosts, data: MapStatus,
                 hole: MapStatus) -> None:
        self.start = start
        self.cluster_size = cluster_size
        self.hosts = hosts
        self.data = data
        self.hole = hole

    def __len__(self) -> int:
        return len(self.hosts)

    def __iter__(self) -> Iterator[tuple]:
        cs = self.cluster_size
        hosts = self.hosts
        return zip(range(self.start, self.start + len(hosts) * cs, cs), repeat(cs),
                   map((self.hole, self.data).__getitem__, map(bool, hosts)),
                   map(_NONE_IF_0.get, hosts, hosts))


class _MapKinds:
    """The map statuses of one image's clusters (see :meth:`Qcow2Reader.map_runs`)."""

    __slots__ = ("data", "zero_plain", "zero_alloc", "compressed")

    def __init__(self, data_name: str) -> None:
        self.data = MapStatus.of(0, True, False, True, data_name)
        self.zero_plain = MapStatus.of(0, True, True, False)
        self.zero_alloc = MapStatus.of(0, True, True, False, data_name)
        self.compressed = MapStatus.of(0, True, False, True)


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    done = 0
    try:
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)
    except OSError as err:
        raise ImageIOError(f"Could not write: {err.strerror}", err.errno) from None


def _write_zeros_fd(fd: int, offset: int, length: int) -> None:
    zeros = bytes(min(length, 1 << 20))
    pos = 0
    while pos < length:
        n = min(len(zeros), length - pos)
        _pwrite_all(fd, memoryview(zeros)[:n], offset + pos)
        pos += n

