"""QEMU's "modified UTF-8": how qemu-ga decodes bytes into characters.

qemu-ga keeps strings as C strings in modified UTF-8 (U+0000 is the two
bytes C0 80) and, when it writes JSON, decodes them one sequence at a time,
turning every invalid sequence into U+FFFD.  How many bytes one invalid
sequence swallows decides how many U+FFFD appear, so the rules are kept
exactly here: the parser uses them to validate strings, the writer to print
bytes that are not valid UTF-8 (file names, stray input echoed in errors).
"""

from __future__ import annotations

import re

REPLACEMENT = "\ufffd"

# lowest code point each sequence length may encode (shorter is overlong)
_MIN_CP = {2: 0x80, 3: 0x800, 4: 0x10000, 5: 0x200000, 6: 0x4000000}


def valid_codepoint(cp: int) -> bool:
    """In the Unicode range, not a surrogate, not one of the 66 noncharacters."""
    if cp < 0 or cp > 0x10FFFF:
        return False
    if 0xFDD0 <= cp <= 0xFDEF or (cp & 0xFFFE) == 0xFFFE:
        return False
    return not 0xD800 <= cp <= 0xDFFF


def codepoint(data: bytes, pos: int) -> tuple[int, int]:
    """Decode the sequence at ``data[pos]``: (code point or -1, end position).

    ``data[pos]`` must exist and be non-zero.  An impossible byte (FE, FF) or
    a stray continuation byte is one invalid byte; a lead byte followed by
    too few continuation bytes is invalid up to the first non-continuation
    byte; a complete sequence is invalid when overlong (except C0 80, the
    encoding of U+0000) or when it encodes an invalid code point.
    """
    byte = data[pos]
    end = pos + 1
    if byte < 0x80:
        return byte, end
    if byte >= 0xFE or not byte & 0x40:
        return -1, end
    length = 0
    mask = 0x80
    while byte & mask:
        length += 1
        mask >>= 1
    cp = byte & (mask - 1)
    for _ in range(length - 1):
        if end >= len(data) or (data[end] & 0xC0) != 0x80:
            return -1, end
        cp = (cp << 6) | (data[end] & 0x3F)
        end += 1
    if not valid_codepoint(cp):
        return -1, end
    if cp < _MIN_CP[length] and not (cp == 0 and length == 2):
        return -1, end
    return cp, end


_ASCII_RUN = re.compile(rb"[\x01-\x7f]+")


def _decode(data: bytes, strict: bool) -> str | None:
    """Sequence by sequence; an invalid one is U+FFFD, or None when strict."""
    out: list[str] = []
    pos = 0
    n = len(data)
    while pos < n:
        run = _ASCII_RUN.match(data, pos)
        if run:
            out.append(run.group().decode("ascii"))
            pos = run.end()
            continue
        cp, pos = codepoint(data, pos)
        if cp < 0:
            if strict:
                return None
            out.append(REPLACEMENT)
        else:
            out.append(chr(cp))
    return "".join(out)


def decode_lossy(data: bytes) -> str:
    """What qemu-ga prints for the C string ``data``.

    The string ends at the first NUL byte, as a C string does; every invalid
    sequence becomes one U+FFFD.
    """
    nul = data.find(b"\0")
    if nul >= 0:
        data = data[:nul]
    if data.isascii():
        return data.decode("ascii")
    return _decode(data, strict=False) or ""


def decode_strict(data: bytes) -> str | None:
    """Decode modified UTF-8, or None if any sequence is invalid.

    C0 80 decodes to U+0000.  NUL bytes are not expected (the lexer never
    lets them into a string).
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        # C0 80, or an invalid sequence (which then fails)
        return _decode(data, strict=True)
    if not text.isascii() and _NONCHAR.search(text):
        return None
    return text


_NONCHAR = re.compile("[\ufdd0-\ufdef\ufffe\uffff\U0001fffe\U0001ffff\U0002fffe\U0002ffff"
                      "\U0003fffe\U0003ffff\U0004fffe\U0004ffff\U0005fffe\U0005ffff"
                      "\U0006fffe\U0006ffff\U0007fffe\U0007ffff\U0008fffe\U0008ffff"
                      "\U0009fffe\U0009ffff\U000afffe\U000affff\U000bfffe\U000bffff"
                      "\U000cfffe\U000cffff\U000dfffe\U000dffff\U000efffe\U000effff"
                      "\U000ffffe\U000fffff\U0010fffe\U0010ffff]")


def replace_noncharacters(text: str) -> str:
    """Noncharacters print as U+FFFD in qemu-ga's output."""
    return _NONCHAR.sub(REPLACEMENT, text)


def to_c_bytes(text: str) -> bytes:
    """The bytes qemu-ga would hold for ``text``.

    Characters U+DC80..U+DCFF are the ``surrogateescape`` stand-ins for
    undecodable bytes (how Python hands over file names and other raw
    bytes), so they turn back into those bytes; other lone surrogates are
    kept as their (invalid) three-byte encoding; U+0000 is C0 80.
    """
    out = bytearray()
    for ch in text:
        o = ord(ch)
        if 0xDC80 <= o <= 0xDCFF:
            out.append(o - 0xDC00)
        elif o == 0:
            out += b"\xc0\x80"
        else:
            out += ch.encode("utf-8", "surrogatepass")
    return bytes(out)
