"""``qimg amend``: change format options of an existing image (qemu-img amend).

    amend [--object objectdef] [--image-opts] [-p] [-q] [-f fmt] [-t cache]
          [--force] -o options filename

As qemu-img 7.2: ``-o help`` lists the format's amend options; an option
that only creation knows is refused with qemu-img's hint; the options are
handed to the driver (``Driver.amend``) in the format's declared order, so
the same mistake is reported first; ``-p`` prints qemu-img's progress
records.
"""

from __future__ import annotations

import sys

from imagetools.ops.args import Getopt, show_help, usage_error
from imagetools.ops.options import BOOL, NUMBER, SIZE, STR, OptionDesc
from imagetools.output import Reported

LONG = [("help", 0, "h"), ("object", 1, "object"), ("image-opts", 0, "image-opts"),
        ("force", 0, "force")]

#: qcow2's amend options, in QEMU 7.2's declared order
QCOW2_AMEND = (
    OptionDesc("encrypt.state", STR, "Select new state of affected keyslots (active/inactive)"),
    OptionDesc("encrypt.keyslot", NUMBER, "Select a single keyslot to modify explicitly"),
    OptionDesc("encrypt.old-secret", STR, "Select all keyslots that match this password"),
    OptionDesc("encrypt.new-secret", STR,
               "New secret to set in the matching keyslots. Empty string to erase"),
    OptionDesc("encrypt.iter-time", NUMBER, "Time to spend in PBKDF in milliseconds"),
    OptionDesc("size", SIZE, "Virtual disk size"),
    OptionDesc("compat", STR, "Compatibility level (v2 [0.10] or v3 [1.1])"),
    OptionDesc("backing_file", STR, "File name of a base image"),
    OptionDesc("backing_fmt", STR, "Image format of the base image"),
    OptionDesc("data_file", STR, "File name of an external data file"),
    OptionDesc("data_file_raw", BOOL, "The external data file must stay valid as a raw image"),
    OptionDesc("lazy_refcounts", BOOL, "Postpone refcount updates"),
    OptionDesc("refcount_bits", NUMBER, "Width of a reference count entry in bits"),
)

AMEND_OPTIONS = {"qcow2": QCOW2_AMEND}


def main(argv: list[str]) -> int:
    fmt = options = None
    cache = "writeback"
    progress = quiet = image_opts = force = False
    scan = Getopt(argv, ":ho:f:t:pq", LONG)
    for opt, arg in scan:
        if opt == "h":
            return show_help()
        if opt == "o":
            from imagetools.ops.create import add_option_list
            options = add_option_list(options, arg)
        elif opt == "f":
            fmt = arg
        elif opt == "t":
            cache = arg
        elif opt == "p":
            progress = True
        elif opt == "q":
            quiet = True
        elif opt == "image-opts":
            image_opts = True
        elif opt == "force":
            force = True
    if options is None:
        raise usage_error("Must specify options (-o)")
    if quiet:
        progress = False
    from imagetools.progress import Progress
    meter = Progress(progress, 1.0)
    try:
        return _amend(scan.operands, fmt, options, cache=cache, image_opts=image_opts,
                      force=force, meter=meter)
    finally:
        meter.end()


def _amend(rest: list[str], fmt: str | None, options: str, *, cache: str, image_opts: bool,
           force: bool, meter) -> int:
    from imagetools.ops.options import wants_help
    if fmt is not None and wants_help(options):
        return print_help(fmt)
    if len(rest) != 1:
        raise Reported("Expecting one image file name")
    from imagetools.ops.common import CACHE_MODES, open_image
    if cache not in CACHE_MODES:
        raise Reported(f"Invalid cache option: {cache}")
    drv = open_image(rest[0], fmt, read_only=False, image_opts=image_opts, cache=cache)
    try:
        if wants_help(options):
            return print_help(drv.format_name)
        descs = AMEND_OPTIONS.get(drv.format_name)
        if descs is None:
            raise Reported(f"Format driver '{drv.format_name}' does not support option "
                           "amendment")
        values = parse(descs, drv.format_name, options)
        meter.print(0.0, 0)
        try:
            drv.amend(values, force=force,
                      progress=lambda done, total: meter.print(
                          100.0 * done / total if total else 0.0, 0))
        finally:
            meter.print(100.0, 0)             # qemu-img prints it even after an error
    finally:
        drv.close()
    return 0


def parse(descs, fmt: str, text: str) -> dict:
    """The typed amend options in declared order; creation-only options get
    qemu-img's hint."""
    from imagetools.ops.options import Options, format_options
    try:
        opts = Options(descs).parse(text)
    except Reported as err:
        create = format_options(fmt) or ()
        names = {d.name for d in descs}
        try:
            Options(descs + tuple(d for d in create if d.name not in names)).parse(text)
        except Reported:
            raise err from None
        raise Reported(f"{err}\nThis option is only supported for image creation") from None
    given = opts.given_values()
    return {d.name: given[d.name] for d in descs if d.name in given}


def print_help(fmt: str) -> int:
    from imagetools.ops.common import known_format
    from imagetools.ops.options import help_listing
    descs = AMEND_OPTIONS.get(fmt)
    if descs is None:
        if not known_format(fmt):
            raise Reported(f"Unknown file format '{fmt}'")
        raise Reported(f"Format driver '{fmt}' does not support option amendment")
    sys.stdout.write(f"Amend options for '{fmt}':\n" + help_listing(descs))
    return 0
