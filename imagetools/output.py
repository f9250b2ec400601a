"""What qimg prints: diagnostics, QEMU-layout JSON and the human dumps.

Diagnostics
    ``warn`` and :class:`Reported` carry qemu-img's ``PROG: message`` lines;
    the program name is ``qemu-img`` when qimg runs under that name (a
    drop-in symlink) and ``qimg`` otherwise (:func:`set_prog`).

JSON (``info``, ``check``, ``measure``)
    QEMU prints a QDict, a 512-bucket hash table, so members come out in
    bucket order (newest first within a bucket), not in schema order.
    :func:`to_json` reproduces that order and QEMU's pretty layout (4-space
    indent, empty lists as ``[`` newline ``]``, every non-ASCII character as
    ``\\uXXXX`` with upper-case hex). Callers build plain dicts inserting
    members in schema order.

Human
    :func:`human_image_info` is ``qemu-img info``'s text for one image,
    :func:`snapshot_table` the ``Snapshot list:`` block, and
    :func:`dump_qobject` the ``Format specific information:`` tree.
"""

from __future__ import annotations

import os
import sys
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

from imagetools.errors import ImageError

_PROG = ["qimg"]


def set_prog(argv0: str) -> str:
    """Use ``qemu-img`` as message prefix when invoked under that name."""
    name = os.path.basename(argv0)
    _PROG[0] = "qemu-img" if name.startswith("qemu-img") else "qimg"
    return _PROG[0]


def prog() -> str:
    return _PROG[0]


class Reported(ImageError):
    """An error printed as one or more ``PROG: line`` reports.

    ``lines`` are separate reports (each gets the prefix); a line may itself
    contain newlines, which QEMU prints without a prefix. ``exit_code``
    defaults to 1; ``newline=False`` omits the final newline (7.2 does that
    for a few messages).
    """

    def __init__(self, *lines: str, exit_code: int = 1, newline: bool = True) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines
        self.exit_code = exit_code
        self.newline = newline


def report_error(err: ImageError) -> None:
    """Print an engine error the way qemu-img's error_report does."""
    lines = getattr(err, "lines", None) or (str(err),)
    text = "".join(f"{prog()}: {line}\n" for line in lines)
    if not getattr(err, "newline", True):
        text = text[:-1]
    _flush_stdout()
    sys.stderr.write(text)
    sys.stderr.flush()


def warn(message: str) -> None:
    _flush_stdout()
    sys.stderr.write(f"{prog()}: warning: {message}\n")
    sys.stderr.flush()


def _flush_stdout() -> None:
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass


# -- QDict member order ----------------------------------------------------

def qdict_bucket(key: str) -> int:
    """The bucket QEMU's QDict puts ``key`` in (tdb hash mod 512)."""
    data = key.encode()
    value = (0x238F13AF * len(data)) & 0xFFFFFFFF
    for i, byte in enumerate(data):
        value = (value + (byte << (i * 5 % 24))) & 0xFFFFFFFF
    return ((1103515243 * value + 12345) & 0xFFFFFFFF) % 512


def qdict_order(keys: list[str]) -> list[str]:
    """Keys inserted in this order, in the order QEMU iterates them."""
    indexed = sorted(enumerate(keys), key=lambda item: (qdict_bucket(item[1]), -item[0]))
    return [key for _, key in indexed]


# -- JSON --------------------------------------------------------------------

