"""``qimg dd``: copy part of an image into a new image (qemu-img dd).

    dd [--image-opts] [-U] [-f fmt] [-O output_fmt] [bs=block_size]
       [count=blocks] [skip=blocks] if=input of=output

As qemu-img 7.2: the output is created with size
``min(count*bs, input size) - skip*bs`` (so ``skip=1 count=1`` gives an
empty image) and every byte is written (no sparse detection). A ``skip``
past the end is reported but is not an error. The copy moves many blocks
per request; the result is the same as qemu-img's block-by-block loop.
"""

from __future__ import annotations

from imagetools.errors import ImageError
from imagetools.ops.args import Getopt, show_help
from imagetools.output import Reported

LONG = [("help", 0, "h"), ("object", 1, "object"), ("image-opts", 0, "image-opts"),
        ("force-share", 0, "U")]

INT64_MAX = (1 << 63) - 1
INT_MAX = (1 << 31) - 1
CHUNK = 4 * 1024 * 1024


def main(argv: list[str]) -> int:
    fmt = None
    out_fmt = "raw"
    force_share = image_opts = False
    scan = Getopt(argv, ":hf:O:U", LONG)
    for opt, arg in scan:
        if opt == "h":
            return show_help()
        if opt == "O":
            out_fmt = arg
        elif opt == "f":
            fmt = arg
        elif opt == "U":
            force_share = True
        elif opt == "image-opts":
            image_opts = True
    params = parse_operands(scan.operands)
    return dd(params, fmt=fmt, out_fmt=out_fmt, force_share=force_share, image_opts=image_opts)


def parse_operands(operands: list[str]) -> dict:
    """``bs= count= skip= if= of=`` operands, checked in order as qemu-img does."""
    from imagetools.sizes import cvtnum
    params: dict = {"bs": 512, "count": None, "skip": None, "if": None, "of": None}
    for operand in operands:
        name, eq, value = operand.partition("=")
        if not eq or name not in params:
            raise Reported(f"unrecognized operand {name}")
        if name == "bs":
            params["bs"] = cvtnum("bs", value, 1, INT_MAX)
        elif name == "count":
            params["count"] = cvtnum("count", value)
        elif name == "skip":
            params["skip"] = cvtnum("skip", value)
        else:
            params[name] = value
    if params["if"] is None or params["of"] is None:
        raise Reported("Must specify both input and output files")
    return params


def dd(params: dict, *, fmt: str | None = None, out_fmt: str = "raw",
       force_share: bool = False, image_opts: bool = False) -> int:
    from imagetools.ops.common import open_image
    bs, count, skip = params["bs"], params["count"], params["skip"]
    src = open_image(params["if"], fmt, read_only=True, force_share=force_share,
                     image_opts=image_opts)
    try:
        size = src.size
        if count is not None and count <= INT64_MAX // bs and count * bs < size:
            size = count * bs
        beyond = skip is not None and (skip > INT64_MAX // bs or size < bs * skip)
        out_size = 0 if beyond else size - bs * (skip or 0)
        from imagetools.ops.common import refuse_source_as_target
        refuse_source_as_target(params["of"], [src],
                                f"{params['of']}: error while creating output image: ")
        _create_output(params["of"], out_fmt, out_size)
        out = open_image(params["of"], out_fmt, read_only=False)
        try:
            if beyond:
                from imagetools.output import report_error
                report_error(Reported(f"{params['if']}: cannot skip to specified offset"))
                in_pos = size
            else:
                in_pos = bs * (skip or 0)
            _copy(src, out, in_pos, size, bs)
            out.flush()
        finally:
            out.close()
    finally:
        src.close()
    return 0


def _create_output(filename: str, out_fmt: str, size: int) -> None:
    from imagetools.ops.options import format_options
    from imagetools.ops.common import known_format
    if format_options(out_fmt) is None:
        if known_format(out_fmt):
            raise Reported(f"Format driver '{out_fmt}' does not support image creation")
        raise Reported("Unknown file format")
    from imagetools.formats import driver
    from imagetools.ops.common import creation_error
    try:
        driver(out_fmt).create(filename, size, {})
    except (ImageError, OSError) as err:
        raise Reported(f"{filename}: error while creating output image: "
                       f"{creation_error(filename, err)}") from None


def _copy(src, out, in_pos: int, size: int, bs: int) -> None:
    step = max(bs, CHUNK // bs * bs)
    out_pos = 0
    while in_pos < size:
        length = min(step, size - in_pos)
        try:
            data = src.read(in_pos, length)
        except ImageError as err:
            raise Reported(f"error while reading from input image file: {err}") from None
        try:
            out.write(out_pos, data)
        except ImageError as err:
            raise Reported(f"error while writing to output image file: {err}") from None
        in_pos += length
        out_pos += length
