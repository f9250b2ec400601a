"""``qimg rebase``: change the backing file of an image (qemu-img rebase).

    rebase [--object objectdef] [--image-opts] [-U] [-q] [-f fmt] [-t cache]
           [-T src_cache] [-p] [-u] -b backing_file [-F backing_fmt] filename

Safe mode (qemu-img 7.2's algorithm): wherever the image does not allocate
a range itself, the old and the new backing file are compared in 512-byte
sectors, in 2 MiB steps, and every sector where they differ is copied from
the old one into the image (as zeros where the old backing file has ended),
so the guest sees the same data afterwards. If the new backing file is part
of the current chain, only ranges allocated between the image and it can
differ. Then the header names the new backing file (``-b ""``: none). ``-u``
only rewrites the header and does not even open the old backing file.

Killed at any point, the image shows the same data: the copies only write
what the old backing file already showed, and the header changes last, in
one write.
"""

from __future__ import annotations

import errno
import operator
import os
import struct

from imagetools.errors import ImageError, ImageIOError, ImageOpenError
from imagetools.ops.args import Getopt, show_help, usage_error
from imagetools.output import Reported

LONG = [("help", 0, "h"), ("object", 1, "object"), ("image-opts", 0, "image-opts"),
        ("force-share", 0, "U")]

IO_BUF_SIZE = 2 << 20
SECTOR = 512


def main(argv: list[str]) -> int:
    fmt = out_base = out_fmt = None
    cache, src_cache = "writeback", "writeback"
    unsafe = progress = quiet = force_share = image_opts = False
    scan = Getopt(argv, ":hf:F:b:upt:T:qU", LONG)
    for opt, arg in scan:
        if opt == "h":
            return show_help()
        if opt == "f":
            fmt = arg
        elif opt == "F":
            out_fmt = arg
        elif opt == "b":
            out_base = arg
        elif opt == "u":
            unsafe = True
        elif opt == "p":
            progress = True
        elif opt == "t":
            cache = arg
        elif opt == "T":
            src_cache = arg
        elif opt == "q":
            quiet = True
        elif opt == "U":
            force_share = True
        elif opt == "image-opts":
            image_opts = True
    if quiet:
        progress = False
    rest = scan.operands
    if len(rest) != 1:
        raise usage_error("Expecting one image file name")
    if not unsafe and out_base is None:
        raise usage_error("Must specify backing file (-b) or use unsafe mode (-u)")
    from imagetools.progress import Progress
    meter = Progress(progress, 2.0)
    meter.print(0.0, 100)
    try:
        _rebase(rest[0], fmt, out_base, out_fmt, unsafe=unsafe, cache=cache,
                src_cache=src_cache, force_share=force_share, image_opts=image_opts,
                progress=meter)
    finally:
        meter.end()
    return 0


def _rebase(filename: str, fmt: str | None, out_base: str | None, out_fmt: str | None, *,
            unsafe: bool, cache: str, src_cache: str, force_share: bool, image_opts: bool,
            progress) -> None:
    from imagetools.ops.common import CACHE_MODES, known_format, open_image
    if cache not in CACHE_MODES:
        raise Reported(f"Invalid cache option: {cache}")
    if src_cache not in CACHE_MODES:
        raise Reported(f"Invalid source cache option: {src_cache}")
    top = open_image(filename, fmt, read_only=False, image_opts=image_opts,
                     open_backing=not unsafe, cache=cache)
    new = None
    try:
        if out_fmt is not None and not known_format(out_fmt):
            raise Reported(f"Invalid format name: '{out_fmt}'")
        if not unsafe:
            prefix, new = _new_backing(top, out_base, out_fmt, force_share)
            copy_differences(top, prefix, new, progress)
        _change(top, out_base, out_fmt)
        progress.print(100.0, 0)
    finally:
        if new is not None:
            new.close()
        top.close()


