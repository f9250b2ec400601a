"""The qcow2 write path: writes, zero writes, discards, compressed clusters.

A write is handled one L2 table at a time. For each cluster it decides
whether the data can go to the cluster's current host place (a COPIED
cluster: refcount 1, not shared with a snapshot) or needs a new host
cluster; new clusters for consecutive guest clusters are allocated as one
contiguous run, and everything is written with as few pwritev calls as the
host layout allows. Parts of a new (sub)cluster the write does not cover
are filled with the current guest content (copy-on-write from the old
cluster, the backing file, or zeros).

Only data is written to disk here. The L2 entries, refcounts and frees are
changed in memory and reach the disk in :meth:`Qcow2Driver.writeback`'s
order, which the driver runs when its caches fill up, on flush and on close.

Zero writes and discards follow QEMU 7.2's rules (zero flag on v3, a
discard for v2 images without a backing file, subcluster zero bits with
extended L2; partial clusters that already read as zeros become zero
clusters, other partial ranges get explicit zeros), so that qimg leaves the
same map as qemu-io would for the same operations.
"""

from __future__ import annotations

import errno

from imagetools.errors import ImageError, ImageIOError
from imagetools.formats.qcow2.driver import Qcow2Driver
from imagetools.formats.qcow2.layout import (
    BITMAP_ALL_ZERO, COMPRESSED, L1E_OFFSET_MASK, L2E_OFFSET_MASK, NORMAL, QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO, UNALLOCATED_ALLOC, UNALLOCATED_PLAIN, ZERO_ALLOC, ZERO_PLAIN)

_IOV_MAX = 1024


class FdSlice:
    """``length`` bytes of file descriptor ``fd`` at ``offset`` (copied in the kernel)."""

    __slots__ = ("fd", "offset", "length")

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self.fd = fd
        self.offset = offset
        self.length = length

    def __len__(self) -> int:
        return self.length


class _ViewSource:
    """Guest bytes ``[base, base+len(view))`` from a buffer."""

    def __init__(self, view: memoryview, base: int) -> None:
        self.view = view
        self.base = base

    def part(self, start: int, end: int):
        return self.view[start - self.base:end - self.base]


class _FdSource:
    """Guest bytes from a file descriptor (guest ``base`` is at ``fd_offset``)."""

    def __init__(self, fd: int, fd_offset: int, base: int) -> None:
        self.fd = fd
        self.fd_offset = fd_offset
        self.base = base

    def part(self, start: int, end: int) -> FdSlice:
        return FdSlice(self.fd, self.fd_offset + start - self.base, end - start)