def json_string(text: str) -> str:
    raw = os.fsencode(text) if isinstance(text, str) else bytes(text)
    out = ['"']
    for ch in raw.decode("utf-8", "replace"):
        cp = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch in "\b\f\n\r\t":
            out.append({"\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch])
        elif cp > 0xFFFF:
            cp -= 0x10000
            out.append("\\u%04X\\u%04X" % (0xD800 + (cp >> 10), 0xDC00 + (cp & 0x3FF)))
        elif cp < 0x20 or cp >= 0x7F:
            out.append("\\u%04X" % cp)
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def to_json(value: Any, level: int = 0) -> str:
    """QEMU's pretty JSON for dicts, lists, strings, ints and bools."""
    parts: list[str] = []
    _json(value, level, parts)
    return "".join(parts)


def _json(value: Any, level: int, out: list[str]) -> None:
    if isinstance(value, bool):
        out.append("true" if value else "false")
    elif isinstance(value, int):
        out.append(str(value))
    elif isinstance(value, str):
        out.append(json_string(value))
    elif isinstance(value, dict):
        out.append("{")
        inner = "    " * (level + 1)
        for n, key in enumerate(qdict_order(list(value))):
            out.append(",\n" if n else "\n")
            out.append(inner + json_string(key) + ": ")
            _json(value[key], level + 1, out)
        out.append("\n" + "    " * level + "}")
    elif isinstance(value, (list, tuple)):
        out.append("[")
        inner = "    " * (level + 1)
        for n, item in enumerate(value):
            out.append(",\n" if n else "\n")
            out.append(inner)
            _json(item, level + 1, out)
        out.append("\n" + "    " * level + "]")
    else:
        raise TypeError(f"cannot print {type(value).__name__} as QEMU JSON")


# -- human dumps -------------------------------------------------------------

def dump_qobject(value: Any, indent: int = 1) -> str:
    """``Format specific information`` text: keys with '-' as ' ', 4-space levels."""
    out: list[str] = []
    _dump(value, indent, out)
    return "".join(out)


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _dump(value: Any, indent: int, out: list[str]) -> None:
    if isinstance(value, dict):
        items = [(key.replace("-", " "), value[key]) for key in qdict_order(list(value))]
    elif isinstance(value, (list, tuple)):
        items = [(f"[{i}]", item) for i, item in enumerate(value)]
    else:
        out.append(_scalar(value))
        return
    pad = " " * (indent * 4)
    for label, item in items:
        if isinstance(item, (dict, list, tuple)):
            out.append(f"{pad}{label}:\n")
            _dump(item, indent + 1, out)
        else:
            out.append(f"{pad}{label}: {_scalar(item)}\n")


def snapshot_table(snapshots: list[dict[str, Any]]) -> str:
    """The ``Snapshot list:`` block (header plus one row per snapshot)."""
    import time
    from imagetools.sizes import human_size
    lines = ["Snapshot list:\n",
             "%-10s%-17s%8s%20s%13s%11s\n" % ("ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT")]
    for sn in snapshots:
        clock_ns = sn.get("vm-clock-sec", 0) * 1_000_000_000 + sn.get("vm-clock-nsec", 0)
        secs = clock_ns // 1_000_000_000
        clock = "%02d:%02d:%02d.%03d" % (secs // 3600, (secs // 60) % 60, secs % 60,
                                         (clock_ns // 1_000_000) % 1000)
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sn.get("date-sec", 0)))
        icount = str(sn["icount"]) if "icount" in sn else ""
        lines.append("%s %s %8s%20s%13s%11s\n" % (
            _pad(sn["id"], 9), _pad(sn["name"], 16), human_size(sn.get("vm-state-size", 0)),
            date, clock, icount))
    return "".join(lines)


def _pad(text: str, width: int) -> str:
    """``text`` left-justified to ``width`` *bytes*, as C's ``%-Ns`` pads:
    a multi-byte UTF-8 name takes as many columns as it has bytes."""
    size = len(text.encode("utf-8", "surrogateescape"))
    return text + " " * (width - size) if size < width else text


def human_image_info(info: dict[str, Any]) -> str:
    """``qemu-img info`` text for one image, from its ImageInfo dict."""
    from imagetools.sizes import human_size
    out = [f"image: {info['filename']}\n",
           f"file format: {info['format']}\n",
           f"virtual size: {human_size(info['virtual-size'])} ({info['virtual-size']} bytes)\n"]
    disk = human_size(info["actual-size"]) if "actual-size" in info else "unavailable"
    out.append(f"disk size: {disk}\n")
    if info.get("encrypted"):
        out.append("encrypted: yes\n")
    if "cluster-size" in info:
        out.append(f"cluster_size: {info['cluster-size']}\n")
    if info.get("dirty-flag"):
        out.append("cleanly shut down: no\n")
    if "backing-filename" in info:
        backing = info["backing-filename"]
        full = info.get("full-backing-filename")
        if full is None:
            out.append(f"backing file: {backing} (cannot determine actual path)\n")
        elif full != backing:
            out.append(f"backing file: {backing} (actual path: {full})\n")
        else:
            out.append(f"backing file: {backing}\n")
        if "backing-filename-format" in info:
            out.append(f"backing file format: {info['backing-filename-format']}\n")
    if info.get("snapshots"):
        out.append(snapshot_table(info["snapshots"]))
    if "format-specific" in info:
        out.append("Format specific information:\n")
        out.append(dump_qobject(info["format-specific"]["data"], 1))
    return "".join(out)
