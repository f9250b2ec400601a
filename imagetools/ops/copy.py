"""The convert engine: qemu-img convert's algorithm on the driver interface.

The sources (concatenated) are walked by block status in qemu-img's
chunks: a run of one status, cut to the source's cluster alignment, at most
2 MiB for data, whole clusters when compressing. Data chunks are read and
scanned for zero sectors (``-S``, default 4 KiB) so that zeros become holes
or zero clusters instead of written data; zero runs are written as zeroes
(or skipped when the new target already reads as zeros); with ``-B``, runs
the source leaves to its backing file stay unallocated in the target. The
writes happen in guest order, so a new qcow2 gets the same layout qemu-img
gives it; compression runs in worker threads (zlib/zstd release the GIL)
while the results are written in order.

Progress counts allocated sectors exactly as qemu-img does, so ``-p``
prints the same records.
"""

from __future__ import annotations

import os
import time

from imagetools.errors import ImageError, ImageIOError
from imagetools.ops.zeroscan import no_zero_sector, sector_heads
from imagetools.output import Reported, warn
from imagetools.record import Record

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from typing import Callable, Iterator

SECTOR = 512
IO_BUF_SECTORS = 4096                      # 2 MiB, qemu-img's IO_BUF_SIZE
MAX_REQUEST_SECTORS = (2**31 - 1) >> 9     # BDRV_REQUEST_MAX_SECTORS
BATCH_SECTORS = 8192                       # 4 MiB: the longest run of data chunks
# a batch buffer holds a run and up to this much of shorter runs before it
# (an 8 MiB buffer, two long runs, cost 15 % more CPU on 1 GiB qcow2 -> raw)
PACK_SECTORS = 2048
BRIDGE_BYTES = 1 << 20                     # most gathered for one write (4 MiB was slower)

BLK_DATA, BLK_ZERO, BLK_BACKING_FILE = 0, 1, 2     # ImgConvertBlockStatus
PLAN_LIMIT = 4_000_000                             # chunks kept from the first pass


class ConvertJob(Record):
    """Everything ``qemu-img convert`` takes from its command line."""

    sources: list[str] = []
    target: str | None = None
    src_fmt: str | None = None
    out_fmt: str | None = None
    options: str | None = None
    compress: bool = False
    min_sparse: int = 8                    # sectors (-S 4k)
    skip_create: bool = False
    target_is_zero: bool = False
    backing_file: str | None = None
    backing_fmt: str | None = None
    snapshot: object = None
    force_share: bool = False
    image_opts: bool = False
    target_image_opts: bool = False
    cache: str = "unsafe"
    src_cache: str = "writeback"
    coroutines: int = 8
    in_order: bool = True
    rate_limit: int = 0
    salvage: bool = False
    copy_range: bool = False
    bitmaps: bool = False
    skip_broken_bitmaps: bool = False
    quiet: bool = False
    progress: bool = False


class ConvertStats(Record):
    """What a conversion did (for the API and the benchmark)."""

    total_bytes: int = 0
    allocated_bytes: int = 0
    data_bytes_written: int = 0
    zero_bytes: int = 0
    compressed_clusters: int = 0
    seconds: float = 0.0


def run_cli(job: ConvertJob) -> int:
    """``qemu-img convert`` after option parsing: progress, run, report."""
    from imagetools.progress import Progress
    from imagetools.output import report_error
    meter = Progress(job.progress and not job.quiet, 1.0)
    try:
        meter.print(0, 100)
        convert(job, progress=meter.absolute)
    except ImageError as err:
        report_error(err)          # before the progress line ends, as qemu-img
        meter.end()
        return getattr(err, "exit_code", 1)
    meter.print(100, 0)
    meter.end()
    return 0


