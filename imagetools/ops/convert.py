"""``qimg convert``: copy one or more images into a new (or existing) image.

    convert [--object objectdef] [--image-opts] [--target-image-opts]
            [--target-is-zero] [--bitmaps] [-U] [-C] [-c] [-p] [-q] [-n]
            [-f fmt] [-t cache] [-T src_cache] [-O output_fmt]
            [-B backing_file [-F backing_fmt]] [-o options] [-l snapshot_param]
            [-S sparse_size] [-r rate_limit] [-m num_coroutines] [-W] [--salvage]
            filename [filename2 [...]] output_filename

This module is the command line: option checks in qemu-img's order and
with its messages, then :func:`imagetools.ops.copy.convert` does the work.
"""

from __future__ import annotations

from imagetools.ops.args import Getopt, show_help
from imagetools.output import Reported

LONG = [("help", 0, "h"), ("object", 1, "object"), ("image-opts", 0, "image-opts"),
        ("force-share", 0, "U"), ("target-image-opts", 0, "target-image-opts"),
        ("salvage", 0, "salvage"), ("target-is-zero", 0, "target-is-zero"),
        ("bitmaps", 0, "bitmaps"), ("skip-broken-bitmaps", 0, "skip-broken-bitmaps")]

MAX_BUF_SECTORS = 32768
MAX_COROUTINES = 16


def main(argv: list[str]) -> int:
    from imagetools.ops.copy import ConvertJob
    job = ConvertJob()
    explicit_sparse = False
    scan = Getopt(argv, ":hf:O:B:CcF:o:l:S:pt:T:qnm:WUr:", LONG)
    from imagetools.sizes import cvtnum
    for opt, arg in scan:
        if opt == "h":
            return show_help()
        if opt == "f":
            job.src_fmt = arg
        elif opt == "O":
            job.out_fmt = arg
        elif opt == "B":
            job.backing_file = arg
        elif opt == "C":
            job.copy_range = True
        elif opt == "c":
            job.compress = True
        elif opt == "F":
            job.backing_fmt = arg
        elif opt == "o":
            from imagetools.ops.create import add_option_list
            job.options = add_option_list(job.options, arg)
        elif opt == "l":
            job.snapshot = parse_snapshot_param(arg)
        elif opt == "S":
            value = cvtnum("buffer size for sparse output", arg)
            if value % 512 or value // 512 > MAX_BUF_SECTORS:
                raise Reported("Invalid buffer size for sparse output specified. Valid sizes "
                               f"are multiples of 512 up to {MAX_BUF_SECTORS * 512}. Select 0 "
                               "to disable sparse detection (fully allocates output).")
            job.min_sparse = value // 512
            explicit_sparse = True
        elif opt == "p":
            job.progress = True
        elif opt == "t":
            job.cache = arg
        elif opt == "T":
            job.src_cache = arg
        elif opt == "q":
            job.quiet = True
        elif opt == "n":
            job.skip_create = True
        elif opt == "m":
            job.coroutines = _coroutines(arg)
        elif opt == "W":
            job.in_order = False
        elif opt == "U":
            job.force_share = True
        elif opt == "r":
            job.rate_limit = cvtnum("rate limit", arg)
        elif opt == "image-opts":
            job.image_opts = True
        elif opt == "target-image-opts":
            job.target_image_opts = True
        elif opt == "salvage":
            job.salvage = True
        elif opt == "target-is-zero":
            job.target_is_zero = True
        elif opt == "bitmaps":
            job.bitmaps = True
        elif opt == "skip-broken-bitmaps":
            job.skip_broken_bitmaps = True
    if job.out_fmt is None and not job.target_image_opts:
        job.out_fmt = "raw"
    _check_combinations(job, explicit_sparse)
    rest = scan.operands
    job.target = rest[-1] if rest else None
    job.sources = rest[:-1]
    from imagetools.ops import options as opts_mod
    if job.options is not None and opts_mod.wants_help(job.options):
        if job.out_fmt is None:
            raise Reported("Option help requires a format be specified")
        return opts_mod.print_help(job.out_fmt, job.target)
    if not job.sources:
        raise Reported("Must specify image file name")
    from imagetools.ops.common import check_cache
    check_cache(job.src_cache, source=True)
    from imagetools.ops.copy import run_cli
    return run_cli(job)


def _coroutines(text: str) -> int:
    from imagetools.sizes import SizeError, strtou64
    try:
        value, end = strtou64(text, 0)
    except SizeError:
        value, end = 0, -1
    if end != len(text) or not 1 <= value <= MAX_COROUTINES:
        raise Reported("Invalid number of coroutines. Allowed number of coroutines is "
                       f"between 1 and {MAX_COROUTINES}")
    return value


def _check_combinations(job, explicit_sparse: bool) -> None:
    if job.skip_broken_bitmaps and not job.bitmaps:
        raise Reported("Use of --skip-broken-bitmaps requires --bitmaps")
    if job.compress and job.copy_range:
        raise Reported("Cannot enable copy offloading when -c is used")
    if explicit_sparse and job.copy_range:
        raise Reported("Cannot enable copy offloading when -S is used")
    if job.copy_range and job.salvage:
        raise Reported("Cannot use copy offloading in salvaging mode")
    if job.target_image_opts and not job.skip_create:
        raise Reported("--target-image-opts requires use of -n flag")
    if job.skip_create and job.options is not None:
        raise Reported("-o has no effect when skipping image creation")
    if job.target_is_zero and not job.skip_create:
        raise Reported("--target-is-zero requires use of -n flag")


def parse_snapshot_param(text: str) -> tuple[str | None, str | None] | str:
    """``-l``: ``snapshot.id=ID,snapshot.name=NAME`` (a pair) or an ID-or-name string."""
    if not text.startswith("snapshot."):
        return text
    from imagetools.ops.options import split_options
    found: dict[str, str] = {}
    for name, value, _ in split_options(text):
        if name not in ("snapshot.id", "snapshot.name"):
            raise Reported(f"Invalid parameter '{name}'",
                           f"Failed in parsing snapshot param '{text}'")
        found[name] = value
    return (found.get("snapshot.id"), found.get("snapshot.name"))
