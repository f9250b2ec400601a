"""``qimg check``: consistency check of an image (qemu-img check).

    check [--object objectdef] [--image-opts] [-q] [-f fmt] [--output=ofmt]
          [-r [leaks | all]] [-T src_cache] [-U] filename

The driver finds the problems (``Driver.check()``; ``Driver.repair()`` for
``-r leaks|all``, followed by a second check as in qemu-img) and says what
it found per cluster; this module prints those
lines on stderr, the summary on stdout (human or JSON) and exits as
qemu-img does: 0 clean, 2 corruptions, 3 leaks only, 1 the check could not
be completed, 63 the format has no check.
"""

from __future__ import annotations

import sys
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

from imagetools.ops.args import Getopt, show_help, usage_error
from imagetools.output import Reported

LONG = [("help", 0, "h"), ("format", 1, "f"), ("repair", 1, "r"), ("output", 1, "output"),
        ("object", 1, "object"), ("image-opts", 0, "image-opts"), ("force-share", 0, "U")]

COUNTERS = ("check_errors", "corruptions", "leaks", "corruptions_fixed", "leaks_fixed",
            "image_end_offset", "total_clusters", "allocated_clusters",
            "fragmented_clusters", "compressed_clusters")


def main(argv: list[str]) -> int:
    fmt = output = repair = None
    cache = "writeback"
    quiet = force_share = image_opts = False
    scan = Getopt(argv, ":hf:r:T:qU", LONG)
    for opt, arg in scan:
        if opt == "h":
            return show_help()
        if opt == "f":
            fmt = arg
        elif opt == "r":
            if arg not in ("leaks", "all"):
                raise usage_error("Unknown option value for -r (expecting 'leaks' or 'all'): "
                                  + arg)
            repair = arg
        elif opt == "output":
            output = arg
        elif opt == "T":
            cache = arg
        elif opt == "q":
            quiet = True
        elif opt == "U":
            force_share = True
        elif opt == "image-opts":
            image_opts = True
    rest = scan.operands
    if len(rest) != 1:
        raise usage_error("Expecting one image file name")
    filename = rest[0]
    from imagetools.ops.common import check_cache, open_image, output_format
    mode = output_format(output)
    check_cache(cache, source=True)
    if repair is not None:
        drv, result = repair_image(filename, fmt, repair, force_share=force_share,
                                   image_opts=image_opts, quiet=quiet or mode == "json")
    else:
        drv = open_image(filename, fmt, read_only=True, force_share=force_share,
                         image_opts=image_opts, check=True)
        try:
            result = run_check(drv)
        finally:
            drv.close()
    failed = getattr(result, "failed", None)
    if failed:
        # the check could not complete (e.g. vmdk's "points after EOF"): no summary
        raise Reported(*getattr(result, "failed_lines", ()), f"Check failed: {failed}")
    report = image_check(result, filename, drv.format_name)
    if not quiet:
        sys.stdout.write(to_json(report) + "\n" if mode == "json" else human(report))
    if report["check-errors"]:
        raise Reported("Check failed")
    if report.get("corruptions"):
        return 2
    if report.get("leaks"):
        return 3
    return 0


def repair_image(filename: str, fmt: str | None, repair: str, *, force_share: bool,
                 image_opts: bool, quiet: bool):
    """check -r: repair (opened read-write in QEMU's check mode), say what was
    fixed, then check again; the second result carries the fixed counts."""
    import os
    from imagetools import image
    from imagetools.errors import ImageError
    from imagetools.ops.common import open_error, parse_image_opts
    if force_share:
        raise Reported(f"Could not open '{filename}': force-share=on can only be used with "
                       "read-only images")
    path = filename
    if image_opts:
        path, fmt = parse_image_opts(filename, fmt)
    try:
        drv = image.open_image(path, fmt, read_only=False, check=True)
    except ImageError as err:
        raise open_error(filename, err) from None
    try:
        first = run_check(drv, repair)
        if getattr(first, "repair_errno", None):
            raise Reported(f"Check failed: {os.strerror(first.repair_errno)}")
        if not (first.leaks_fixed or first.corruptions_fixed):
            return drv, first
        if not quiet:
            sys.stdout.write("The following inconsistencies were found and repaired:\n\n"
                             f"    {first.leaks_fixed} leaked clusters\n"
                             f"    {first.corruptions_fixed} corruptions\n\n"
                             "Double checking the fixed image now...\n")
        result = run_check(drv)
        result.leaks_fixed, result.corruptions_fixed = first.leaks_fixed, first.corruptions_fixed
        return drv, result
    finally:
        drv.close()


def run_check(drv, repair: str | None = None):
    """Run the driver's check (or repair) and print its per-cluster lines on stderr."""
    result = drv.check() if repair is None else drv.repair(repair)
    lines = [line if line.endswith("\n") else line + "\n"
             for line in getattr(result, "messages", ()) or ()]
    sys.stderr.write("".join(lines))        # one write: stderr writes through
    sys.stderr.flush()
    return result


def image_check(result, filename: str, fmt: str) -> dict[str, Any]:
    """qemu-img's ImageCheck members, inserted in schema order, zeros omitted."""
    values = {name: int(getattr(result, name, 0) or 0) for name in COUNTERS}
    out: dict[str, Any] = {"filename": filename, "format": fmt,
                           "check-errors": values["check_errors"]}
    for name in COUNTERS[1:]:
        if values[name]:
            out[name.replace("_", "-")] = values[name]
    return out


def to_json(report: dict[str, Any]) -> str:
    from imagetools.output import to_json as render
    return render(report)


def human(report: dict[str, Any]) -> str:
    """The human summary qemu-img prints on stdout."""
    corruptions = report.get("corruptions", 0)
    leaks = report.get("leaks", 0)
    errors = report.get("check-errors", 0)
    out = []
    if not (corruptions or leaks or errors):
        out.append("No errors were found on the image.\n")
    else:
        if corruptions:
            out.append(f"\n{corruptions} errors were found on the image.\n"
                       "Data may be corrupted, or further writes to the image may corrupt it.\n")
        if leaks:
            out.append(f"\n{leaks} leaked clusters were found on the image.\n"
                       "This means waste of disk space, but no harm to data.\n")
        if errors:
            out.append(f"\n{errors} internal errors have occurred during the check.\n")
    total = report.get("total-clusters", 0)
    allocated = report.get("allocated-clusters", 0)
    if total and allocated:
        out.append("%d/%d = %0.2f%% allocated, %0.2f%% fragmented, %0.2f%% compressed clusters\n"
                   % (allocated, total, allocated * 100.0 / total,
                      report.get("fragmented-clusters", 0) * 100.0 / allocated,
                      report.get("compressed-clusters", 0) * 100.0 / allocated))
    if report.get("image-end-offset"):
        out.append(f"Image end offset: {report['image-end-offset']}\n")
    return "".join(out)
