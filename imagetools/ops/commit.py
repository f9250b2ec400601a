"""``qimg commit``: write an overlay's changes into its backing file (qemu-img commit).

    commit [--object objectdef] [--image-opts] [-q] [-f fmt] [-t cache]
           [-b base] [-r rate_limit] [-d] [-p] filename

What qemu-img 7.2 does (an "active commit" block job):

* the base is the image's backing file, or with ``-b`` any image further
  down the chain (found by QEMU's rule: the name is taken relative to each
  overlay's directory and compared by real path); ``-b`` implies ``-d``;
* every range allocated above the base (in the image or the images between)
  is copied into the base, rounded to the base's cluster size (at least
  4 KiB); ranges that read as zeros go in as zero writes where they cover
  whole base clusters; a base smaller than the image is grown first;
* the base is flushed, then, unless ``-d``, the image is emptied so that it
  shows the base again (qcow2: reset to a fresh image where QEMU does that).

Interrupted at any point, the image still shows the same data: the ranges
being copied are covered by the image itself until the copy is complete and
flushed, and the image is emptied only after that.
"""

from __future__ import annotations

import os
import sys
import time

from imagetools.errors import UnsupportedError
from imagetools.ops.args import Getopt, show_help, usage_error
from imagetools.output import Reported

LONG = [("help", 0, "h"), ("object", 1, "object"), ("image-opts", 0, "image-opts")]

CHUNK = 1 << 20             # QEMU's mirror buffer: one request at most this big


def main(argv: list[str]) -> int:
    fmt = base_name = None
    cache = "writeback"
    drop = progress = quiet = image_opts = False
    rate = 0
    scan = Getopt(argv, ":f:ht:b:dpqr:", LONG)
    for opt, arg in scan:
        if opt == "h":
            return show_help()
        if opt == "f":
            fmt = arg
        elif opt == "t":
            cache = arg
        elif opt == "b":
            base_name, drop = arg, True
        elif opt == "d":
            drop = True
        elif opt == "p":
            progress = True
        elif opt == "q":
            quiet = True
        elif opt == "r":
            from imagetools.sizes import cvtnum
            rate = cvtnum("rate limit", arg)
        elif opt == "image-opts":
            image_opts = True
    if quiet:
        progress = False
    rest = scan.operands
    if len(rest) != 1:
        raise usage_error("Expecting one image file name")
    filename = rest[0]
    from imagetools.ops.common import CACHE_MODES, open_image
    if cache not in CACHE_MODES:
        raise Reported(f"Invalid cache option: {cache}")
    top = open_image(filename, fmt, read_only=False, image_opts=image_opts, cache=cache)
    from imagetools.progress import Progress
    meter = Progress(progress, 1.0)
    try:
        meter.print(0.0, 100)
        parent = find_base_parent(top, filename, base_name)
        commit(top, parent, cache=cache, drop=drop, rate=rate, progress=meter)
    finally:
        meter.end()
        top.close()
    if not quiet:
        sys.stdout.write("Image committed.\n")
    return 0


# -- finding the base -------------------------------------------------------------

def find_base_parent(top, filename: str, base_name: str | None):
    """The image whose backing file is the base (``-b`` or the backing file)."""
    if base_name is None:
        if top.backing is None:
            raise Reported("Image does not have a backing file")
        return top
    parent = find_in_chain(top, base_name)
    if parent is None:
        raise Reported(f"Did not find '{base_name}' in the backing chain of '{filename}'")
    return parent


def find_in_chain(top, name: str):
    """QEMU's bdrv_find_backing_image: the image whose backing file ``name`` is
    (taken relative to that image's directory, compared by real path), or None."""
    from imagetools.image import path_has_protocol, resolve_backing_path
    node = top
    while node.backing is not None:
        recorded = node.backing_filename or ""
        if path_has_protocol(name) or path_has_protocol(recorded):
            if name in (recorded, resolve_backing_path(node.filename, recorded)):
                return node
        else:
            wanted = _real(name if name.startswith("/") else
                           os.path.join(os.path.dirname(node.filename), name))
            actual = _real(resolve_backing_path(node.filename, recorded))
            if wanted is not None and wanted == actual:
                return node
        node = node.backing
    return None


def _real(path: str) -> str | None:
    """C realpath(): None when the file does not exist."""
    return os.path.realpath(path) if os.path.exists(path) else None


# -- the copy -----------------------------------------------------------------------

