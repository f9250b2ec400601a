"""``qimg map``: how guest ranges map onto files (qemu-img map).

    map [--object objectdef] [--image-opts] [-f fmt] [--start-offset=offset]
        [--max-length=len] [--output=ofmt] [-U] filename

Entries come from the driver's block status through the backing chain and
are merged exactly as qemu-img merges them: same zero/data/present flags,
same depth, same file and a host offset that continues the previous one.
The human form lists only data ranges and, to merge more, treats every
range without data as zero (as qemu-img does); a data range without a host
offset (compressed) is an error there. JSON is printed line by line in
qemu-img's own layout, not through the pretty printer.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from imagetools.ops.args import Getopt, usage_error
from imagetools.output import Reported

LONG = [("help", 0, "h"), ("format", 1, "f"), ("output", 1, "output"),
        ("object", 1, "object"), ("image-opts", 0, "image-opts"),
        ("force-share", 0, "U"), ("start-offset", 1, "start-offset"),
        ("max-length", 1, "max-length")]

INT64_MAX = (1 << 63) - 1


@dataclass
class MapEntry:
    start: int
    length: int
    depth: int = 0
    present: bool = False
    zero: bool = False
    data: bool = False
    offset: int | None = None
    filename: str | None = None

    def mergeable(self, nxt: "MapEntry") -> bool:
        if self.length == 0:
            return False
        if (self.zero != nxt.zero or self.data != nxt.data or self.depth != nxt.depth
                or self.present != nxt.present or self.filename != nxt.filename
                or (self.offset is None) != (nxt.offset is None)):
            return False
        return self.offset is None or self.offset + self.length == nxt.offset


def main(argv: list[str]) -> int:
    fmt = output = None
    image_opts = force_share = False
    start, max_length = 0, INT64_MAX
    scan = Getopt(argv, ":f:hU", LONG)
    from imagetools.sizes import cvtnum
    for opt, arg in scan:
        if opt == "h":
            from imagetools.cli import print_help
            from imagetools.output import prog
            return print_help(prog())
        if opt == "f":
            fmt = arg
        elif opt == "U":
            force_share = True
        elif opt == "output":
            output = arg
        elif opt == "image-opts":
            image_opts = True
        elif opt == "start-offset":
            start = cvtnum("start offset", arg)
        elif opt == "max-length":
            max_length = cvtnum("max length", arg)
    rest = scan.operands
    if len(rest) != 1:
        raise usage_error("Expecting one image file name")
    from imagetools.ops.common import open_image, output_format
    mode = output_format(output)
    drv = open_image(rest[0], fmt, read_only=True, force_share=force_share,
                     image_opts=image_opts)
    try:
        if mode == "json":
            print_json(guarded(entries(drv, start, max_length)), start)
        else:
            print_human(guarded(entries(drv, start, max_length)))
    finally:
        drv.close()
    return 0


def guarded(items):
    """Turn a failure while reading the metadata into qemu-img's report."""
    from imagetools.errors import ImageError
    try:
        yield from items
    except ImageError as err:
        raise metadata_error(err) from None


def metadata_error(err) -> Reported:
    """``Could not read file metadata: ...``, after the driver's own line if any.

    QEMU's qcow2 driver prints its ``qcow2: Image is corrupt: ...`` line
    itself (no program prefix) before the command reports the I/O error.
    """
    import os
    from imagetools.errors import CorruptImageError
    text = str(err)
    if isinstance(err, CorruptImageError) or text.startswith("qcow2: "):
        sys.stdout.flush()
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
        return Reported("Could not read file metadata: Input/output error")
    errno = getattr(err, "errno", None)
    reason = os.strerror(errno) if errno else text
    return Reported(f"Could not read file metadata: {reason}")


def entries(drv, start: int = 0, max_length: int = INT64_MAX):
    """Unmerged MapEntry values for ``[start, start+max_length)`` of the image."""
    end = min(start + max_length, drv.size)
    if end <= start:
        return
    for ext in drv.block_status(start, end - start):
        offset = ext.offset if ext.offset is not None and (ext.data or ext.zero) else None
        yield MapEntry(ext.start, ext.length, ext.depth, ext.present, ext.zero, ext.data,
                       offset, ext.filename if offset is not None else None)


def merged(items, start: int = 0):
    """Merge entries as qemu-img does; always yields at least one entry."""
    curr = MapEntry(start, 0)
    for nxt in items:
        if curr.mergeable(nxt):
            curr.length += nxt.length
            continue
        if curr.length > 0:
            yield curr
        curr = nxt
    yield curr


def print_json(items, start: int = 0) -> None:
    write = sys.stdout.write
    write("[")
    previous = None
    for entry in merged(items, start):
        if previous is not None:
            write(_json_entry(previous) + ",\n")
        previous = entry
    write(_json_entry(previous) + "]\n")


def _json_entry(e: MapEntry) -> str:
    text = ('{ "start": %d, "length": %d, "depth": %d, "present": %s, "zero": %s, "data": %s'
            % (e.start, e.length, e.depth, _b(e.present), _b(e.zero), _b(e.data)))
    if e.offset is not None:
        text += ', "offset": %d' % e.offset
    return text + "}"


def _b(value: bool) -> str:
    return "true" if value else "false"


def print_human(items) -> None:
    out = sys.stdout
    out.write("%-16s%-16s%-16s%s\n" % ("Offset", "Length", "Mapped to", "File"))
    curr = MapEntry(0, 0)
    for nxt in items:
        if curr.mergeable(nxt):
            curr.length += nxt.length
            continue
        if curr.length > 0:
            _human_entry(curr, nxt)
        curr = nxt
    if curr.length > 0:
        _human_entry(curr, None)


def _human_entry(e: MapEntry, nxt: MapEntry | None) -> None:
    if e.data and e.offset is None:
        sys.stdout.flush()
        raise Reported("File contains external, encrypted or compressed clusters.")
    if e.data and not e.zero:
        sys.stdout.write("%-16s%-16s%-16s%s\n" % (_hex(e.start), _hex(e.length),
                                                  _hex(e.offset or 0), e.filename or ""))
    if nxt is not None and (not nxt.data or nxt.zero):
        nxt.data = False
        nxt.zero = True


def _hex(value: int) -> str:
    """C's ``%#x``: ``0`` for zero, ``0x...`` otherwise."""
    return "%#x" % value if value else "0"
