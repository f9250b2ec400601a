"""Writing values the way qemu-ga writes them, byte for byte.

qemu-ga prints compact JSON with ``", "`` and ``": "`` separators, escapes
every character outside printable ASCII as ``\\uXXXX`` with UPPERCASE hex
(surrogate pairs beyond the BMP), prints doubles with ``%.17g``, and puts the
members of an object in the iteration order of QEMU's QDict: ascending
bucket of the key's "tdb" hash modulo 512, and within one bucket the member
added last first.  Handlers therefore build their dicts in schema member
order (the order QEMU's output visitor adds them) and this module does the
rest.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any

from agent.modutf8 import decode_lossy, replace_noncharacters, to_c_bytes

QDICT_BUCKETS = 512


def tdb_hash(key: bytes) -> int:
    """The string hash QEMU's QDict uses (unsigned 32-bit arithmetic)."""
    value = (0x238F13AF * len(key)) & 0xFFFFFFFF
    for i, byte in enumerate(key):
        value = (value + (byte << (i * 5 % 24))) & 0xFFFFFFFF
    return (1103515243 * value + 12345) & 0xFFFFFFFF


@lru_cache(maxsize=4096)
def bucket(key: str) -> int:
    return tdb_hash(to_c_bytes(key)) % QDICT_BUCKETS


def qdict_items(d: dict[str, Any]) -> list[tuple[str, Any]]:
    """The members of ``d`` in the order qemu-ga prints them."""
    if len(d) < 2:
        return list(d.items())
    keyed = [(bucket(k), -i, k, v) for i, (k, v) in enumerate(d.items())]
    keyed.sort(key=lambda e: (e[0], e[1]))
    return [(k, v) for _, _, k, v in keyed]


# printable ASCII except '"' and '\\': printed as is
_PLAIN = re.compile(r'[ !#-\[\]-~]*\Z')
_SURROGATE = re.compile("[\ud800-\udfff]")
_LOWER_U = re.compile(r"(\\\\)|\\u([0-9a-f]{4})")


def _upper(match: re.Match) -> str:
    if match.group(1):
        return match.group(1)
    return "\\u" + match.group(2).upper()


def string(text: str) -> str:
    """A JSON string literal as qemu-ga prints it."""
    if _PLAIN.match(text):
        return '"' + text + '"'
    if _SURROGATE.search(text):
        # raw bytes handed over with surrogateescape: decode them as QEMU would
        text = decode_lossy(to_c_bytes(text))
    text = replace_noncharacters(text)
    out = json.dumps(text)
    if "\\u" in out:
        out = _LOWER_U.sub(_upper, out)
    return out


def scalar(value: Any) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return string(value)
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        return "%.17g" % value
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


_END = object()
_RECURSION_LIMIT = 100


class _TooDeep(Exception):
    pass


#: strings longer than this are encoded once, straight to bytes, and kept out
#: of the text (a 64 MiB file read must not be copied a dozen times)
BIG_STRING = 1 << 16
_ALLOWED = bytes(c for c in range(0x20, 0x7F) if c not in b'"\\')


def _big(text: str, big: list[bytes]) -> str:
    """Stash a long string's JSON bytes; return a NUL-delimited placeholder
    (JSON text never holds a raw NUL, so the placeholder is unambiguous)."""
    if text.isascii():
        data = text.encode("ascii")
        if not data.translate(None, _ALLOWED):
            big.append(data)
            return f"\0{len(big) - 1}\0"
    big.append(string(text).encode("ascii")[1:-1])
    return f"\0{len(big) - 1}\0"


def _compact(value: Any, depth: int, big: list[bytes]) -> str:
    """The recursive writer: fast for the usual shallow responses."""
    kind = type(value)
    if kind is str:
        if len(value) > BIG_STRING:
            return '"' + _big(value, big) + '"'
        return string(value)
    if kind is dict:
        if not value:
            return "{}"
        if depth > _RECURSION_LIMIT:
            raise _TooDeep
        items = qdict_items(value) if len(value) > 1 else value.items()
        return "{" + ", ".join([string(k) + ": " + _compact(v, depth + 1, big)
                                for k, v in items]) + "}"
    if kind is list or kind is tuple:
        if not value:
            return "[]"
        if depth > _RECURSION_LIMIT:
            raise _TooDeep
        return "[" + ", ".join([_compact(v, depth + 1, big) for v in value]) + "]"
    if kind is int:
        return str(value)
    if value is None or value is True or value is False:
        return scalar(value)
    if isinstance(value, (dict, list, tuple)):
        return _nested(value)
    return scalar(value)


def to_json(value: Any) -> str:
    """``value`` as qemu-ga's compact JSON text (ASCII only).

    Shallow values (every response a command builds) take a recursive
    writer; deeper ones -- an echoed ``id`` may nest 1024 levels -- an
    iterative one, so Python's recursion limit is never met.
    """
    return b"".join(_chunks(value)).decode("ascii")


def _chunks(value: Any) -> list[bytes]:
    big: list[bytes] = []
    try:
        text = _compact(value, 0, big)
    except _TooDeep:
        return [_nested(value).encode("ascii")]
    if not big:
        return [text.encode("ascii")]
    out = []
    for i, piece in enumerate(text.split("\0")):
        out.append(big[int(piece)] if i % 2 else piece.encode("ascii"))
    return out


def _nested(value: Any) -> str:
    out: list[str] = []
    # frames: [iterator, closer, is_object, first]
    stack: list[list[Any]] = []
    pending = value
    while True:
        if isinstance(pending, dict):
            if pending:
                out.append("{")
                stack.append([iter(qdict_items(pending)), "}", True, True])
            else:
                out.append("{}")
        elif isinstance(pending, (list, tuple)):
            if pending:
                out.append("[")
                stack.append([iter(pending), "]", False, True])
            else:
                out.append("[]")
        else:
            out.append(scalar(pending))
        while stack:
            frame = stack[-1]
            item = next(frame[0], _END)
            if item is _END:
                out.append(frame[1])
                stack.pop()
                continue
            if not frame[3]:
                out.append(", ")
            frame[3] = False
            if frame[2]:
                key, pending = item
                out.append(string(key))
                out.append(": ")
            else:
                pending = item
            break
        else:
            return "".join(out)


def encode_chunks(value: Any, delimited: bool = False) -> list[bytes]:
    """One response line as byte chunks (big strings are not copied into one
    buffer): optional 0xFF sentinel, the JSON, a newline."""
    chunks = _chunks(value)
    if len(chunks) == 1:  # the usual case: one write
        return [(b"\xff" if delimited else b"") + chunks[0] + b"\n"]
    if delimited:
        chunks.insert(0, b"\xff")
    chunks.append(b"\n")
    # small neighbours are joined, so a response costs few writes
    merged: list[bytes] = []
    for chunk in chunks:
        if merged and len(chunk) <= BIG_STRING and len(merged[-1]) <= BIG_STRING:
            merged[-1] += chunk
        else:
            merged.append(chunk)
    return merged


def encode_line(value: Any, delimited: bool = False) -> bytes:
    """One response line: optional 0xFF sentinel, the JSON, a newline."""
    return b"".join(encode_chunks(value, delimited))
