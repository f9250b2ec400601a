"""Sizes as qemu-img reads and writes them.

``parse_size`` accepts what QEMU's ``qemu_strtosz`` accepts: a decimal
integer (or ``0x`` hex) with an optional binary suffix ``b k M G T P E``
(any case), and a decimal fraction when a suffix scales it (``1.5M``). The
result is exact: the fraction is held as 64-bit fixed point and rounded half
up, as QEMU does, so ``1.7k`` is 1741 in both tools.

``human_size`` prints a byte count the way ``qemu-img info`` does: three
significant digits (C's ``%0.3g``) in the largest binary unit that keeps the
value below 1000 (``0.977 MiB`` for 1000 KiB, ``1e+03 KiB`` for 999.5 KiB).

``cvtnum`` is qemu-img's wrapper for command-line numbers, with its
two-line "Invalid NAME specified" message and range checks.
"""

from __future__ import annotations

from imagetools.errors import ImageError
from imagetools.output import Reported, warn

INT64_MAX = (1 << 63) - 1
_U64 = 1 << 64
_SUFFIXES = "BKMGTPE"
_SPACE = " \t\n\v\f\r"


class SizeError(ImageError):
    """A size that does not parse; ``out_of_range`` tells which message fits."""

    def __init__(self, text: str, out_of_range: bool = False) -> None:
        super().__init__(f"invalid size: {text!r}")
        self.text = text
        self.out_of_range = out_of_range


def strtou64(text: str, base: int) -> tuple[int, int]:
    """Like C ``strtoull`` (base 0, 10 or 16): (value, characters consumed).

    A leading ``-`` wraps around as in C; no digits or a value above 2^64-1
    raise :class:`SizeError`.
    """
    i = 0
    n = len(text)
    while i < n and text[i] in _SPACE:
        i += 1
    negative = False
    if i < n and text[i] in "+-":
        negative = text[i] == "-"
        i += 1
    hex_prefix = (text[i:i + 2] in ("0x", "0X") and i + 2 < n
                  and text[i + 2] in "0123456789abcdefABCDEF")
    if base == 0:
        base = 16 if hex_prefix else 8 if text[i:i + 1] == "0" else 10
    if base == 16 and hex_prefix:
        i += 2
    digits = "0123456789abcdef"[:base]
    start = i
    while i < n and text[i].lower() in digits:
        i += 1
    if i == start:
        raise SizeError(text)
    value = int(text[start:i], base)
    if value >= _U64:
        raise SizeError(text, out_of_range=True)
    if negative:
        value = (-value) % _U64
    return value, i


def _fraction(text: str, dot: int) -> tuple[str, bool, int]:
    """At ``text[dot] == '.'``: (digits after the dot, exponent follows, end of digits)."""
    end = dot + 1
    while end < len(text) and text[end].isdigit() and text[end].isascii():
        end += 1
    exp = end
    if exp < len(text) and text[exp] in "eE":
        exp += 1
        if exp < len(text) and text[exp] in "+-":
            exp += 1
        start = exp
        while exp < len(text) and text[exp].isdigit() and text[exp].isascii():
            exp += 1
        return text[dot + 1:end], exp > start, end
    return text[dot + 1:end], False, end


def parse_size(text: str, default_suffix: str = "B", unit: int = 1024) -> int:
    """Bytes for ``text`` as qemu_strtosz reads it; raises :class:`SizeError`."""
    value, end = strtou64(text, 10)
    if "-" in text[:end]:
        raise SizeError(text)
    hexadecimal = False
    fraction = 0
    if value == 0 and text[end:end + 1] in ("x", "X"):
        value, end = strtou64(text, 16)
        if text[end:end + 1] == ".":
            raise SizeError(text)
        hexadecimal = True
    elif text[end:end + 1] == ".":
        digits, exponent, digits_end = _fraction(text, end)
        if digits or exponent:
            if exponent and digits:
                raise SizeError(text)
            if digits:
                scaled = float("0." + digits) * 18446744073709551616.0
                # C's cast of an out-of-range double gives 0 on x86-64.
                fraction = int(scaled) if scaled < _U64 else 0
                end = digits_end
            else:
                end += 1
        else:
            end += 1
    suffix = text[end:end + 1].upper()
    if suffix and suffix in _SUFFIXES:
        multiplier = unit ** _SUFFIXES.index(suffix)
        end += 1
        if hexadecimal:
            warn(f"Using a multiplier suffix on hex numbers is deprecated: {text}")
    else:
        multiplier = unit ** _SUFFIXES.index(default_suffix.upper())
    if end != len(text):
        raise SizeError(text)
    if multiplier == 1:
        if fraction:
            raise SizeError(text)
        return value
    product = fraction * multiplier
    total = value * multiplier + (product >> 64) + ((product & (_U64 - 1)) >> 63)
    if total >= _U64:
        raise SizeError(text, out_of_range=True)
    return total


def cvtnum(name: str, text: str, minimum: int = 0, maximum: int = INT64_MAX) -> int:
    """A command-line size/number with qemu-img's messages for bad values."""
    try:
        value = parse_size(text)
    except SizeError as err:
        if not err.out_of_range:
            raise Reported(
                f"Invalid {name} specified. You may use k, M, G, T, P or E suffixes for",
                "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.") from None
        value = maximum + 1
    if value > maximum or value < minimum:
        raise Reported(f"Invalid {name} specified. Must be between {minimum} and {maximum}.")
    return value


def parse_option_size(name: str, text: str) -> int:
    """A size-typed ``-o`` option value, with QemuOpts' error message."""
    try:
        return parse_size(text)
    except SizeError:
        raise ImageError(
            f"Parameter '{name}' expects a non-negative number below 2^64\n"
            "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
            "and exabytes, respectively.") from None


def human_size(value: int) -> str:
    """``qemu-img info``'s rendering of a byte count (``1.5 KiB``, ``64 MiB``)."""
    # frexp's binary exponent of the scaled value (its integer part has the
    # same bit length; no math import at start-up)
    exponent = int(value / (1000.0 / 1024.0)).bit_length()
    index = max(0, (exponent - 1) // 10)
    index = min(index, 6)
    return "%0.3g %sB" % (value / (1 << (index * 10)), ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")[index])
