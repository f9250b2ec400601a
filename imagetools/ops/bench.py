"""``qimg bench``: time a run of read or write requests (qemu-img bench).

    bench [-c count] [-d depth] [-f fmt] [--flush-interval=flush_interval]
          [-i aio] [-n] [--no-drain] [-o offset] [--pattern=pattern] [-q]
          [-s buffer_size] [-S step_size] [-t cache] [-w] [-U] filename

Requests go to the same offsets as qemu-img's (start at ``-o``, advance by
``-S``, wrap around the image) and, with ``--flush-interval``, a flush after
every N requests. Requests are issued one at a time (``-d`` is accepted and
reported). Like qemu-img, ``-q`` does not silence the two report lines.
"""

from __future__ import annotations

import sys
import time

from imagetools.errors import ImageError
from imagetools.ops.args import Getopt, show_help, usage_error
from imagetools.output import Reported

LONG = [("help", 0, "h"), ("flush-interval", 1, "flush-interval"),
        ("image-opts", 0, "image-opts"), ("pattern", 1, "pattern"),
        ("no-drain", 0, "no-drain"), ("force-share", 0, "U")]

INT_MAX = (1 << 31) - 1


def _ulong(text: str) -> int | None:
    """qemu_strtoul: the value, or None when the text is not a number."""
    from imagetools.sizes import SizeError, strtou64
    try:
        value, end = strtou64(text, 0)
    except SizeError:
        return None
    return value if end == len(text) else None


def main(argv: list[str]) -> int:
    from imagetools.sizes import cvtnum
    fmt = None
    count, depth, offset, bufsize, step = 75000, 64, 0, 4096, 0
    pattern = flush_interval = 0
    drain = True
    is_write = force_share = image_opts = False
    scan = Getopt(argv, ":hc:d:f:ni:o:qs:S:t:wU", LONG)
    for opt, arg in scan:
        if opt == "h":
            return show_help()
        if opt == "c":
            value = _ulong(arg)
            if value is None or value > INT_MAX:
                raise Reported("Invalid request count specified")
            count = value
        elif opt == "d":
            value = _ulong(arg)
            if value is None or value == 0 or value > INT_MAX:
                raise Reported("Invalid queue depth specified")
            depth = value
        elif opt == "f":
            fmt = arg
        elif opt == "n":
            pass
        elif opt == "i":
            if arg not in ("threads", "native", "io_uring"):
                raise Reported(f"Invalid aio option: {arg}")
        elif opt == "o":
            offset = cvtnum("offset", arg)
        elif opt == "q":
            pass
        elif opt == "s":
            bufsize = cvtnum("buffer size", arg, 0, INT_MAX)
        elif opt == "S":
            step = cvtnum("step_size", arg, 0, INT_MAX)
        elif opt == "t":
            from imagetools.ops.common import CACHE_MODES
            if arg not in CACHE_MODES:
                raise Reported("Invalid cache mode")
        elif opt == "w":
            is_write = True
        elif opt == "U":
            force_share = True
        elif opt == "pattern":
            value = _ulong(arg)
            if value is None or value > 0xFF:
                raise Reported("Invalid pattern byte specified")
            pattern = value
        elif opt == "flush-interval":
            value = _ulong(arg)
            if value is None or value > INT_MAX:
                raise Reported("Invalid flush interval specified")
            flush_interval = value
        elif opt == "no-drain":
            drain = False
        elif opt == "image-opts":
            image_opts = True
    rest = scan.operands
    if len(rest) != 1:
        raise usage_error("Expecting one image file name")
    if not is_write and flush_interval:
        raise Reported("--flush-interval is only available in write tests")
    if flush_interval and flush_interval < depth:
        raise Reported("Flush interval can't be smaller than depth")
    from imagetools.ops.common import open_image
    drv = open_image(rest[0], fmt, read_only=not is_write, force_share=force_share,
                     image_opts=image_opts)
    try:
        step = step or bufsize
        sys.stdout.write(f"Sending {count} {'write' if is_write else 'read'} requests, "
                         f"{bufsize} bytes each, {depth} in parallel (starting at offset "
                         f"{offset}, step size {step})\n")
        if flush_interval:
            sys.stdout.write(f"Sending flush every {flush_interval} requests\n")
        sys.stdout.flush()
        seconds = run(drv, count=count, depth=depth, offset=offset, bufsize=bufsize, step=step,
                      write=is_write, pattern=pattern, flush_interval=flush_interval,
                      drain=drain)
    finally:
        drv.close()
    sys.stdout.write("Run completed in %3.3f seconds.\n" % seconds)
    return 0


def offsets(count: int, offset: int, step: int, bufsize: int, image_size: int):
    """The request offsets qemu-img bench uses."""
    for _ in range(count):
        yield offset
        offset += step
        if image_size <= bufsize:
            offset = 0
        else:
            offset %= image_size - bufsize


def run(drv, *, count: int, depth: int, offset: int, bufsize: int, step: int, write: bool,
        pattern: int, flush_interval: int, drain: bool) -> float:
    """Issue the requests one after the other; seconds taken.

    The drivers are not thread-safe for writes, so requests are issued in
    order; ``depth`` only decides, as in qemu-img, that a flush waits for
    the requests before it (with ``drain``).
    """
    buf = bytes([pattern]) * bufsize
    size = drv.size
    started = time.monotonic()
    try:
        for n, at in enumerate(offsets(count, offset, step, bufsize, size), 1):
            if at + bufsize > size:
                raise Reported("Failed request: Input/output error")
            if write:
                drv.write(at, buf)
            else:
                drv.read(at, bufsize)
            if flush_interval and n % flush_interval == 0:
                drv.flush()
    except ImageError as err:
        if isinstance(err, Reported):
            raise
        raise Reported(f"Failed request: {err}") from None
    return time.monotonic() - started
