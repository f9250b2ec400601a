"""Turning the tokens of one message into a value, with qemu-ga's errors.

Values are plain Python: dict (members in the order they arrived), list,
str, int, float, bool, None.  An integer literal within int64 or uint64 is an
int; beyond that it becomes a float, as in QEMU (so it is then rejected
where an integer is expected).  The first error ends parsing and is raised
as :class:`JSONParseError` with qemu-ga's text (``JSON parse error, ...``).

The parser is iterative: nesting is already limited to 1024 levels by the
framer, but Python's recursion limit is not something to lean on.
"""

from __future__ import annotations

import json
import re
from typing import Any

from agent.jsonstream import (COLON, COMMA, FLOAT, INTEGER, KEYWORD, LCURLY, LSQUARE,
                              RCURLY, RSQUARE, STRING, Token)
from agent.modutf8 import decode_lossy, decode_strict, valid_codepoint

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
UINT64_MAX = (1 << 64) - 1


class JSONParseError(Exception):
    def __init__(self, message: str) -> None:
        # qemu-ga formats the detail into a 1024-byte buffer
        detail = message.encode("utf-8")[:1023].decode("utf-8", "ignore")
        super().__init__(f"JSON parse error, {detail}")
        self.desc = f"JSON parse error, {detail}"


_SIMPLE_ESCAPES = {ord('"'): '"', ord("'"): "'", ord("\\"): "\\", ord("/"): "/",
                   ord("b"): "\b", ord("f"): "\f", ord("n"): "\n", ord("r"): "\r",
                   ord("t"): "\t"}
_HEX = b"0123456789abcdefABCDEF"


def _hex4(text: bytes, pos: int) -> int:
    """Four hex digits at ``text[pos]`` as a number, or -1 (cvt4hex)."""
    digits = text[pos:pos + 4]
    if len(digits) < 4 or any(d not in _HEX for d in digits):
        return -1
    return int(digits, 16)


def _plain(piece: bytes) -> str:
    text = decode_strict(piece)
    if text is None:
        raise JSONParseError("invalid UTF-8 sequence in string")
    return text


def parse_string(text: bytes) -> str:
    """Decode a string token (quotes included) as qemu-ga does."""
    body = text[1:-1]
    if b"\\" not in body:
        return _plain(body)
    out: list[str] = []
    pos = 0
    # the C code may read past the closing quote, up to the token's NUL
    cstr = text[1:]
    while True:
        bs = body.find(b"\\", pos)
        if bs < 0:
            out.append(_plain(body[pos:]))
            return "".join(out)
        if bs > pos:
            out.append(_plain(body[pos:bs]))
        esc = body[bs + 1]
        simple = _SIMPLE_ESCAPES.get(esc)
        if simple is not None:
            out.append(simple)
            pos = bs + 2
            continue
        if esc != ord("u"):
            raise JSONParseError("invalid escape sequence in string")
        cp = _hex4(cstr, bs + 2)
        end = bs + 6
        if 0xD800 <= cp <= 0xDBFF and cstr[end:end + 2] == b"\\u":
            trailing = _hex4(cstr, end + 2)
            if 0xDC00 <= trailing <= 0xDFFF:
                cp = 0x10000 + ((cp & 0x3FF) << 10) | (trailing & 0x3FF)
                end += 6
            else:
                cp = -1
        if not valid_codepoint(cp):
            shown = decode_lossy(cstr[bs:end])
            raise JSONParseError(f"{shown} is not a valid Unicode character")
        out.append(chr(cp))
        pos = end


def _integer(text: bytes | str) -> int | float:
    if len(text) > 21:
        return float(text)  # beyond uint64 anyway (and beyond int()'s digit limit)
    value = int(text)
    if INT64_MIN <= value <= INT64_MAX or 0 <= value <= UINT64_MAX:
        return value
    return float(text)


_KEYWORDS = {b"true": True, b"false": False, b"null": None}

# frame kinds on the parser stack
_OBJECT_KEY, _OBJECT_VALUE, _ARRAY = 0, 1, 2