def commit(top, parent, *, cache: str = "writeback", drop: bool = False, rate: int = 0,
           progress=None) -> None:
    """Copy what lies above ``parent.backing`` into it, then empty ``top``."""
    from imagetools.image import reopen_backing_read_write
    depth = 1
    node = top
    while node is not parent:
        node = node.backing
        depth += 1
    base = reopen_backing_read_write(parent, cache)
    if top.size > base.size:
        base.truncate(top.size)
    runs = dirty_ranges(top, depth, _granularity(base), top.size)
    total = sum(end - start for start, end in runs)
    copier = _Copier(top, base, rate)
    done = 0
    for start, end in runs:
        pos = start
        while pos < end:
            stop = min(end, pos + CHUNK)
            copier.copy(pos, stop)
            done += stop - pos
            if progress is not None:
                progress.print(done * 100.0 / total if total else 100.0, 0)
            pos = stop
    base.flush()
    if progress is not None:
        progress.print(100.0, 0)
    if not drop:
        try:
            top.make_empty()
        except UnsupportedError:
            pass                      # qemu-img ignores ENOTSUP here
        top.flush()


def _granularity(base) -> int:
    """QEMU's default dirty-bitmap granularity for the target."""
    cs = base.cluster_size
    return max(4096, cs) if cs else 65536


def dirty_ranges(top, depth: int, granularity: int, size: int) -> list[tuple[int, int]]:
    """Ranges allocated above depth ``depth``, rounded out to ``granularity``."""
    out: list[list[int]] = []
    for ext in top.block_status(0, size):
        if not ext.present or ext.depth >= depth:
            continue
        start = ext.start // granularity * granularity
        end = min(size, -(-ext.end // granularity) * granularity)
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(s, e) for s, e in out]


class _Copier:
    """Moves guest ranges of the top image into the base (data, or zeros)."""

    def __init__(self, top, base, rate: int) -> None:
        self.top = top
        self.base = base
        self.rate = rate
        self.started = time.monotonic()
        self.moved = 0
        self.zero_align = base.cluster_size or 512
        self.files = {}
        for node in top.chain():
            for f in node.host_files():
                self.files[f.filename] = f
            self.files.setdefault(node.filename, getattr(node, "file", None))

    def copy(self, start: int, end: int) -> None:
        for ext in self._status(start, end):
            s, e = ext.start, ext.end
            if ext.zero and not ext.data:
                if s % self.zero_align == 0 and (e % self.zero_align == 0 or e == self.base.size):
                    self.base.write_zeroes(s, e - s, unmap=True)
                    self._settle()
                else:
                    self._write(s, bytes(e - s))
            else:
                self._copy_data(ext)
            self._throttle(e - s)

    def _status(self, start: int, end: int):
        """Block status as QEMU's mirror sees it: a qcow2 image answers for at
        most one L2 table, so runs end at the L2 boundaries of every image
        from the top down to the one that answers (this decides whether a
        zero run covers whole base clusters)."""
        from imagetools.ops.common import l2_span
        spans = [l2_span(node) for node in self.top.chain()]
        for ext in self.top.block_status(start, end - start):
            cuts = {s for s in spans[:ext.depth + 1] if s}
            pos = ext.start
            while pos < ext.end:
                stop = min([ext.end] + [(pos // s + 1) * s for s in cuts])
                yield ext.clipped(pos, stop) if (pos, stop) != (ext.start, ext.end) else ext
                pos = stop

    def _copy_data(self, ext) -> None:
        src = self.files.get(ext.filename) if ext.offset is not None and not ext.compressed \
            else None
        if src is not None and getattr(src, "fd", -1) >= 0:
            self.base.write_from_fd(ext.start, ext.length, src.fd, ext.offset)
            return
        pos = ext.start
        while pos < ext.end:
            n = min(4 << 20, ext.end - pos)
            self._write(pos, self.top.read(pos, n))
            pos += n

    def _settle(self) -> None:
        """Clusters a zero write freed become reusable now (as in QEMU, where the
        next allocation takes them); their L2 tables are written first."""
        refcounts = getattr(self.base, "refcounts", None)
        if refcounts is not None and refcounts.pending_free:
            self.base.flush()

    def _write(self, offset: int, data: bytes) -> None:
        self.base.write(offset, data)

    def _throttle(self, nbytes: int) -> None:
        if not self.rate:
            return
        self.moved += nbytes
        due = self.moved / self.rate - (time.monotonic() - self.started)
        if due > 0:
            time.sleep(due)