class Qcow2Writer(Qcow2Driver):
    """A qcow2 image opened for writing: everything that changes an image.

    :meth:`Qcow2Driver.open` returns this class for a writable open.
    """

    #: pass guest discards (and zero writes with unmap) down to the host
    #: file as QEMU does with discard=unmap: freed clusters become holes
    discard_passthrough = True

    def _init_writer(self) -> None:
        self._bitmaps_started = False
        self._bitmap_tracker = None
        self._free_byte_offset = 0
        self._meta_clusters: dict[int, str] | None = None
        #: refuse_uncounted_metadata passed (once per session)
        self._metadata_counted = False
        self.refcounts.on_metadata = self._note_metadata

    def _reload_metadata(self) -> None:
        super()._reload_metadata()
        self.refcounts.on_metadata = self._note_metadata
        self._meta_clusters = None
        self._free_byte_offset = 0

    # -- checks ----------------------------------------------------------

    def _writable(self, offset: int = 0, length: int = 0) -> None:
        """Refuse writes to read-only/corrupt/encrypted images; note the range
        for the enabled persistent bitmaps (marking them in use first)."""
        if self.read_only:
            raise ImageIOError("Image is read-only", errno.EACCES)
        if self.corrupt:
            raise ImageIOError("qcow2: Image is corrupt; cannot be written to", errno.EIO)
        self._check_crypto()
        if not self._metadata_counted:
            self.refuse_uncounted_metadata()
        if not self._bitmaps_started:
            self._bitmaps_started = True
            from imagetools.formats.qcow2.bitmaps import BitmapTracker
            self._bitmap_tracker = BitmapTracker.start(self)
        if self._bitmap_tracker is not None:
            self._bitmap_tracker.note(offset, length)

    # -- L2 tables for writing ---------------------------------------------

    def _l2_for_write(self, l1_index: int):
        """The L2 table for ``l1_index``, allocated or copied so that we own it."""
        if l1_index >= len(self.l1):
            raise ImageIOError("Write beyond the L1 table", errno.EIO)
        entry = self.l1.values[l1_index]
        offset = entry & L1E_OFFSET_MASK
        if offset and entry & QCOW_OFLAG_COPIED:
            return self.l2_cache.get(offset)
        old_values = self.l2_cache.get(offset).values if offset else None
        cs = self._cluster_size
        new_offset = self.refcounts.allocate(1) * cs
        self._note_metadata(new_offset)
        from array import array
        values = array("Q", old_values) if old_values is not None else None
        table = self.l2_cache.new(new_offset, values)
        self.l1.set(l1_index, new_offset | QCOW_OFLAG_COPIED)
        if offset:
            self.refcounts.defer_free(offset >> self.cluster_bits, 1)
        return table

    def _entry(self, values, idx: int) -> tuple[int, int]:
        if self.layout.extended_l2:
            return values[2 * idx], values[2 * idx + 1]
        return values[idx], 0

    def _set_entry(self, table, idx: int, entry: int, bitmap: int = 0) -> None:
        if self.layout.extended_l2:
            table.values[2 * idx] = entry
            table.values[2 * idx + 1] = bitmap
        else:
            table.values[idx] = entry
        table.dirty = True

    def _free_entry(self, entry: int, *, request: bool = False) -> None:
        """Queue the decrement of whatever host clusters ``entry`` references.

        ``request``: freed because the guest discarded or zeroed with unmap;
        with :attr:`discard_passthrough` the host space is punched out too.
        """
        discard = request and self.discard_passthrough
        if entry & (1 << 62):
            coffset, nbytes = self.layout.compressed_range(entry)
            start = coffset & ~511
            first = start >> self.cluster_bits
            last = (start + ((nbytes + (coffset & 511) + 511) & ~511) - 1) >> self.cluster_bits
            self.refcounts.defer_free(first, last - first + 1, discard=discard)
            return
        if self.data_file is not None:
            if discard and not self.data_file_raw:
                self.data_file.punch_hole(entry & L2E_OFFSET_MASK, self._cluster_size)
            return          # data-file clusters are not refcounted
        host = entry & L2E_OFFSET_MASK
        if host:
            self.refcounts.defer_free(host >> self.cluster_bits, 1, discard=discard)

    # -- metadata overlap protection -----------------------------------------

    def refuse_uncounted_metadata(self) -> None:
        """Before the first allocation of a session: every cluster the image's
        metadata occupies must be counted. A table reaching past the end of
        the file, or a refcount structure read as zeros there, would let the
        allocator hand out the header or a table for new data; QEMU stops
        such writes at its overlap check, qimg before anything is written
        (``check -r all`` repairs the image)."""
        from imagetools.formats.qcow2.overlap import metadata_clusters
        # built afresh: a map cached earlier in the session may be stale
        self._meta_clusters = meta = metadata_clusters(self)
        rc = self.refcounts
        for cluster, name in meta.items():
            if not rc.get(cluster):
                from imagetools.image import warn
                warn(f"qcow2: {name} at {cluster << self.cluster_bits:#x} is not counted by "
                     "the refcounts; repair the image with 'check -r all' first")
                raise ImageIOError("Input/output error", errno.EIO)
        self._metadata_counted = True

    def _note_metadata(self, offset: int, name: str = "active L2 table") -> None:
        if self._meta_clusters is not None:
            self._meta_clusters.setdefault(offset >> self.cluster_bits, name)

    def _metadata_clusters(self) -> dict[int, str]:
        if self._meta_clusters is None:
            from imagetools.formats.qcow2.overlap import metadata_clusters
            self._meta_clusters = metadata_clusters(self)
        return self._meta_clusters

    def _guard_in_place(self, host: int, length: int) -> None:
        """Refuse (and mark the image corrupt) if data would overwrite metadata."""
        if self.data_file is not None:
            return
        meta = self._metadata_clusters()
        first = host >> self.cluster_bits
        last = (host + length - 1) >> self.cluster_bits
        hit = None
        if last - first < 64:
            hit = next((c for c in range(first, last + 1) if c in meta), None)
        else:
            hit = next((c for c in meta if first <= c <= last), None)
        if hit is None:
            return
        self.signal_corruption("Preventing invalid write on metadata "
                               f"(overlaps with {meta[hit]})")

    # -- writing data ----------------------------------------------------------

    def write(self, offset: int, data) -> None:
        view = memoryview(data).cast("B")
        self._check_range(offset, len(view))
        self._writable(offset, len(view))
        if not len(view):
            return
        self._write_source(offset, len(view), _ViewSource(view, offset))

    def write_from_fd(self, offset: int, length: int, src_fd: int, src_offset: int) -> None:
        """Write guest bytes taken from ``src_fd``; data moves with copy_file_range."""
        self._check_range(offset, length)
        self._writable(offset, length)
        if length:
            self._write_source(offset, length, _FdSource(src_fd, src_offset, offset))

    def _write_source(self, offset: int, length: int, source) -> None:
        self._compressed_cache = None
        cov = self.layout.l2_coverage
        pos, end = offset, offset + length
        while pos < end:
            l1i = pos // cov
            stop = min(end, (l1i + 1) * cov)
            self._write_slice(l1i, pos, stop, source)
            pos = stop
        self._maybe_writeback()

    def _old_alloc_mask(self, entry: int, bitmap: int, type_: int) -> int:
        """Subclusters whose data lives in the cluster (1 bit for non-extended L2)."""
        if self.layout.extended_l2:
            if type_ == COMPRESSED:
                return 0xFFFFFFFF
            if entry & L2E_OFFSET_MASK or (self.data_file is not None and
                                           entry & QCOW_OFLAG_COPIED):
                return bitmap & 0xFFFFFFFF
            return 0
        return 1 if type_ in (NORMAL, COMPRESSED) else 0

    def _reusable_host(self, cstart: int, entry: int, type_: int) -> int | None:
        """Host offset to write in place, or None if a new cluster is needed."""
        if self.data_file is not None:
            return cstart
        if type_ == COMPRESSED or not entry & QCOW_OFLAG_COPIED:
            return None
        host = entry & L2E_OFFSET_MASK
        return host or None

    def _write_slice(self, l1i: int, pos: int, end: int, source) -> None:
        """Write guest ``[pos, end)`` (inside one L2 table's range)."""
        table = self._l2_for_write(l1i)
        cs = self._cluster_size
        if not self.layout.extended_l2 and self.data_file is None:
            lo = -(-pos // cs) * cs
            hi = end // cs * cs
            if hi > lo:
                mask = self.layout.l2_entries - 1
                ia = (lo >> self.cluster_bits) & mask
                ib = ia + ((hi - lo) >> self.cluster_bits)
                if not any(table.values[ia:ib]):
                    # Whole unallocated clusters: one allocation, one write,
                    # the entries set in one go (the common convert case).
                    if pos < lo:
                        self._write_clusters(table, pos, lo, source)
                    from array import array
                    host = self.refcounts.allocate(ib - ia) * cs
                    self._write_segments([(host, source.part(lo, hi))])
                    first = host | QCOW_OFLAG_COPIED
                    table.values[ia:ib] = array("Q", range(first, first + (hi - lo), cs))
                    table.dirty = True
                    if hi < end:
                        self._write_clusters(table, hi, end, source)
                    return
        self._write_clusters(table, pos, end, source)

    def _write_clusters(self, table, pos: int, end: int, source) -> None:
        """The general path: each cluster planned on its own (COW, subclusters)."""
        layout = self.layout
        cs = self._cluster_size
        cbits = self.cluster_bits
        mask = layout.l2_entries - 1
        values = table.values
        ext = layout.extended_l2
        first_ci, last_ci = pos >> cbits, (end - 1) >> cbits
        plans = []
        need_new = []
        for ci in range(first_ci, last_ci + 1):
            idx = ci & mask
            cstart = ci << cbits
            entry, bitmap = self._entry(values, idx)
            type_ = layout.cluster_type(entry)
            host = self._reusable_host(cstart, entry, type_)
            plans.append([ci, idx, cstart, entry, bitmap, type_, host])
            if host is None:
                need_new.append(len(plans) - 1)
        self._allocate_for(plans, need_new)
        segments: list[tuple[int, object]] = []
        for ci, idx, cstart, entry, bitmap, type_, host in plans:
            ws = max(pos, cstart) - cstart
            we = min(end, cstart + cs) - cstart
            reused = host == self._reusable_host(cstart, entry, type_)
            old_alloc = self._old_alloc_mask(entry, bitmap, type_)
            new_entry, new_bitmap = self._plan_cluster(
                cstart, ws, we, host, reused, old_alloc, bitmap, type_,
                source.part(cstart + ws, cstart + we), segments)
            if reused and type_ == NORMAL and not ext:
                pass                      # entry unchanged
            else:
                self._set_entry(table, idx, new_entry, new_bitmap)
                if not reused and (entry & L2E_OFFSET_MASK or entry & (1 << 62)):
                    self._free_entry(entry)
        self._write_segments(segments)

    def _allocate_for(self, plans: list, need_new: list[int]) -> None:
        """Give consecutive clusters that need a new host cluster one contiguous run."""
        cs = self._cluster_size
        i = 0
        while i < len(need_new):
            j = i
            while j + 1 < len(need_new) and need_new[j + 1] == need_new[j] + 1:
                j += 1
            count = j - i + 1
            first = self.refcounts.allocate(count)
            for k in range(count):
                plans[need_new[i + k]][6] = (first + k) * cs
            i = j + 1

    def _plan_cluster(self, cstart: int, ws: int, we: int, host: int, reused: bool,
                      old_alloc: int, bitmap: int, type_: int, data,
                      segments: list) -> tuple[int, int]:
        """Add the writes for one cluster to ``segments``; return its new L2 entry."""
        layout = self.layout
        sbits = layout.subcluster_bits
        nsub = layout.subclusters
        first_sc, last_sc = ws >> sbits, (we - 1) >> sbits
        touched = ((1 << (last_sc + 1)) - 1) & ~((1 << first_sc) - 1)
        if reused:
            need_fill = touched & ~old_alloc
            new_alloc = old_alloc | touched
        else:
            need_fill = touched | old_alloc
            new_alloc = old_alloc | touched
        pieces: list[tuple[int, object]] = []
        sc = 0
        while sc < nsub:
            if not need_fill >> sc & 1:
                sc += 1
                continue
            j = sc
            while j + 1 < nsub and need_fill >> (j + 1) & 1:
                j += 1
            lo, hi = sc << sbits, (j + 1) << sbits
            if lo < ws:
                pieces.append((lo, self._guest_fill(cstart + lo, min(hi, ws) - lo)))
            if hi > we:
                start = max(lo, we)
                pieces.append((start, self._guest_fill(cstart + start, hi - start)))
            sc = j + 1
        pieces.append((ws, data))
        pieces.sort(key=lambda p: p[0])
        for off, buf in pieces:
            if reused:
                self._guard_in_place(host + off, len(buf))
            segments.append((host + off, buf))
        entry = (host & L2E_OFFSET_MASK) | QCOW_OFLAG_COPIED
        if layout.extended_l2:
            new_zero = (bitmap >> 32) & ~new_alloc if type_ != COMPRESSED else 0
            return entry, new_alloc | (new_zero << 32)
        return entry, 0

    def _guest_fill(self, start: int, length: int) -> bytes:
        """Current guest content for copy-on-write (zeros past the image end)."""
        avail = max(0, min(length, self._size - start))
        data = self.read(start, avail) if avail else b""
        if avail < length:
            data += bytes(length - avail)
        return data

    def _write_segments(self, segments: list[tuple[int, object]]) -> None:
        """Write (host offset, buffer or FdSlice) pieces, merging contiguous ones."""
        out = self.data_file or self.file
        batch: list = []
        batch_start = batch_end = -1
        copy: FdSlice | None = None
        copy_host = 0

        def flush_batch() -> None:
            if batch:
                out.pwritev(batch_start, batch)
                batch.clear()

        def flush_copy() -> None:
            nonlocal copy
            if copy is not None:
                out.copy_in(copy.fd, copy.offset, copy_host, copy.length)
                copy = None

        for host, buf in segments:
            n = len(buf)
            if not n:
                continue
            if isinstance(buf, FdSlice):
                flush_batch()
                if copy is not None and copy.fd == buf.fd and \
                        copy_host + copy.length == host and copy.offset + copy.length == buf.offset:
                    copy.length += n
                    continue
                flush_copy()
                copy = FdSlice(buf.fd, buf.offset, n)
                copy_host = host
                continue
            flush_copy()
            if batch and host == batch_end and len(batch) < _IOV_MAX:
                batch.append(buf)
                batch_end += n
                continue
            flush_batch()
            batch.append(buf)
            batch_start, batch_end = host, host + n
        flush_batch()
        flush_copy()

    def _maybe_writeback(self) -> None:
        if self.l2_cache.dirty_count * 2 > self.l2_cache.max_tables or \
                len(self.refcounts.blocks) > 4096:
            self.writeback()
            self.refcounts.drop_cache()

    # -- zeroes and discards -------------------------------------------------------

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        self._check_range(offset, length)
        self._writable(offset, length)
        if not length:
            return
        self._compressed_cache = None
        if self.data_file_raw:
            self.data_file.write_zeroes(offset, length, unmap=unmap)
        ssize = self.layout.subcluster_size
        end = offset + length
        head_end = min(end, -(-offset // ssize) * ssize)
        tail_start = max(head_end, end // ssize * ssize)
        if offset < head_end:
            self._zero_partial(offset, head_end - offset, unmap)
        if head_end < tail_start:
            self._zeroize(head_end, tail_start - head_end, unmap)
        if tail_start < end:
            self._zero_partial(tail_start, end - tail_start, unmap)
        self._maybe_writeback()

    def _zero_partial(self, offset: int, length: int, unmap: bool) -> None:
        """An unaligned piece inside one subcluster: zero flag if the rest reads zero."""
        ssize = self.layout.subcluster_size
        sstart = offset // ssize * ssize
        send = min(sstart + ssize, self._size)
        if length == send - sstart and offset == sstart:
            self._zeroize(sstart, send - sstart, unmap)
            return
        rest_zero = self._reads_zero(sstart, offset - sstart) and \
            self._reads_zero(offset + length, send - offset - length)
        if rest_zero and self.header.version >= 3:
            runs = list(self.runs(sstart, send - sstart))
            if all(r.type in (UNALLOCATED_PLAIN, UNALLOCATED_ALLOC, ZERO_PLAIN, ZERO_ALLOC)
                   for r in runs):
                self._zeroize(sstart, send - sstart, unmap)
                return
        if rest_zero and self.header.version < 3 and self.backing is None:
            runs = list(self.runs(sstart, send - sstart))
            if all(r.type == UNALLOCATED_PLAIN for r in runs):
                return
        self.write(offset, bytes(length))

    def _reads_zero(self, offset: int, length: int) -> bool:
        """Whether block status says the range reads as zeros (QEMU's is_zero)."""
        if length <= 0:
            return True
        return all(ext.zero for ext in self.block_status(offset, length))

    def _zeroize(self, offset: int, length: int, unmap: bool) -> None:
        """Whole (sub)clusters (or up to the image end) become zeros in metadata."""
        if self.header.version < 3:
            if self.backing is None:
                self._discard_clusters(offset, length, full=True)
            else:
                self._write_zero_data(offset, length)
            return
        layout = self.layout
        cbits = self.cluster_bits
        cs = self._cluster_size
        pos, end = offset, offset + length
        while pos < end:
            l1i = layout.l1_index(pos)
            stop = min(end, (l1i + 1) * layout.l2_coverage)
            table = None
            for ci in range(pos >> cbits, ((stop - 1) >> cbits) + 1):
                cstart = ci << cbits
                s, e = max(pos, cstart), min(stop, cstart + cs)
                whole = s == cstart and (e == cstart + cs or e == self._size)
                if table is None:
                    table = self._l2_for_write(l1i)
                idx = ci & (layout.l2_entries - 1)
                entry, bitmap = self._entry(table.values, idx)
                type_ = layout.cluster_type(entry)
                if layout.extended_l2 and not whole:
                    if type_ == COMPRESSED:
                        self._write_zero_data(s, e - s)
                        table = None
                        continue
                    sb = layout.subcluster_bits
                    lo, hi = (s - cstart) >> sb, -(-(e - cstart) // layout.subcluster_size)
                    rng = ((1 << hi) - 1) & ~((1 << lo) - 1)
                    new_bitmap = (bitmap | (rng << 32)) & ~rng
                    if new_bitmap != bitmap:
                        self._set_entry(table, idx, entry, new_bitmap)
                    continue
                allocated = type_ in (NORMAL, COMPRESSED, ZERO_ALLOC)
                do_unmap = type_ == COMPRESSED or (unmap and allocated)
                new_entry = 0 if do_unmap else entry
                new_bitmap = bitmap
                if layout.extended_l2:
                    new_bitmap = BITMAP_ALL_ZERO
                else:
                    new_entry |= QCOW_OFLAG_ZERO
                if (new_entry, new_bitmap) == (entry, bitmap):
                    continue
                self._set_entry(table, idx, new_entry, new_bitmap)
                if do_unmap:
                    self._free_entry(entry, request=True)
            pos = stop

    def _write_zero_data(self, offset: int, length: int) -> None:
        chunk = 1 << 20
        zeros = bytes(min(length, chunk))
        pos, end = offset, offset + length
        while pos < end:
            n = min(chunk, end - pos)
            self.write(pos, memoryview(zeros)[:n])
            pos += n

    def discard(self, offset: int, length: int) -> None:
        """Drop whole clusters (QEMU ignores partial ones, except a final partial one)."""
        self._check_range(offset, length)
        self._writable(offset, length)
        cs = self._cluster_size
        start = -(-offset // cs) * cs
        end = (offset + length) // cs * cs
        if offset + length == self._size and self._size % cs:
            end = offset + length
        if start >= end:
            return
        self._compressed_cache = None
        if self.data_file_raw:
            self.data_file.write_zeroes(start, end - start, unmap=True)
        self._discard_clusters(start, end - start, full=False)
        self._maybe_writeback()

    def _discard_clusters(self, offset: int, length: int, *, full: bool) -> None:
        layout = self.layout
        cbits = self.cluster_bits
        pos, end = offset, offset + length
        while pos < end:
            l1i = layout.l1_index(pos)
            stop = min(end, (l1i + 1) * layout.l2_coverage)
            l1e = self.l1.values[l1i] if l1i < len(self.l1) else 0
            if not l1e & L1E_OFFSET_MASK and (full or self.backing is None):
                pos = stop
                continue
            table = self._l2_for_write(l1i)
            for ci in range(pos >> cbits, ((stop - 1) >> cbits) + 1):
                idx = ci & (layout.l2_entries - 1)
                entry, bitmap = self._entry(table.values, idx)
                type_ = layout.cluster_type(entry)
                allocated = type_ in (NORMAL, COMPRESSED, ZERO_ALLOC)
                if full:
                    new_entry, new_bitmap = 0, 0
                elif self.backing is not None or allocated:
                    if layout.extended_l2:
                        new_entry, new_bitmap = 0, BITMAP_ALL_ZERO
                    else:
                        new_entry = QCOW_OFLAG_ZERO if self.header.version >= 3 else 0
                        new_bitmap = 0
                else:
                    continue        # already reads as zeros: QEMU leaves it alone
                if (new_entry, new_bitmap) == (entry, bitmap):
                    continue
                self._set_entry(table, idx, new_entry, new_bitmap)
                if allocated:
                    self._free_entry(entry, request=True)
            pos = stop

    # -- compressed clusters -------------------------------------------------------

    def write_compressed_blob(self, offset: int, blob: bytes | None, length: int,
                              plain: bytes | None = None) -> None:
        self._writable(offset, length)
        cs = self._cluster_size
        if offset % cs or not (length == cs or offset + length == self._size):
            raise ImageError("Compressed writes must cover exactly one cluster")
        self._check_range(offset, length)
        if blob is None:
            if plain is None:
                raise ImageError("write_compressed_blob: no data for an incompressible cluster")
            self.write(offset, memoryview(plain)[:length])
            return
        if self.data_file is not None:
            raise ImageError("Compression is not supported with an external data file")
        self._compressed_cache = None
        l1i = self.layout.l1_index(offset)
        table = self._l2_for_write(l1i)
        idx = self.layout.l2_index(offset)
        old, _ = self._entry(table.values, idx)
        coffset = self._alloc_bytes(len(blob))
        self.file.pwrite(coffset, blob)
        self._set_entry(table, idx, self.layout.compressed_entry(coffset, len(blob)), 0)
        if old & L2E_OFFSET_MASK or old & (1 << 62):
            self._free_entry(old)
        self._maybe_writeback()

    def _alloc_bytes(self, size: int) -> int:
        """Byte-granular space for compressed data, packed as QEMU packs it.

        Pieces follow each other inside a host cluster (whose refcount is
        the number of pieces touching it); a piece may run into the next
        cluster when that one is free, else it starts a new cluster.
        """
        cs = self._cluster_size
        cbits = self.cluster_bits
        rc = self.refcounts
        offset = self._free_byte_offset
        if offset and rc.get(offset >> cbits) >= self.layout.refcount_max:
            offset = 0
        if offset and (offset % cs) + size > cs:
            nxt = (offset >> cbits) + 1
            spill = ((offset + size - 1) >> cbits) - nxt + 1
            if rc.allocate_at(nxt, spill):
                rc.change(offset >> cbits, 1, 1)
            else:
                offset = 0
        elif offset:
            rc.change(offset >> cbits, 1, 1)
        if not offset:
            offset = rc.allocate(-(-size // cs)) * cs
        self._free_byte_offset = (offset + size) if (offset + size) % cs else 0
        return offset
