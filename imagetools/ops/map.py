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
from imagetools.ops.args import Getopt, show_help, usage_error
from imagetools.output import Reported

LONG = [("help", 0, "h"), ("format", 1, "f"), ("output", 1, "output"),
        ("object", 1, "object"), ("image-opts", 0, "image-opts"),
        ("force-share", 0, "U"), ("start-offset", 1, "start-offset"),
        ("max-length", 1, "max-length")]

INT64_MAX = (1 << 63) - 1


class MapEntry:
    """One line of qemu-img map (mutable: the human form rewrites flags)."""

    __slots__ = ("start", "length", "depth", "present", "zero", "data", "offset", "filename")

    def __init__(self, start: int, length: int, depth: int = 0, present: bool = False,
                 zero: bool = False, data: bool = False, offset: int | None = None,
                 filename: str | None = None) -> None:
        self.start, self.length, self.depth = start, length, depth
        self.present, self.zero, self.data = present, zero, data
        self.offset, self.filename = offset, filename

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
            return show_help()
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
        from imagetools.errors import ImageError
        try:
            if mode == "json":
                print_json(entries(drv, start, max_length), start)
            else:
                print_human(entries(drv, start, max_length))
        except Reported:
            raise
        except ImageError as err:
            raise metadata_error(err) from None
    finally:
        drv.close()
    return 0


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
    """The image's block status for ``[start, start+max_length)``, unmerged."""
    end = min(start + max_length, drv.size)
    if end <= start:
        return iter(())
    return drv.block_status(start, end - start)


def _fields(ext) -> tuple:
    """(start, length, depth, present, zero, data, offset, file) of one extent,
    with the offset (and file) only where qemu-img map shows one."""
    offset = ext.offset
    if offset is not None and not (ext.data or ext.zero):
        offset = None
    return (ext.start, ext.length, ext.depth, ext.present, ext.zero, ext.data, offset,
            ext.filename if offset is not None else None)


def merged(items, start: int = 0):
    """MapEntry values merged as qemu-img merges them (at least one entry)."""
    curr = MapEntry(start, 0)
    for ext in items:
        nxt = MapEntry(*_fields(ext))
        if curr.mergeable(nxt):
            curr.length += nxt.length
            continue
        if curr.length > 0:
            yield curr
        curr = nxt
    yield curr


_BOOL = ("false", "true")
_BATCH = 4096


def print_json(items, start: int = 0) -> None:
    """qemu-img map's JSON, entry by entry in its own layout.

    The loop merges runs inline and prints in batches: a fragmented image
    has one entry per cluster, and this is where map spends its time.
    """
    write = sys.stdout.write
    lines: list[str] = []
    write("[")
    head = ""
    cs, cl, cd, cp, cz, cda, co, cf = start, 0, 0, False, False, False, None, None
    try:
        for ext in items:
            s, l, d, p, z, da, o = (ext.start, ext.length, ext.depth, ext.present, ext.zero,
                                    ext.data, ext.offset)
            if o is not None and not (da or z):
                o = None
            f = ext.filename if o is not None else None
            if (cl and z == cz and da == cda and d == cd and p == cp and f == cf
                    and (co + cl == o if co is not None and o is not None
                         else co is None and o is None)):
                cl += l
                continue
            if cl:
                if co is None:
                    lines.append(_NO_OFFSET % (cs, cl, cd, _BOOL[cp], _BOOL[cz], _BOOL[cda]))
                else:
                    lines.append(_OFFSET % (cs, cl, cd, _BOOL[cp], _BOOL[cz], _BOOL[cda], co))
                if len(lines) >= _BATCH:
                    write(head + ",\n".join(lines) + ",\n")
                    head, lines = "", []
            cs, cl, cd, cp, cz, cda, co, cf = s, l, d, p, z, da, o, f
    except BaseException:
        if lines:
            write(head + ",\n".join(lines) + ",\n")
        raise
    lines.append(_json_line(cs, cl, cd, cp, cz, cda, co))
    write(head + ",\n".join(lines) + "]\n")


_NO_OFFSET = ('{ "start": %d, "length": %d, "depth": %d, "present": %s, "zero": %s, '
              '"data": %s}')
_OFFSET = ('{ "start": %d, "length": %d, "depth": %d, "present": %s, "zero": %s, '
           '"data": %s, "offset": %d}')


def _json_line(s: int, l: int, d: int, p: bool, z: bool, da: bool, o: int | None) -> str:
    if o is None:
        return _NO_OFFSET % (s, l, d, _BOOL[p], _BOOL[z], _BOOL[da])
    return _OFFSET % (s, l, d, _BOOL[p], _BOOL[z], _BOOL[da], o)


def print_human(items) -> None:
    """qemu-img map's table: data ranges only, everything else merged as zero."""
    out = sys.stdout
    lines = ["%-16s%-16s%-16s%s\n" % ("Offset", "Length", "Mapped to", "File")]
    curr = MapEntry(0, 0)
    try:
        for ext in items:
            nxt = MapEntry(*_fields(ext))
            if curr.mergeable(nxt):
                curr.length += nxt.length
                continue
            if curr.length > 0:
                _human_entry(curr, nxt, lines)
                if len(lines) >= _BATCH:
                    out.write("".join(lines))
                    lines = []
            curr = nxt
        if curr.length > 0:
            _human_entry(curr, None, lines)
    finally:
        out.write("".join(lines))


def _human_entry(e: MapEntry, nxt: MapEntry | None, lines: list[str]) -> None:
    if e.data and e.offset is None:
        raise Reported("File contains external, encrypted or compressed clusters.")
    if e.data and not e.zero:
        lines.append("%-16s%-16s%-16s%s\n" % (_hex(e.start), _hex(e.length),
                                               _hex(e.offset or 0), e.filename or ""))
    if nxt is not None and (not nxt.data or nxt.zero):
        nxt.data = False
        nxt.zero = True


def _hex(value: int) -> str:
    """C's ``%#x``: ``0`` for zero, ``0x...`` otherwise."""
    return "%#x" % value if value else "0"