def convert(job: ConvertJob, progress: Callable[[int, int], None] | None = None) -> ConvertStats:
    """Run a conversion described by ``job``; raises ImageError (Reported)."""
    from imagetools.ops.common import check_cache, open_image
    sources = []
    target = None
    started = time.monotonic()
    try:
        for name in job.sources:
            sources.append(open_image(name, job.src_fmt, read_only=True,
                                      force_share=job.force_share, image_opts=job.image_opts,
                                      unchanged=True))
        if job.snapshot is not None:
            if isinstance(job.snapshot, str) and len(sources) > 1:
                raise Reported("No support for concatenating multiple snapshot")
            sources[0] = load_snapshot(sources[0], job.snapshot)
        total_sectors = sum(-(-s.size // SECTOR) for s in sources)
        opts = None
        if not job.skip_create:
            opts = _target_options(job, total_sectors * SECTOR)
        target_backing = job.backing_file
        if opts is not None and opts.has("backing_file"):
            target_backing = opts.given["backing_file"]
        if job.target_is_zero and target_backing:
            raise Reported("Cannot use --target-is-zero when the destination image has a "
                           "backing file")
        if len(sources) > 1 and target_backing:
            raise Reported("Having a backing file for the target makes no sense when "
                           "concatenating multiple input images")
        if opts is not None and opts.has("backing_file") and not opts.has("backing_fmt"):
            raise Reported("Use of backing file requires explicit backing format")
        if job.compress and opts is not None:
            _check_compress_options(job.out_fmt, opts)
        if job.bitmaps:
            if len(sources) > 1:
                raise Reported("Copying bitmaps only possible with single source")
            _check_bitmaps(sources[0])
        from imagetools.ops.common import refuse_source_as_target
        if job.skip_create:
            target_path = job.target
            if job.target_image_opts:
                from imagetools.ops.common import parse_image_opts
                target_path = parse_image_opts(job.target, None)[0]
            refuse_source_as_target(target_path, sources, f"Could not open '{job.target}': ")
        else:
            refuse_source_as_target(job.target, sources,
                                    f"{job.target}: error while converting {job.out_fmt}: ")
            _create_target(job, opts)
        check_cache(job.cache)
        target = _open_target(job)
        if job.bitmaps and target.format_name != "qcow2":
            raise Reported(f"Format driver '{target.format_name}' does not support bitmaps")
        if job.compress and not _format_can_compress(target.format_name):
            raise Reported("Compression not supported for this file format")
        if job.skip_create and -(-target.size // SECTOR) < total_sectors:
            raise Reported("output file is smaller than input file")
        copier = Copier(sources, target, job, total_sectors)
        stats = copier.run(progress)
        target.flush()
        target.close()
        target = None
        if copier.compressed and copier.target.format_name in ("qcow2", "qcow"):
            # qemu-img's end-of-compression write pads these formats to a sector
            pad_to_sector(copier.target.filename)
        stats.seconds = time.monotonic() - started
        return stats
    finally:
        if target is not None:
            target.close()
        for src in sources:
            src.close()


# -- setup -------------------------------------------------------------------

def load_snapshot(drv, spec):
    """The source seen at an internal snapshot (``-l``)."""
    if isinstance(spec, tuple):
        sid, name = spec
        match = None
        for sn in drv.snapshots():
            if (sid is None or sn.id == sid) and (name is None or sn.name == name):
                match = sn
                break
    else:
        match = None
        table = drv.snapshots()
        for sn in table:
            if sn.id == spec:
                match = sn
                break
        if match is None:
            for sn in table:
                if sn.name == spec:
                    match = sn
                    break
    if match is None:
        raise Reported("Failed to load snapshot: Can't find snapshot")
    try:
        view = drv.open_snapshot(match.id)
    except ImageError as err:
        text = str(err)
        if not text.startswith("Failed to load snapshot"):
            text = f"Failed to load snapshot: {text}"
        raise Reported(text) from None
    return view


def _target_options(job: ConvertJob, size: int):
    from imagetools.ops.options import target_options
    opts = target_options(job.out_fmt, job.options, job.backing_file, job.backing_fmt)
    opts.set_number("size", size)
    return opts


def _check_compress_options(out_fmt: str, opts) -> None:
    if not _format_can_compress(out_fmt):
        raise Reported("Compression not supported for this file format")
    if opts.get("encryption") or opts.has("encrypt.format"):
        raise Reported("Compression and encryption not supported at the same time")
    prealloc = opts.given.get("preallocation")
    if prealloc is not None and prealloc != "off":
        raise Reported("Compression and preallocation not supported at the same time")


def _check_bitmaps(src) -> None:
    if src.format_name != "qcow2":
        raise Reported("Source lacks bitmap support")
    specific = src.format_specific() or {}
    if specific.get("data", {}).get("bitmaps"):
        from imagetools.errors import UnsupportedError
        raise UnsupportedError("Copying persistent bitmaps is not supported yet")


def _create_target(job: ConvertJob, opts) -> None:
    from imagetools.formats import driver
    given = opts.given_values()
    size = given.pop("size")
    from imagetools.ops.common import creation_error
    try:
        driver(job.out_fmt).create(job.target, size, given)
    except (ImageError, OSError) as err:
        raise Reported(f"{job.target}: error while converting {job.out_fmt}: "
                       f"{creation_error(job.target, err)}") from None


def _open_target(job: ConvertJob):
    from imagetools.ops.common import open_image
    return open_image(job.target, job.out_fmt, read_only=False,
                      image_opts=job.target_image_opts, cache=job.cache)


def _format_can_compress(fmt: str) -> bool:
    """Whether the driver of ``fmt`` writes compressed clusters (qcow2, qcow, vmdk)."""
    from imagetools.formats import driver
    from imagetools.formats.base import Driver
    try:
        cls = driver(fmt)
    except ImageError:
        return False
    return getattr(cls, "compressor", Driver.compressor) is not Driver.compressor


def _can_compress(drv) -> bool:
    try:
        drv.compressor()
    except (NotImplementedError, ImageError):
        return False
    return True


# -- the copy ----------------------------------------------------------------

class _Status:
    """Block status of the concatenated sources at moving offsets."""

    def __init__(self, sources, top_only: bool) -> None:
        self.sources = sources
        self.top_only = top_only
        self.starts = []
        pos = 0
        for src in sources:
            self.starts.append(pos)
            pos += -(-src.size // SECTOR)
        self._iters: dict[int, Iterator] = {}
        self._current: dict[int, object] = {}

    def part(self, sector: int) -> int:
        index = 0
        while index + 1 < len(self.starts) and self.starts[index + 1] <= sector:
            index += 1
        return index

    def query(self, index: int, offset: int):
        """The merged run of source ``index`` that contains byte ``offset``."""
        ext = self._current.get(index)
        if ext is None or offset < ext.start or offset >= ext.start + ext.length:
            if ext is None or offset < ext.start:
                from imagetools.ops.common import status_runs
                self._iters[index] = status_runs(self.sources[index], offset)
            it = self._iters[index]
            try:
                ext = next(it, None)
                while ext is not None and ext.start + ext.length <= offset:
                    ext = next(it, None)
            except ImageIOError as err:
                # as qemu-img: where the status query failed (a corrupt
                # entry's guest offset, where the driver knows it)
                at = offset if err.offset is None else max(err.offset, offset)
                raise ImageError(f"error while reading block status at offset {at}: "
                                 f"{err}") from None
            if ext is None:
                raise ImageError(f"error while reading block status at offset {offset}")
            self._current[index] = ext
        return ext


class Copier:
    """qemu-img's ImgConvertState: chunking, zero detection, ordered writes."""

    def __init__(self, sources, target, job: ConvertJob, total_sectors: int) -> None:
        self.sources = sources
        self.target = target
        self.job = job
        self.total_sectors = total_sectors
        self.min_sparse = job.min_sparse
        self.target_has_backing = target.backing is not None or bool(target.backing_filename)
        # some targets (vmdk streamOptimized) take nothing but compressed clusters
        self.compressed = job.compress or bool(getattr(target, "needs_compressed_writes", False))
        cluster = target.cluster_size or 0
        self.cluster_sectors = cluster // SECTOR
        self.buf_sectors = IO_BUF_SECTORS
        if self.compressed:
            if self.cluster_sectors <= 0 or self.cluster_sectors > self.buf_sectors:
                raise Reported("invalid cluster size")
            self.buf_sectors = self.cluster_sectors
        self.alignment = max(_pow2floor(self.min_sparse), 1)
        self.has_zero_init = job.target_is_zero or (
            not job.skip_create and self.min_sparse > 0 and not self.target_has_backing
            and target.has_zero_init())
        backing = target.backing
        self.target_backing_sectors = (-(-backing.size // SECTOR)
                                       if backing is not None and not job.skip_create else -1)
        self.src_alignment = []
        for src in sources:
            cl = src.cluster_size or 0
            self.src_alignment.append(max(1, cl // SECTOR))
        self.status_map = _Status(sources, self.target_has_backing)
        #: the chunk kinds progress counts (qemu-img's allocated sectors):
        #: data, and zeros too where they are written out (-S 0)
        self.counted = (BLK_DATA,) if self.min_sparse else (BLK_DATA, BLK_ZERO)
        #: data is looked at for zero sectors (so the reader takes each
        #: sector's first word, see zeroscan.sector_heads)
        self.scan = bool(self.min_sparse) and not self.compressed and not job.copy_range
        #: (host file name, host offset, at sector) of the data of the last
        #: chunk planned, from the block status; only a read-ahead hint
        self.host_hint: tuple[str, int, int] | None = None
        #: the host files the read-ahead hints of chunks() name, by index
        self.hint_files: list[str] = []
        self._hint_ids: dict[str, int] = {}
        self.sector_next_status = 0
        self.status = BLK_DATA
        self.stats = ConvertStats(total_bytes=total_sectors * SECTOR)
        self._rate_start = time.monotonic()
        self._rate_bytes = 0
        self._pending: list | None = None
        # short zero gaps of a new qcow2 are bridged: see _bridges
        self._bridge_unit = self._bridge_unit_of(target)
        # one buffer, made once: a new one per write costs page faults
        self._gathered: bytearray | None = None
        self._gathered_start: int | None = None         # sector; None: nothing gathered
        self._gathered_len = 0
        self._gathered_data = 0

    # ---- chunking (convert_iteration_sectors) ----

    def iteration_sectors(self, sector_num: int) -> int:
        index = self.status_map.part(sector_num)
        part_start = self.status_map.starts[index]
        n = min(self.total_sectors - sector_num, MAX_REQUEST_SECTORS)
        post_backing_zero = False
        if self.target_backing_sectors >= 0:
            if sector_num >= self.target_backing_sectors:
                post_backing_zero = True
            elif sector_num + n > self.target_backing_sectors:
                n = self.target_backing_sectors - sector_num
        if self.sector_next_status <= sector_num:
            src = self.sources[index]
            offset = (sector_num - part_start) * SECTOR
            count = min(n * SECTOR, src.size - offset) if offset < src.size else n * SECTOR
            if offset < src.size:
                ext = self.status_map.query(index, offset)
                count = min(count, ext.start + ext.length - offset)
                zero, data, mine = ext.zero, ext.data, ext.depth == 0
                self.host_hint = ((ext.filename, ext.offset + offset - ext.start, sector_num)
                                  if data and not zero and ext.offset is not None
                                  and not ext.compressed else None)
            else:
                zero, data, mine = True, False, True
                self.host_hint = None
            n = max(1, -(-count // SECTOR))
            tail = (sector_num - part_start + n) % self.src_alignment[index]
            if n > tail:
                n -= tail
            if self.target_has_backing and not mine:
                self.status = BLK_BACKING_FILE
            elif zero:
                self.status = BLK_BACKING_FILE if post_backing_zero else BLK_ZERO
            elif data:
                self.status = BLK_DATA
            else:
                self.status = BLK_BACKING_FILE if self.target_has_backing else BLK_DATA
            self.sector_next_status = sector_num + n
        n = min(n, self.sector_next_status - sector_num)
        if self.status == BLK_DATA:
            n = min(n, self.buf_sectors)
        if self.compressed:
            if n < self.cluster_sectors:
                n = min(self.cluster_sectors, self.total_sectors - sector_num)
                self.status = BLK_DATA
            else:
                n -= n % self.cluster_sectors
        return n

    def chunks(self) -> Iterator[tuple[int, int, int, int, int]]:
        """The chunks in guest order, ``(sector, n, status, file, host)``:
        for data, where its bytes lie in a host file (a read-ahead hint),
        ``file`` an index into :attr:`hint_files`; -1 where that is not
        known (not data, compressed, past the end of the source)."""
        self.sector_next_status = 0
        ids, files = self._hint_ids, self.hint_files
        sector = 0
        while sector < self.total_sectors:
            n = self.iteration_sectors(sector)
            status = self.status
            if not self.min_sparse and status == BLK_ZERO:
                n = min(n, self.buf_sectors)
            hint = self.host_hint
            if hint is None or status != BLK_DATA:
                yield sector, n, status, -1, 0
            else:
                name, host, at = hint
                index = ids.get(name)
                if index is None:
                    index = ids[name] = len(files)
                    files.append(name)
                yield sector, n, status, index, host + (sector - at) * SECTOR
            sector += n

    # ---- the copy (convert_co_do_copy) ----

    def run(self, progress: Callable[[int, int], None] | None) -> ConvertStats:
        plan, allocated = None, 0
        if progress is not None:
            plan, allocated = self._first_pass()
        done = 0
        # a format that compresses may still store a given image plainly (a
        # monolithicSparse vmdk): then the clusters are written as they are
        writer = (_CompressedWriter(self.target)
                  if self.compressed and _can_compress(self.target) else None)
        reader = _Prefetch(self, (BATCH_SECTORS + PACK_SECTORS) * SECTOR, plan)
        try:
            run = _Runs()
            for buf, items, heads in reader:
                # data chunks without a sector that could be zero are
                # written without the sector-by-sector look (most are)
                for sector, n, status, at in items:
                    if status == BLK_DATA:
                        run.data(sector, n)
                        if run.ended:
                            self._end_batch()
                        done += n
                        if progress is not None:
                            progress(done, allocated)
                        if heads is not None and not self.job.rate_limit and \
                                no_zero_sector(heads, at, n):
                            self._write(sector, buf, at, n)
                        else:
                            self._copy_data(sector, n, buf, at, writer)
                        continue
                    run.other()
                    if run.ended:
                        self._end_batch()
                    if not self.min_sparse:
                        done += n
                        if progress is not None:
                            progress(done, allocated)
                        self._copy_data(sector, n, bytes(n * SECTOR), 0, writer)
                    else:
                        self._zero(sector, n, writer)
                if buf is not None:
                    # a batch ends where a run does (its buffer is reused)
                    run.other()
                    if run.ended:
                        self._end_batch()
                    reader.release(buf)
            self._flush_writes()            # what was read before an error too
            if reader.error is not None:
                raise reader.error
        finally:
            reader.close()
            if writer is not None:
                writer.finish()
                self.stats.compressed_clusters = writer.clusters
        self.stats.allocated_bytes = reader.allocated * SECTOR
        return self.stats

    def _first_pass(self):
        """qemu-img's first pass: how many sectors will count for progress.

        Only progress needs it (``-p``, and the report SIGUSR1 asks for
        without it; the API without progress has the reader thread walk the
        block status once, while the data is written). The chunks and their
        read-ahead hints are kept (compactly) for the copy pass unless there
        are very many, in which case the copy pass walks the block status
        again.
        """
        from array import array
        sectors, counts, kinds = array("q"), array("i"), bytearray()
        files, hosts = array("i"), array("q")
        allocated = 0
        counted = self.counted
        for sector, n, status, file, host in self.chunks():
            if status in counted:
                allocated += n
            if kinds is not None:
                sectors.append(sector)
                counts.append(n)
                kinds.append(status)
                files.append(file)
                hosts.append(host)
                if len(kinds) > PLAN_LIMIT:
                    sectors, counts, kinds, files, hosts = None, None, None, None, None
        plan = zip(sectors, counts, kinds, files, hosts) if kinds is not None else None
        return plan, allocated

    def _copy_data(self, sector: int, n: int, data, first: int, writer) -> None:
        """Write ``n`` sectors held in ``data`` from sector index ``first``,
        leaving zero sectors sparse as qemu-img does (``-S``)."""
        self._throttle(n * SECTOR)
        if self.compressed:
            # whole clusters: skipped only when entirely zero
            from imagetools.ops.zeroscan import range_is_zero
            start = first * SECTOR
            if self.min_sparse and range_is_zero(data, start, start + n * SECTOR):
                self._zero(sector, n, writer)
            elif writer is not None:
                writer.submit(sector * SECTOR, memoryview(data)[start:start + n * SECTOR])
            else:
                self._write(sector, data, first, n)
            return
        if not self.min_sparse or self.job.copy_range:
            self._write(sector, data, first, n)
            return
        from imagetools.ops.zeroscan import is_allocated_sectors_min
        pos = 0
        while pos < n:
            allocated, count = is_allocated_sectors_min(data, first + pos, n - pos,
                                                        self.min_sparse, sector + pos,
                                                        self.alignment)
            if allocated:
                self._write(sector + pos, data, first + pos, count)
            else:
                self._zero(sector + pos, count, None)
            pos += count

    def read_into(self, sector: int, n: int, buf: bytearray,
                  chunks: list[tuple[int, int]] | None = None) -> None:
        """Fill ``buf`` with ``n`` sectors of the concatenated sources from ``sector``.

        ``chunks`` are the convert chunks this read covers: a failure is
        reported at the start of the chunk that fails, as qemu-img does.
        """
        try:
            self._read_span(sector, n, memoryview(buf))
        except ImageError as err:
            for start, count in chunks or ():
                at = (start - sector) * SECTOR
                try:
                    self._read_span(start, count, memoryview(buf)[at:at + count * SECTOR])
                except ImageError as failed:
                    err, sector = failed, start
                    break
            raise Reported(f"error while reading at byte {sector * SECTOR}: {err}") from None

    def _read_span(self, sector: int, n: int, view: memoryview) -> None:
        pos = 0
        while pos < n:
            index = self.status_map.part(sector + pos)
            src = self.sources[index]
            part_start = self.status_map.starts[index]
            part_sectors = -(-src.size // SECTOR)
            count = min(n - pos, part_sectors - (sector + pos - part_start))
            offset = (sector + pos - part_start) * SECTOR
            length = min(count * SECTOR, src.size - offset)
            piece = view[pos * SECTOR:pos * SECTOR + length]
            try:
                src.read_into(offset, piece)
            except ImageError:
                if not self.job.salvage:
                    raise
                self._salvage(src, offset, piece)
            if length < count * SECTOR:
                view[pos * SECTOR + length:(pos + count) * SECTOR] = bytes(count * SECTOR - length)
            pos += count

    def _salvage(self, src, offset: int, view: memoryview) -> None:
        for at in range(0, len(view), SECTOR):
            piece = view[at:at + SECTOR]
            try:
                src.read_into(offset + at, piece)
            except ImageError as err:
                if not self.job.quiet:
                    warn(f"error while reading offset {offset + at}: {err}")
                piece[:] = bytes(len(piece))

    def _write(self, sector: int, data, first: int, count: int) -> None:
        """Queue a data write; adjacent writes from one buffer become one request."""
        pending = self._pending
        if (pending is not None and pending[1] == sector and pending[2] is data
                and pending[3] + (pending[1] - pending[0]) == first):
            pending[1] = sector + count
            return
        if self._bridges(sector, count):
            self._gather(sector)
        else:
            self._flush_writes()
        self._pending = [sector, sector + count, data, first]

    # A fragmented source gives a new qcow2 one short write per data run,
    # separated by holes that its clusters are allocated around anyway (a
    # partly written cluster is filled with zeros). Such writes are gathered
    # into one buffer, the holes between them as zeros, and written at once:
    # the same clusters are allocated in the same order with the same bytes,
    # for a fraction of the per-write cost. (One thing moves: where a write
    # needs a new refcount block in its middle, the block goes behind the
    # larger run, as QEMU's allocator places it for a request of that size.)

    def _bridge_unit_of(self, target) -> int:
        """The allocation unit of a new, empty qcow2 target of its own (a
        subcluster) in which nothing needs to stay a hole; 0: no bridging."""
        if (getattr(target, "format_name", None) != "qcow2" or not self.has_zero_init
                or self.job.skip_create or self.job.target_is_zero
                or self.target_has_backing or self.compressed or self.job.copy_range
                or getattr(target, "data_file", None) is not None or not target.size):
            return 0
        # the target was just created: only preallocation can have allocated
        # anything, and then all of it (where zeros written would take room)
        probe = min(target.size, target.cluster_size)
        first = next(iter(target.block_status(0, probe)), None)
        if first is None or first.present or first.data or first.offset is not None \
                or first.length < probe:
            return 0
        return target.layout.subcluster_size

    def _bridges(self, sector: int, count: int) -> bool:
        """May the data written so far and the write at ``sector`` become one
        write, zeros in between? Only if every allocation unit the gap touches
        is also touched by data on one side of it (so it is allocated and
        filled with zeros either way), and the gathered write stays short."""
        unit = self._bridge_unit
        if not unit:
            return False
        if self._pending is not None:
            end = self._pending[1]
            length = (end - self._pending[0]) * SECTOR
        elif self._gathered_start is not None:
            end = self._gathered_start + self._gathered_len // SECTOR
            length = 0
        else:
            return False
        if sector < end:
            return False
        length += self._gathered_len
        if length + (sector - end) * SECTOR > BRIDGE_BYTES:
            return False
        gap_start, gap_end = end * SECTOR, sector * SECTOR
        if gap_start == gap_end:
            return True
        first, last = gap_start // unit, (gap_end - 1) // unit
        sides = ((gap_start - 1) // unit, gap_end // unit)
        return last - first <= 1 and first in sides and last in sides

    def _gather(self, upto: int) -> None:
        """Move the pending write into the gathered buffer (a copy: its
        buffer is reused), then zeros up to sector ``upto``. The caller
        keeps it within BRIDGE_BYTES."""
        pending = self._pending
        if self._gathered_start is None:
            self._gathered_start = pending[0] if pending is not None else upto
            self._gathered_len = 0
            if self._gathered is None:
                self._gathered = bytearray(BRIDGE_BYTES)
        buf, at = memoryview(self._gathered), self._gathered_len
        if pending is not None:
            self._pending = None
            start, end, data, first = pending
            n = (end - start) * SECTOR
            buf[at:at + n] = memoryview(data)[first * SECTOR:first * SECTOR + n]
            self._gathered_data += n
            at += n
        stop = (upto - self._gathered_start) * SECTOR
        if stop > at:
            buf[at:stop] = bytes(stop - at)
            at = stop
        self._gathered_len = at

    def _end_batch(self) -> None:
        """The batch buffer is about to be reused: keep a short pending
        write for bridging (copied), else write."""
        pending = self._pending
        if pending is not None and self._bridge_unit and \
                self._gathered_len + (pending[1] - pending[0]) * SECTOR <= BRIDGE_BYTES and \
                (pending[1] - pending[0]) * SECTOR < BRIDGE_BYTES // 4:
            self._gather(pending[1])
        else:
            self._flush_writes()

    def _flush_writes(self) -> None:
        if self._gathered_start is not None:
            start, length = self._gathered_start, self._gathered_len
            self._gathered_start, self._gathered_len = None, 0
            self._write_out(start, memoryview(self._gathered)[:length], self._gathered_data)
            self._gathered_data = 0
        pending = self._pending
        if pending is not None:
            self._pending = None
            start, end, data, first = pending
            view = memoryview(data)[first * SECTOR:(first + end - start) * SECTOR]
            self._write_out(start, view, len(view))

    def _write_out(self, sector: int, view, data_bytes: int) -> None:
        try:
            self.target.write(sector * SECTOR, view)
        except ImageError as err:
            raise Reported(f"error while writing at byte {sector * SECTOR}: {err}") from None
        self.stats.data_bytes_written += data_bytes

    def _zero(self, sector: int, n: int, writer) -> None:
        self.stats.zero_bytes += n * SECTOR
        if self.has_zero_init:
            return
        self._flush_writes()
        if writer is not None:
            writer.drain()
        try:
            self.target.write_zeroes(sector * SECTOR, n * SECTOR, unmap=True)
        except ImageError as err:
            raise Reported(f"error while writing at byte {sector * SECTOR}: {err}") from None

    def _throttle(self, nbytes: int) -> None:
        if not self.job.rate_limit:
            return
        self._rate_bytes += nbytes
        due = self._rate_start + self._rate_bytes / self.job.rate_limit
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)


class _Runs:
    """Where the writes of one run of adjacent data chunks end.

    A run is what earlier versions read as one batch: adjacent data chunks,
    at most BATCH_SECTORS from its first. At each run's end the copier
    decides whether the pending write is kept for gathering or written
    (:meth:`Copier._end_batch`); deciding at exactly these places keeps
    the writes, and so the image layout, as they were before batches held
    several runs. The reader and the writer each follow the runs with one
    of these.
    """

    __slots__ = ("end", "count", "ended")

    def __init__(self) -> None:
        self.end = -1                 # sector after the current run (-1: none)
        self.count = 0
        #: the last chunk noted ended a run (the chunk before it was its last)
        self.ended = False

    def data(self, sector: int, n: int) -> bool:
        """Note a data chunk; True if it starts a new run."""
        more = self.end == sector and self.count + n <= BATCH_SECTORS
        self.ended = self.end >= 0 and not more
        self.count = self.count + n if more else n
        self.end = sector + n
        return not more

    def other(self) -> None:
        """Note a zero chunk (it ends the current run, if any)."""
        self.ended = self.end >= 0
        self.end = -1


class _Prefetch:
    """The second pass over the chunks, run ahead in a thread.

    It walks the sources' block status again (qemu-img's copy pass; the
    first when there is no progress to show) and hands the main thread, in
    guest order, batches ``(buffer, [(sector, n, status, at), ...], heads)``:
    the data chunks of a batch are read into the reused ``buffer`` (at
    sector ``at``; adjacent ones with one read), zero chunks only listed
    (``buffer`` is None when a batch has no data); ``heads`` are the
    buffer's sector heads (:func:`~imagetools.ops.zeroscan.sector_heads`)
    or None. A batch holds whole runs (see
    :class:`_Runs`) and ends when its buffer has no room for another or it
    holds MAX_ITEMS chunks, so a fragmented image's short data runs between
    holes cost one hand-over per few MiB, not one each. Reading and writing
    are system calls that release the GIL, so the next batch is read while
    the current one is scanned and written (qemu-img gets the same overlap
    from its I/O threads). While reads are slow (data not in the page
    cache), a batch's host ranges are announced to the kernel before they
    are read (see :meth:`_advise`). Nothing is kept per chunk beyond a batch, so
    memory does not grow with the image, and only the reader thread
    touches the sources.
    """

    #: most chunks in one batch (bounds the list of a sparse image's zero runs)
    MAX_ITEMS = 4096

    def __init__(self, copier: "Copier", size: int, plan=None, depth: int = 2) -> None:
        import queue
        import threading
        self.free: "queue.Queue" = queue.Queue()
        self.ready: "queue.Queue" = queue.Queue(maxsize=64)
        # buffers are made on demand (zero-filling memory costs time)
        self._size = size
        self._spare = depth + 1
        self._stop = False
        self._copier = copier
        self._plan = plan
        #: sectors counted for progress (DATA, and ZERO with -S 0), as the first pass
        self.allocated = 0
        #: the read error that ended the batches (raised once what came
        #: before it is written)
        self.error: BaseException | None = None
        self._hint_fds: dict[str, int] = {}
        self._slow = False                    # see _advise
        self._batches = 0
        self._thread = threading.Thread(target=self._work, daemon=True, name="qimg-reader")
        self._thread.start()

    def _put(self, item) -> bool:
        import queue
        while not self._stop:
            try:
                self.ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _buffer(self) -> bytearray | None:
        import queue
        if self._spare and self.free.empty():
            self._spare -= 1
            return bytearray(self._size)
        while not self._stop:
            try:
                return self.free.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    def _work(self) -> None:
        try:
            self._walk()
        except BaseException as err:          # handed to the main thread
            self._put(("error", err))

    def _walk(self) -> None:
        copier = self._copier
        room = self._size // SECTOR
        plan = self._plan if self._plan is not None else copier.chunks()
        files = copier.hint_files
        counted = copier.counted
        buf = None
        items: list[tuple[int, int, int, int]] = []
        spans: list[list[int]] = []   # [first, end) of items read with one request
        hints: list[tuple[str, int, int]] = []
        used = 0                      # sectors of buf taken
        run = _Runs()
        try:
            for sector, n, status, file, host in plan:
                if self._stop:
                    return
                if status in counted:
                    self.allocated += n
                if status == BLK_BACKING_FILE:
                    continue
                if status != BLK_DATA:
                    run.other()
                    if len(items) >= self.MAX_ITEMS:
                        if not self._hand_over(buf, items, spans, hints, used):
                            return
                        buf, items, spans, hints, used = None, [], [], [], 0
                    items.append((sector, n, status, 0))
                    continue
                # a new run must fit whole (see _Runs)
                if run.data(sector, n) and (used + BATCH_SECTORS > room or
                                            len(items) >= self.MAX_ITEMS):
                    if not self._hand_over(buf, items, spans, hints, used):
                        return
                    buf, items, spans, hints, used = None, [], [], [], 0
                if buf is None:
                    buf = self._buffer()
                    if buf is None:
                        return
                last = len(items)
                if spans and spans[-1][1] == last and items[-1][0] + items[-1][1] == sector:
                    spans[-1][1] = last + 1
                else:
                    spans.append([last, last + 1])
                if file >= 0:
                    hints.append((files[file], host, n * SECTOR))
                items.append((sector, n, status, used))
                used += n
            if items and not self._hand_over(buf, items, spans, hints, used):
                return
            self._put(("end", None))
        finally:
            for fd in self._hint_fds.values():
                if fd >= 0:
                    os.close(fd)

    def _hand_over(self, buf, items: list, spans: list, hints: list, used: int) -> bool:
        """Read the batch's data (``used`` sectors of ``buf``) and pass it
        on, with the first word of each sector where the copier looks for
        zero sectors (taken here, off the writing thread: 15 ms of 1 GiB
        qcow2 -> raw). If a read fails, the chunks before the failing
        request are still passed on first (without heads), so that
        everything before the failing chunk is written."""
        advised = self._advise(hints)
        started = time.monotonic()
        for first, end in spans:
            start, _, _, at = items[first]
            count = items[end - 1][0] + items[end - 1][1] - start
            view = memoryview(buf)[at * SECTOR:(at + count) * SECTOR]
            try:
                self._copier.read_into(start, count, view,
                                       [(sector, n) for sector, n, _, _ in items[first:end]])
            except BaseException:
                if first:
                    self._put(("batch", (buf, items[:first], None)))
                raise
        if hints and not advised:
            # reads slower than the page cache gives: the data comes from disk
            budget = 30e-6 * len(hints) + sum(h[2] for h in hints) / 1e9
            self._slow = time.monotonic() - started > budget
        heads = sector_heads(buf, used) if buf is not None and self._copier.scan else None
        return self._put(("batch", (buf, items, heads)))

    def _advise(self, hints: list[tuple[str, int, int]]) -> bool:
        """Tell the kernel which host ranges the batch reads next
        (POSIX_FADV_WILLNEED), so that ranges not in the page cache are read
        from disk together rather than one request at a time, as qemu-img's
        parallel requests are. A hint only: a failure changes nothing.

        Hinting ranges that are in the page cache costs more than reading
        them (a 50,000-cluster image: 1.9 s against 1.1 s), so hints are
        given only while reads are slow, measured on every eighth batch.
        """
        self._batches += 1
        if not hints or not self._slow or self._batches % 8 == 0:
            return False
        fds = self._hint_fds
        hints.sort()
        name, start, length = hints[0]
        for nxt_name, nxt_start, nxt_length in hints[1:] + [("", -1, 0)]:
            if nxt_name == name and nxt_start == start + length:
                length += nxt_length
                continue
            fd = fds.get(name)
            if fd is None:
                try:
                    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
                except (OSError, ValueError):
                    fd = -1
                fds[name] = fd
            if fd >= 0:
                try:
                    os.posix_fadvise(fd, start, length, os.POSIX_FADV_WILLNEED)
                except OSError:
                    pass
            name, start, length = nxt_name, nxt_start, nxt_length
        return True

    def __iter__(self):
        while True:
            kind, item = self.ready.get()
            if kind == "end":
                return
            if kind == "error":
                self.error = item
                return
            yield item

    def release(self, buf: bytearray) -> None:
        self.free.put(buf)

    def close(self) -> None:
        import queue
        self._stop = True
        while self._thread.is_alive():
            try:
                self.ready.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()


def pad_to_sector(filename: str) -> None:
    """qemu-img ends a compressed image at a whole sector: pad the closed file."""
    try:
        fd = os.open(filename, os.O_WRONLY)
    except OSError:
        return
    try:
        st = os.fstat(fd)
        import stat
        if stat.S_ISREG(st.st_mode) and st.st_size % SECTOR:
            os.ftruncate(fd, st.st_size + SECTOR - st.st_size % SECTOR)
    finally:
        os.close(fd)


def _pow2floor(value: int) -> int:
    return 1 << (value.bit_length() - 1) if value > 0 else 0


class _CompressedWriter:
    """Compress clusters in worker threads, store them in guest order."""

    def __init__(self, target) -> None:
        from concurrent.futures import ThreadPoolExecutor
        self.target = target
        self.compress = target.compressor()
        workers = max(1, min(8, os.cpu_count() or 1))
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qimg-zlib")
        self.window = workers * 4
        from collections import deque
        self.pending: deque = deque()
        self.clusters = 0

    def submit(self, offset: int, data) -> None:
        data = bytes(data)          # the caller reuses its buffer
        self.pending.append((offset, data, self.pool.submit(self.compress, data)))
        while len(self.pending) > self.window:
            self._store_one()

    def _store_one(self) -> None:
        offset, data, future = self.pending.popleft()
        blob = future.result()
        try:
            self.target.write_compressed_blob(offset, blob, len(data), data)
        except ImageError as err:
            raise Reported(f"error while writing at byte {offset}: {err}") from None
        self.clusters += 1

    def drain(self) -> None:
        while self.pending:
            self._store_one()

    def finish(self) -> None:
        try:
            self.drain()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
