"""``qimg create``: make a new image (qemu-img create).

    create [--object objectdef] [-q] [-f fmt] [-b backing_file [-F backing_fmt]]
           [-u] [-o options] filename [size]

As qemu-img 7.2: raw is the default format; the ``Formatting ...`` line is
printed before the driver validates the option values (so option errors
come after it); a backing file needs a backing format (``-F``) and, unless
``-u``, must open; without a size the backing file's size is used.
"""

from __future__ import annotations

import errno
import sys

from imagetools.errors import ImageError, ImageOpenError
from imagetools.ops.args import Getopt, show_help, usage_error
from imagetools.output import Reported

LONG = [("help", 0, "h"), ("object", 1, "object")]


def main(argv: list[str]) -> int:
    fmt = "raw"
    base_filename = base_fmt = None
    options: str | None = None
    quiet = unsafe = False
    scan = Getopt(argv, ":F:b:f:ho:qu", LONG)
    for opt, arg in scan:
        if opt == "h":
            return show_help()
        if opt == "F":
            base_fmt = arg
        elif opt == "b":
            base_filename = arg
        elif opt == "f":
            fmt = arg
        elif opt == "o":
            options = add_option_list(options, arg)
        elif opt == "q":
            quiet = True
        elif opt == "u":
            unsafe = True
    rest = scan.operands
    filename = rest[0] if rest else None
    from imagetools.ops import options as opts_mod
    if options is not None and opts_mod.wants_help(options):
        return opts_mod.print_help(fmt, filename)
    if filename is None:
        raise usage_error("Expecting image file name")
    size = None
    if len(rest) > 1:
        from imagetools.sizes import cvtnum
        size = cvtnum("image size", rest[1])
    if len(rest) > 2:
        raise usage_error(f"Unexpected argument: {rest[2]}")
    try:
        create(filename, fmt, size, options=options, backing_file=base_filename,
               backing_fmt=base_fmt, unsafe=unsafe, quiet=quiet)
    except ImageError as err:
        raise prefixed(filename, err) from None
    return 0


def add_option_list(current: str | None, new: str) -> str:
    """Join repeated ``-o`` arguments, refusing malformed lists as qemu-img does."""
    from imagetools.ops.options import valid_option_list
    if not valid_option_list(new):
        raise Reported(f"Invalid option list: {new}")
    return new if current is None else f"{current},{new}"


def prefixed(filename: str, err: ImageError) -> Reported:
    """qemu-img reports creation errors as ``FILE: message``."""
    lines = getattr(err, "lines", None) or (str(err),)
    out = Reported(f"{filename}: {lines[0]}", *lines[1:],
                   exit_code=getattr(err, "exit_code", 1), newline=getattr(err, "newline", True))
    return out


def too_large(fmt: str) -> ImageError:
    """qemu-img's words for any "File too large" while creating (bdrv_img_create):
    formats with a cluster size get a hint."""
    from imagetools.ops.options import format_options
    hint = any(d.name == "cluster_size" and d.default for d in format_options(fmt) or ())
    return ImageError(f"The image size is too large for file format '{fmt}'"
                      + (" (try using a larger cluster size)" if hint else ""))


def create(filename: str, fmt: str, size: int | None, *, options: str | None = None,
           backing_file: str | None = None, backing_fmt: str | None = None,
           unsafe: bool = False, quiet: bool = False) -> None:
    """Create an image exactly as ``qemu-img create`` would (bdrv_img_create).

    The option list is parsed and echoed here (the ``Formatting`` line);
    the backing-file checks and the file itself are the engine's
    (:func:`imagetools.image.create_image`).
    """
    from imagetools import image
    from imagetools.ops.options import target_options
    opts = target_options(fmt, options, backing_file, backing_fmt)
    if opts.has("size") and size is not None:
        raise Reported("The image size must be specified only once")
    if not opts.has("size") and size is not None:
        opts.set_number("size", size)

    def formatting(final_size: int, _options: dict) -> None:
        if not opts.has("size"):
            opts.set_number("size", final_size)
        if not quiet:
            sys.stdout.write(f"Formatting '{filename}', fmt={fmt} {opts.formatting_line()}\n")
            sys.stdout.flush()

    given = opts.given_values()
    size = given.pop("size", None)
    try:
        image.create_image(filename, fmt, size, given, unsafe=unsafe, on_formatting=formatting)
    except ImageOpenError as err:
        if err.filename != filename:
            raise
        from imagetools.ops.common import creation_error
        raise Reported(creation_error(filename, err)) from None
    except ImageError as err:
        if getattr(err, "errno", None) == errno.EFBIG:
            raise too_large(fmt) from None
        text = str(err)
        if "\nDetected format of " in text:
            raise Reported(text, newline=False) from None
        raise
    except OSError as err:
        from imagetools.ops.common import creation_error
        raise Reported(creation_error(filename, err)) from None
