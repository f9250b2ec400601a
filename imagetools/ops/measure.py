"""``qimg measure``: how big would a new image be? (qemu-img measure)

    measure [--output=ofmt] [-O output_fmt] [-o options]
            [--size N | [--object objectdef] [--image-opts] [-f fmt]
             [-l snapshot_param] filename]

The numbers come from the target format's driver (``measure``): the file
size needed for the data a source image holds (or for an empty image of
``--size``) and for a fully allocated one, plus the space for persistent
bitmaps when both ends can hold them.
"""

from __future__ import annotations

import sys
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

from imagetools.ops.args import Getopt, show_help
from imagetools.output import Reported

LONG = [("help", 0, "h"), ("image-opts", 0, "image-opts"), ("object", 1, "object"),
        ("output", 1, "output"), ("size", 1, "size"), ("force-share", 0, "U")]


def main(argv: list[str]) -> int:
    from imagetools.ops.common import output_format
    from imagetools.sizes import cvtnum
    fmt = options = snapshot = None
    out_fmt = "raw"
    mode = "human"
    size = None
    force_share = image_opts = False
    scan = Getopt(argv, ":hf:O:o:l:U", LONG)
    for opt, arg in scan:
        if opt == "h":
            return show_help()
        if opt == "f":
            fmt = arg
        elif opt == "O":
            out_fmt = arg
        elif opt == "o":
            from imagetools.ops.create import add_option_list
            options = add_option_list(options, arg)
        elif opt == "l":
            from imagetools.ops.convert import parse_snapshot_param
            snapshot = parse_snapshot_param(arg)
        elif opt == "U":
            force_share = True
        elif opt == "image-opts":
            image_opts = True
        elif opt == "output":
            mode = output_format(arg)
        elif opt == "size":
            size = cvtnum("image size", arg)
    rest = scan.operands
    if len(rest) > 1:
        raise Reported("At most one filename argument is allowed.")
    filename = rest[0] if rest else None
    if filename is None and (image_opts or fmt or snapshot is not None):
        raise Reported("--image-opts, -f, and -l require a filename argument.")
    if filename is not None and size is not None:
        raise Reported("--size N cannot be used together with a filename.")
    if filename is None and size is None:
        raise Reported("Either --size N or one filename must be specified.")
    info = measure(out_fmt, options, size=size, filename=filename, fmt=fmt, snapshot=snapshot,
                   force_share=force_share, image_opts=image_opts)
    if mode == "json":
        from imagetools.output import to_json
        sys.stdout.write(to_json(info) + "\n")
    else:
        sys.stdout.write(f"required size: {info['required']}\n"
                         f"fully allocated size: {info['fully-allocated']}\n")
        if "bitmaps" in info:
            sys.stdout.write(f"bitmaps size: {info['bitmaps']}\n")
    return 0


def measure(out_fmt: str, options: str | None = None, *, size: int | None = None,
            filename: str | None = None, fmt: str | None = None, snapshot=None,
            force_share: bool = False, image_opts: bool = False) -> dict[str, Any]:
    """BlockMeasureInfo (``required``, ``fully-allocated``, maybe ``bitmaps``)."""
    source = None
    try:
        if filename is not None:
            from imagetools.ops.common import open_image
            source = open_image(filename, fmt, read_only=True, force_share=force_share,
                                image_opts=image_opts)
            if snapshot is not None:
                from imagetools.ops.copy import load_snapshot
                view = load_snapshot(source, snapshot)
                source = view
        from imagetools.ops.common import known_format
        from imagetools.ops.options import Options, format_options, with_protocol
        descs = format_options(out_fmt)
        if descs is None:
            if known_format(out_fmt):
                raise Reported(f"Block driver '{out_fmt}' does not support size measurement")
            raise Reported(f"Unknown file format '{out_fmt}'")
        opts = Options(with_protocol(descs))
        if options:
            try:
                opts.parse(options)
            except Reported as err:
                raise Reported(*err.lines, f"Invalid options for file format '{out_fmt}'") from None
        if size is not None:
            opts.set_number("size", size)
        from imagetools.formats import driver
        cls = driver(out_fmt)
        method = getattr(cls, "measure", None)
        if method is None:
            raise Reported(f"Block driver '{out_fmt}' does not support size measurement")
        given = opts.given_values()
        target_size = given.pop("size", None)
        return _result(method(given, target_size, source))
    finally:
        if source is not None:
            source.close()


def _result(raw) -> dict[str, Any]:
    """The driver's answer as BlockMeasureInfo members, in schema order."""
    if isinstance(raw, dict):
        required = raw["required"]
        fully = raw.get("fully-allocated", raw.get("fully_allocated"))
        bitmaps = raw.get("bitmaps")
    else:
        required, fully = raw.required, raw.fully_allocated
        bitmaps = getattr(raw, "bitmaps", None)
    out: dict[str, Any] = {"required": required, "fully-allocated": fully}
    if bitmaps is not None:
        out["bitmaps"] = bitmaps
    return out