def _new_backing(top, out_base: str, out_fmt: str | None, force_share: bool):
    """(prefix, opened): the new backing file if it is in the current chain
    (``prefix``, depth counted from the image), else opened read-only."""
    if not out_base:
        return None, None
    from imagetools.image import open_image, resolve_backing_path
    from imagetools.ops.commit import find_in_chain
    real = resolve_backing_path(top.filename, out_base)
    parent = find_in_chain(top, real)
    if parent is not None:
        depth = 1
        node = top
        while node is not parent:
            node = node.backing
            depth += 1
        return (depth, parent.backing), None
    try:
        return None, open_image(real, out_fmt, read_only=True, force_share=force_share)
    except ImageError as err:
        reason = err.reason if isinstance(err, ImageOpenError) else str(err)
        raise Reported(f"Could not open new backing file '{out_base}': {reason}") from None


def copy_differences(top, prefix, new, progress=None) -> None:
    """Copy into ``top`` every sector its backing file shows differently from
    the new one, where ``top`` itself does not allocate (qemu-img's loop)."""
    old = top.backing
    size = top.size
    old_size = old.size if old is not None else 0
    target = prefix[1] if prefix is not None else new
    new_size = target.size if target is not None else 0
    step = 100.0 / (size // min(size, IO_BUF_SIZE)) if size else 0.0
    old_buf, new_buf = bytearray(IO_BUF_SIZE), bytearray(IO_BUF_SIZE)
    writeback = _Writeback(top)
    offset = 0
    # Past the end of both backing files both read zeros: nothing can differ.
    # qemu-img walks and compares there anyway (a 1 PiB overlay takes hours);
    # only its -p records need the walk, not the reads.
    zeros_from = max(old_size, new_size)
    end = size if progress is not None and progress.enabled else min(size, zeros_from)
    while offset < end:
        n = min(IO_BUF_SIZE, size - offset)
        allocated, n = _run(top, offset, n, lambda e: e.depth == 0 and e.present)
        if allocated:
            offset += n
            continue
        if prefix is not None:
            depth = prefix[0]
            above, n = _run(top, offset, n, lambda e: 0 < e.depth < depth and e.present)
            if not above:
                offset += n
                continue
        if offset >= zeros_from:
            progress.print(step, 100)
            offset += n
            continue
        old_is_zero = offset >= old_size
        if not old_is_zero:
            n = min(n, old_size - offset)
        if target is not None and offset < new_size:
            n = min(n, new_size - offset)
        buf_old = memoryview(old_buf)[:n]
        buf_new = memoryview(new_buf)[:n]
        if old_is_zero:
            buf_old[:] = bytes(n)
        else:
            _read("old", old.read_into, offset, buf_old)
        if target is None or offset >= new_size:
            buf_new[:] = bytes(n)
        else:
            _read("new", target.read_into, offset, buf_new)
        writeback.wrote(_write_differences(top, offset, old_buf, new_buf, n, old_is_zero))
        if progress is not None:
            progress.print(step, 100)
        offset += n


def _read(which: str, read, *args) -> None:
    """A read of the old or new backing file, failing with qemu-img's message."""
    try:
        read(*args)
    except ImageError:
        raise Reported(f"error while reading from {which} backing file") from None


def _run(top, offset: int, length: int, test) -> tuple[bool, int]:
    """(answer, bytes): how far from ``offset`` ``test`` of the block status
    stays the same -- as QEMU asks a qcow2 image, at most to the end of one L2
    table."""
    from imagetools.ops.common import l2_span
    span = l2_span(top)
    end = offset + length
    if span:
        end = min(end, (offset // span + 1) * span)
    answer = None
    pos = end
    for ext in top.block_status(offset, end - offset):
        value = bool(test(ext))
        if answer is None:
            answer = value
        elif value != answer:
            pos = ext.start
            break
    return bool(answer), pos - offset


def _write_differences(top, offset: int, old: bytearray, new: bytearray, length: int,
                       old_is_zero: bool) -> int:
    """qemu-img's compare_buffers walk: maximal runs of 512-byte sectors that
    differ are written (zeros where the old backing file ended). Returns
    how many bytes were written."""
    view = memoryview(old)
    written = 0
    for start, end in diff_runs(old, new, length):
        if old_is_zero:
            top.write_zeroes(offset + start, end - start)
        else:
            top.write(offset + start, view[start:end])     # written before it returns
        written += end - start
    return written


class _Writeback:
    """Has the kernel start writing ``top``'s dirty pages to disk every few
    MiB written (:meth:`HostFile.start_writeback`, which does not wait), so
    that the disk writes overlap the walk instead of all waiting for the
    flush at the end. Nothing about order or durability changes: the kernel
    may write a dirty page back at any time anyway, and the driver's
    flushes still come where they did.

    1 GiB overlay, about 90 MiB written: the first flush after the walk took
    about 40 ms, 1 ms with this."""

    EVERY = 8 << 20

    def __init__(self, top) -> None:
        files = (getattr(top, "file", None), getattr(top, "data_file", None))
        self.files = [f for f in files if hasattr(f, "start_writeback")]
        self.pending = 0

    def wrote(self, nbytes: int) -> None:
        self.pending += nbytes
        if self.pending >= self.EVERY:
            self.pending = 0
            for file in self.files:
                file.start_writeback()


DIFF_BLOCK = 64 << 10
_BLOCK_SECTORS = struct.Struct(f"{SECTOR}s" * (DIFF_BLOCK // SECTOR))


def diff_runs(old, new, length: int | None = None) -> list[tuple[int, int]]:
    """Maximal runs of 512-byte sectors (counted from the start; the last one
    may be short) where the first ``length`` bytes of the buffers differ.

    Equal buffers cost one comparison, equal 64 KiB blocks one each (none
    copies anything); in a block that differs, all its sectors are cut and
    compared in C (one struct unpack per buffer), which leaves a byte per
    sector that says whether it differs, and runs are found in that with
    ``find``."""
    if isinstance(old, memoryview):
        old = old.tobytes()
    if isinstance(new, memoryview):
        new = new.tobytes()
    n = len(old) if length is None else length
    if len(old) < n or len(new) < n:
        raise ValueError(f"diff_runs: buffers of {len(old)} and {len(new)} bytes, "
                         f"{n} to compare")
    view_new = memoryview(new)
    if old.startswith(view_new[:n]):       # the usual case, one memcmp
        return []
    runs: list[list[int]] = []
    for pos in range(0, n, DIFF_BLOCK):
        end = min(n, pos + DIFF_BLOCK)
        if old.startswith(view_new[pos:end], pos):
            continue
        flags = _differing_sectors(old, new, pos, end)
        i = flags.find(1)
        while i >= 0:
            j = flags.find(0, i)
            if j < 0:
                j = len(flags)
            start, stop = pos + i * SECTOR, min(end, pos + j * SECTOR)
            if runs and runs[-1][1] == start:
                runs[-1][1] = stop
            else:
                runs.append([start, stop])
            i = flags.find(1, j)
    return [(s, e) for s, e in runs]


def _differing_sectors(old, new, pos: int, end: int) -> bytes:
    """One byte per sector of ``[pos, end)``: 1 where the buffers differ."""
    if end - pos == DIFF_BLOCK:
        cut = _BLOCK_SECTORS
    else:                                  # the last block: whole sectors and a short one
        whole, short = divmod(end - pos, SECTOR)
        cut = struct.Struct(f"{SECTOR}s" * whole + (f"{short}s" if short else ""))
    return bytes(map(operator.ne, cut.unpack_from(old, pos), cut.unpack_from(new, pos)))


def _change(top, out_base: str | None, out_fmt: str | None) -> None:
    """Record the new backing file, with qemu-img's messages."""
    name = out_base or None
    try:
        if name is not None and not out_fmt:
            raise ImageIOError("Invalid argument", errno.EINVAL)
        top.change_backing_file(name, out_fmt if name else None)
    except ImageIOError as err:
        if err.errno == errno.ENOSPC:
            reason = "No space left in the file header"
        elif err.errno == errno.EINVAL and out_base is not None and not out_fmt:
            reason = "backing format must be specified"
        else:
            reason = os.strerror(err.errno) if err.errno else str(err)
        raise Reported(f"Could not change the backing file to '{_c_str(out_base)}': "
                       f"{reason}") from None
    except ImageError as err:
        raise Reported(f"Could not change the backing file to '{_c_str(out_base)}': "
                       f"{err}") from None


def _c_str(text: str | None) -> str:
    """What printf("%s") shows for the name (glibc prints a NULL as "(null)")."""
    return "(null)" if text is None else text
