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

from imagetools.errors import c_hex as _hex
from imagetools.ops.args import Getopt, show_help, usage_error
from imagetools.output import Reported

LONG = [("help", 0, "h"), ("format", 1, "f"), ("output", 1, "output"),
        ("object", 1, "object"), ("image-opts", 0, "image-opts"),
        ("force-share", 0, "U"), ("start-offset", 1, "start-offset"),
        ("max-length", 1, "max-length")]

INT64_MAX = (1 << 63) - 1


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
    """The image's status for ``[start, start+max_length)`` in map's items,
    in batches, unmerged (see :meth:`Driver.map_runs`)."""
    end = min(start + max_length, drv.size)
    if end <= start:
        return iter(())
    return drv.map_runs(start, end - start)


_BATCH = 4096


def print_json(batches, start: int = 0) -> None:
    """qemu-img map's JSON, entry by entry in its own layout.

    The loop merges items inline as qemu-img does (the same status and
    either no offset on both or offsets that continue each other) and
    prints in batches: a fragmented image has one entry per cluster, and
    this is where map spends its time. Statuses are interned
    (:class:`~imagetools.formats.base.MapStatus`), so they compare with
    ``is`` and their part of the line is made once.

    A batch that offers its items as columns (``hosts``: see
    :class:`~imagetools.formats.qcow2.read.ClusterItems`) is read from
    them, with the same merging written out for its two statuses: no item
    tuples are made for a scattered table.
    """
    from imagetools.formats.base import MapStatus
    write = sys.stdout.write
    lines: list[str] = []
    append = lines.append
    parts: dict = {}
    write("[")
    cs, cl, cst, co = start, 0, MapStatus.of(0, False, False, False), None
    cend = None                 # where the current entry's offset would continue
    try:
        for batch in batches:
            hosts = getattr(batch, "hosts", None)
            if hosts is not None:
                size, data, hole = batch.cluster_size, batch.data, batch.hole
                # the usual line here, one data cluster, is made from fewer pieces
                one = f', "length": {size}, {_json_status(data)}, "offset": '
                for s, h in zip(range(batch.start, batch.start + len(hosts) * size, size),
                                hosts):
                    if h:                   # data at host offset h
                        if h == cend and cst is data:
                            cl += size
                            cend += size
                            continue
                        st = data
                    else:                   # no data, no offset
                        if cend is None and cst is hole:
                            cl += size
                            continue
                        st = hole
                    if cst is data and cl == size:
                        append(f'{{ "start": {cs}{one}{co}}}')
                    elif cl:
                        part = parts.get(cst) or parts.setdefault(cst, _json_status(cst))
                        if co is None:
                            append(f'{{ "start": {cs}, "length": {cl}, {part}}}')
                        else:
                            append(f'{{ "start": {cs}, "length": {cl}, {part}, '
                                   f'"offset": {co}}}')
                    cs, cl, cst = s, size, st
                    co = cend = None
                    if h:
                        co, cend = h, h + size
                if len(lines) >= _BATCH:
                    write(",\n".join(lines) + ",\n")
                    lines = []
                    append = lines.append
                continue
            for s, l, st, o in batch:
                if o == cend and st is cst and cl:
                    cl += l
                    if cend is not None:
                        cend += l
                    continue
                if cl:
                    part = parts.get(cst) or parts.setdefault(cst, _json_status(cst))
                    if co is None:
                        append(f'{{ "start": {cs}, "length": {cl}, {part}}}')
                    else:
                        append(f'{{ "start": {cs}, "length": {cl}, {part}, "offset": {co}}}')
                cs, cl, cst, co = s, l, st, o
                cend = None if o is None else o + l
            if len(lines) >= _BATCH:
                write(",\n".join(lines) + ",\n")
                lines = []
                append = lines.append
    except BaseException:
        if lines:
            write(",\n".join(lines) + ",\n")
        raise
    part = _json_status(cst)
    if co is None:
        append(f'{{ "start": {cs}, "length": {cl}, {part}}}')
    else:
        append(f'{{ "start": {cs}, "length": {cl}, {part}, "offset": {co}}}')
    write(",\n".join(lines) + "]\n")


def _json_status(st) -> str:
    return (f'"depth": {st.depth}, "present": {"true" if st.present else "false"}, '
            f'"zero": {"true" if st.zero else "false"}, "data": {"true" if st.data else "false"}')


def print_human(batches) -> None:
    """qemu-img map's table: data ranges only, everything else merged as zero.

    After printing an entry, qemu-img turns the next one into plain zero
    if it has no data or reads as zeros (to merge more): its status is
    replaced the same way here. The merging loop is print_json's, written
    out again rather than shared through a generator: a line costs little
    more than the generator step would.
    """
    from imagetools.formats.base import MapStatus
    out = sys.stdout
    lines = ["Offset          Length          Mapped to       File\n"]
    zeroed: dict = {}
    cs, cl, cst, co = 0, 0, None, None
    cend = None                 # where the current entry's offset would continue
    try:
        for batch in batches:
            for s, l, st, o in batch:
                if o == cend and st is cst and cl:
                    cl += l
                    if cend is not None:
                        cend += l
                    continue
                if cl:
                    if not cst.data:
                        pass
                    elif cst.zero or co is None or not cs or not co:
                        _human_line(cs, cl, cst, co, lines)
                    else:               # _human_line's usual case, inline: one a line
                        lines.append("%-#16x%-#16x%-#16x%s\n" % (cs, cl, co, cst.filename or ""))
                    if not st.data or st.zero:
                        st = zeroed.get(st) or zeroed.setdefault(st, MapStatus.of(
                            st.depth, st.present, True, False, st.filename))
                cs, cl, cst, co = s, l, st, o
                cend = None if o is None else o + l
            if len(lines) >= _BATCH:
                out.write("".join(lines))
                lines = []
        if cl:
            _human_line(cs, cl, cst, co, lines)
    finally:
        out.write("".join(lines))


def _human_line(s: int, l: int, st, o: int | None, lines: list[str]) -> None:
    if st.data and o is None:
        raise Reported("File contains external, encrypted or compressed clusters.")
    if st.data and not st.zero:
        lines.append(f"{_hex(s):<16}{_hex(l):<16}{_hex(o):<16}{st.filename or ''}\n")
