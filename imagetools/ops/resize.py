"""``qimg resize``: change the virtual size of an image (qemu-img resize).

    resize [--object objectdef] [--image-opts] [-f fmt]
           [--preallocation=prealloc] [-q] [--shrink] filename [+ | -]size

As qemu-img 7.2: the size is taken off the end of the command line before
the options are read (so ``-1G`` is a size, not an option), ``+``/``-`` make
it relative, shrinking needs ``--shrink`` (with qemu-img's two-line
refusal), preallocation only grows, and the image ends up exactly that
size or the command fails. The format drivers do the work
(``Driver.truncate``); qcow2 also grows the area under a larger backing
file as zeros.
"""

from __future__ import annotations

import sys

from imagetools.ops.args import Getopt, show_help, usage_error
from imagetools.output import Reported

LONG = [("help", 0, "h"), ("object", 1, "object"), ("image-opts", 0, "image-opts"),
        ("preallocation", 1, "preallocation"), ("shrink", 0, "shrink")]

PREALLOC_MODES = ("off", "metadata", "falloc", "full")
_INT64 = 1 << 63
_U64 = 1 << 64


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        raise usage_error("Not enough arguments")
    size_text = argv[-1]
    fmt = None
    prealloc = "off"
    quiet = shrink = image_opts = False
    scan = Getopt(argv[:-1], ":f:hq", LONG)
    for opt, arg in scan:
        if opt == "h":
            return show_help()
        if opt == "f":
            fmt = arg
        elif opt == "q":
            quiet = True
        elif opt == "image-opts":
            image_opts = True
        elif opt == "preallocation":
            if arg not in PREALLOC_MODES:
                raise Reported(f"Invalid preallocation mode '{arg}'")
            prealloc = arg
        elif opt == "shrink":
            shrink = True
    rest = scan.operands
    if len(rest) != 1:
        raise usage_error("Expecting image file name and size")
    filename = rest[0]
    relative = 0
    if size_text[:1] in "+-" and size_text:
        relative = 1 if size_text[0] == "+" else -1
        size_text = size_text[1:]
    amount = parse_size(size_text)
    from imagetools.ops.common import open_image
    drv = open_image(filename, fmt, read_only=False, image_opts=image_opts)
    try:
        current = drv.size
        total = (current + amount * relative) if relative else amount
        total %= _U64
        if total >= _INT64:              # int64_t in qemu-img: wrapped negative
            total -= _U64
        if total <= 0:
            raise Reported("New image size must be positive")
        if total <= current and prealloc != "off":
            raise Reported("Preallocation can only be used for growing images")
        if current > total and not shrink:
            raise Reported("Use the --shrink option to perform a shrink operation.",
                           "warning: Shrinking an image will delete all data beyond the "
                           "shrunken image's end. Before performing such an operation, make "
                           "sure there is no important data there.")
        drv.truncate(total, prealloc=prealloc)
    finally:
        drv.close()
    if not quiet:
        sys.stdout.write("Image resized.\n")
    return 0


def parse_size(text: str) -> int:
    """The size operand, read as a QemuOpts size (with its messages)."""
    from imagetools.sizes import SizeError, parse_size as qemu_size
    try:
        return qemu_size(text)
    except SizeError as err:
        if err.out_of_range:
            raise Reported(f"Value '{text}' is out of range for parameter 'size'") from None
        raise Reported("Parameter 'size' expects a non-negative number below 2^64\n"
                       "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, "
                       "peta-\nand exabytes, respectively.") from None
