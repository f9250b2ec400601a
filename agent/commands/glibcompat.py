"""What qemu-ga's C and GLib plumbing does to values, reproduced for handlers.

qemu-ga decodes base64 with QEMU's ``qbase64_decode`` (a strict character
check, then GLib's lenient decoder, which silently drops an unpadded last
group), hands strings to the OS as C strings in "modified UTF-8" (U+0000 is
the two bytes C0 80), and reports GLib file errors with GLib's own wording
and curly quotes. Handlers that must answer like qemu-ga use these helpers
instead of Python's stricter equivalents.
"""

from __future__ import annotations

import base64
import binascii
import os
import re

from agent.errors import AgentError

_B64_VALID = re.compile(r"[A-Za-z0-9+/=\n]*")
_B64_CANONICAL = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")
_B64_RANK = {c: i for i, c in enumerate(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}
_B64_RANK["="] = 0


def b64decode(text: str) -> bytes:
    """Decode like ``qbase64_decode(text, -1, ...)`` followed by ``g_base64_decode``.

    Only the base64 alphabet, ``=`` and newline are allowed ("Base64 data
    contains invalid characters" otherwise); an incomplete last group of
    fewer than four characters is dropped; ``=`` inside the data is a zero
    digit that also suppresses the byte it ends, as GLib does.
    """
    # (qemu-ga holds U+0000 as the bytes C0 80, no base64 characters either)
    if not _B64_VALID.fullmatch(text):
        raise AgentError("Base64 data contains invalid characters")
    if _B64_CANONICAL.fullmatch(text):
        return binascii.a2b_base64(text)
    return _glib_b64decode(text)


def _glib_b64decode(text: str) -> bytes:
    out = bytearray()
    value = count = 0
    last = prev = ""
    for ch in text:
        rank = _B64_RANK.get(ch)
        if rank is None:
            continue
        prev, last = last, ch
        value = (value << 6) | rank
        count += 1
        if count == 4:
            out.append((value >> 16) & 0xFF)
            if prev != "=":
                out.append((value >> 8) & 0xFF)
            if last != "=":
                out.append(value & 0xFF)
            value = count = 0
    return bytes(out)


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def os_bytes(text: str) -> bytes:
    """A JSON string as the bytes qemu-ga passes to the OS (U+0000 becomes C0 80)."""
    return text.encode("utf-8", "surrogatepass").replace(b"\0", b"\xc0\x80")


def c_string(data: bytes) -> bytes:
    """``data`` as C code sees it: up to the first NUL byte."""
    nul = data.find(b"\0")
    return data if nul < 0 else data[:nul]


def strerror(err: OSError | int) -> str:
    code = err if isinstance(err, int) else (err.errno or 0)
    return os.strerror(code)


def file_get_contents_error(path: str, err: OSError, stage: str) -> str:
    """GLib's message for a failed ``g_file_get_contents``.

    ``stage`` is "open", "read" (a regular file) or "stream" (anything else,
    e.g. a directory, which GLib reads through stdio).
    """
    what = {"open": "Failed to open file", "read": "Failed to read from file",
            "stream": "Error reading file"}[stage]
    return f"{what} \u201c{path}\u201d: {strerror(err)}"


def os_path(text: str) -> str:
    """A JSON string as a path for ``os`` calls, byte-exact with :func:`os_bytes`."""
    return os.fsdecode(os_bytes(text))