def parse_tokens(tokens: list[Token]) -> Any:
    """The value the tokens of one message spell, or :class:`JSONParseError`."""
    pos = 0
    count = len(tokens)
    # each frame: [kind, container, pending key]
    stack: list[list[Any]] = []

    def next_token() -> Token:
        nonlocal pos
        if pos >= count:
            raise JSONParseError("premature EOI")
        token = tokens[pos]
        pos += 1
        return token

    while True:
        # ---- parse one value, or open a container
        if pos >= count:
            raise JSONParseError("premature EOI")
        token = tokens[pos]
        kind = token.kind
        if kind == LCURLY or kind == LSQUARE:
            pos += 1
            if pos >= count:
                raise JSONParseError("premature EOI")
            closer = RCURLY if kind == LCURLY else RSQUARE
            if tokens[pos].kind == closer:
                pos += 1
                value: Any = {} if kind == LCURLY else []
            else:
                stack.append([_OBJECT_KEY if kind == LCURLY else _ARRAY,
                              {} if kind == LCURLY else [], None])
                continue
        else:
            pos += 1
            if kind == STRING:
                value = parse_string(token.text)
            elif kind == INTEGER:
                value = _integer(token.text)
            elif kind == FLOAT:
                value = float(token.text)
            elif kind == KEYWORD:
                if token.text not in _KEYWORDS:
                    raise JSONParseError(f"invalid keyword '{token.text.decode('ascii')}'")
                value = _KEYWORDS[token.text]
            else:
                raise JSONParseError("expecting value")

        # ---- a value is complete: hand it to the enclosing containers
        while True:
            if not stack:
                return value
            frame = stack[-1]
            if frame[0] == _OBJECT_KEY:
                if not isinstance(value, str):
                    raise JSONParseError("key is not a string in object")
                if next_token().kind != COLON:
                    raise JSONParseError("missing : in object pair")
                frame[0] = _OBJECT_VALUE
                frame[2] = value
                break
            if frame[0] == _OBJECT_VALUE:
                if frame[2] in frame[1]:
                    raise JSONParseError("duplicate key")
                frame[1][frame[2]] = value
                sep = next_token().kind
                if sep == RCURLY:
                    stack.pop()
                    value = frame[1]
                    continue
                if sep != COMMA:
                    raise JSONParseError("expected separator in dict")
                frame[0] = _OBJECT_KEY
                if pos >= count:
                    raise JSONParseError("premature EOI")
                break
            frame[1].append(value)
            sep = next_token().kind
            if sep == RSQUARE:
                stack.pop()
                value = frame[1]
                continue
            if sep != COMMA:
                raise JSONParseError("expected separator in list")
            break


# ---------------------------------------------------------------- fast path

_FAST_WINDOW = 64 << 10
#: printable ASCII and JSON whitespace, without ' and \: inside such bytes
#: QEMU's dialect and standard JSON read the same way
_FAST_REGION = re.compile(rb"[ \t\r\n]*\{[\t\n\r\x20-\x26\x28-\x5b\x5d-\x7e]*")
_FAST_MAX_DEPTH = 64


class _NotFast(Exception):
    pass


def _fast_pairs(pairs: list) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise _NotFast  # duplicate key: the slow path words the error
    return out


def _fast_constant(_name: str) -> Any:
    raise _NotFast  # NaN/Infinity are not JSON to QEMU


_DECODER = json.JSONDecoder(object_pairs_hook=_fast_pairs, parse_int=_integer,
                            parse_constant=_fast_constant)


def fast_parse(data: bytes, pos: int) -> tuple[Any, int] | None:
    """(value, end) for a plain object request at ``data[pos:]``, or None.

    Most requests are small objects of printable ASCII without quotes of
    the single kind or backslashes; for those QEMU's reader and Python's C
    JSON decoder agree exactly (same numbers, same keywords, duplicates
    and errors sent to the exact path), so they are read in one C call.
    Anything else -- escapes, non-ASCII, errors, requests cut by a read,
    deep nesting, big requests -- returns None for the exact reader.
    """
    region = _FAST_REGION.match(data, pos, pos + _FAST_WINDOW)
    if region is None:
        return None
    text = region.group().decode("ascii")
    start = text.index("{")
    try:
        value, end = _DECODER.raw_decode(text, start)
    except (ValueError, _NotFast, RecursionError):
        return None
    consumed = text[:end]
    if consumed.count("{") + consumed.count("[") > _FAST_MAX_DEPTH:
        return None
    return value, pos + end
