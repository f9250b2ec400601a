"""``-o name=value,...`` option lists, read and echoed as qemu-img does.

qemu-img keeps creation options in a QemuOpts list: each format declares
its options (name, type, help, default) in a fixed order, the file protocol
adds its own after them, and the ``Formatting 'F', fmt=...`` line prints
every option that was given or has a default, in that declared order, with
sizes normalised to bytes and everything else echoed as typed. This module
holds those declarations for the formats qimg creates (raw and qcow2, plus
the file protocol), parses option strings with QemuOpts' rules (``,,`` is a
literal comma, a bare ``name`` means ``name=on``, ``help``/``?`` asks for the
list) and renders ``-o help`` and the Formatting line.
"""

from __future__ import annotations

from collections import namedtuple

from imagetools.output import Reported

STR, BOOL, NUMBER, SIZE = "str", "bool (on/off)", "num", "size"


class OptionDesc(namedtuple("OptionDesc", "name type help default", defaults=(None,))):
    """One ``-o`` option: name, type (STR, BOOL, NUMBER, SIZE), help text,
    default shown by ``-o help`` (an immutable value; a named tuple rather
    than a dataclass, which would cost start-up time)."""

    __slots__ = ()


SIZE_OPT = OptionDesc("size", SIZE, "Virtual disk size")

#: options of the "file" protocol driver, appended after a format's own
FILE_PROTOCOL = (
    SIZE_OPT,
    OptionDesc("nocow", BOOL, "Turn off copy-on-write (valid only on btrfs)"),
    OptionDesc("preallocation", STR, "Preallocation mode (allowed values: off, falloc, full)"),
    OptionDesc("extent_size_hint", SIZE, "Extent size hint for the image file, 0 to disable"),
)

QCOW2 = (
    OptionDesc("encryption", BOOL,
               "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)"),
    OptionDesc("encrypt.format", STR, "Encrypt the image, format choices: 'aes', 'luks'"),
    OptionDesc("encrypt.key-secret", STR, "ID of secret providing qcow AES key or LUKS passphrase"),
    OptionDesc("encrypt.cipher-alg", STR, "Name of encryption cipher algorithm"),
    OptionDesc("encrypt.cipher-mode", STR, "Name of encryption cipher mode"),
    OptionDesc("encrypt.ivgen-alg", STR, "Name of IV generator algorithm"),
    OptionDesc("encrypt.ivgen-hash-alg", STR, "Name of IV generator hash algorithm"),
    OptionDesc("encrypt.hash-alg", STR, "Name of encryption hash algorithm"),
    OptionDesc("encrypt.iter-time", NUMBER, "Time to spend in PBKDF in milliseconds"),
    OptionDesc("cluster_size", SIZE, "qcow2 cluster size", "65536"),
    OptionDesc("extended_l2", BOOL, "Extended L2 tables", "off"),
    OptionDesc("preallocation", STR,
               "Preallocation mode (allowed values: off, metadata, falloc, full)"),
    OptionDesc("compression_type", STR, "Compression method used for image cluster compression",
               "zlib"),
    SIZE_OPT,
    OptionDesc("compat", STR, "Compatibility level (v2 [0.10] or v3 [1.1])"),
    OptionDesc("backing_file", STR, "File name of a base image"),
    OptionDesc("backing_fmt", STR, "Image format of the base image"),
    OptionDesc("data_file", STR, "File name of an external data file"),
    OptionDesc("data_file_raw", BOOL, "The external data file must stay valid as a raw image"),
    OptionDesc("lazy_refcounts", BOOL, "Postpone refcount updates", "off"),
    OptionDesc("refcount_bits", NUMBER, "Width of a reference count entry in bits", "16"),
)

RAW = (SIZE_OPT,)

FORMAT_OPTIONS: dict[str, tuple[OptionDesc, ...]] = {"qcow2": QCOW2, "raw": RAW}


def format_options(fmt: str) -> tuple[OptionDesc, ...] | None:
    """The creation options of format ``fmt`` in declaration order, or None
    if qimg cannot create that format.

    A driver may declare them itself (``create_options``, items with
    ``name``, ``type``, ``help`` and ``default``); raw and qcow2 use the
    tables above.
    """
    if fmt in FORMAT_OPTIONS:
        return FORMAT_OPTIONS[fmt]
    from imagetools.ops.common import known_format
    if not known_format(fmt):
        return None
    from imagetools.errors import ImageError
    from imagetools.formats import driver
    try:
        cls = driver(fmt)
    except ImageError:
        return None
    declared = getattr(cls, "create_options", None)
    if not declared or "create" not in vars(cls):
        return None
    return tuple(OptionDesc(d.name, d.type, d.help, d.default) for d in declared)


def with_protocol(descs: tuple[OptionDesc, ...]) -> tuple[OptionDesc, ...]:
    """The format's options followed by the file protocol's new ones."""
    names = {d.name for d in descs}
    return descs + tuple(d for d in FILE_PROTOCOL if d.name not in names)


# -- parsing -------------------------------------------------------------------

def valid_option_list(text: str) -> bool:
    """qemu-img refuses an empty list, a leading comma and an odd trailing comma run."""
    if not text or text[0] == ",":
        return False
    trailing = len(text) - len(text.rstrip(","))
    return trailing % 2 == 0


def split_options(text: str) -> list[tuple[str, str, bool]]:
    """``(name, value, was_flag)`` items of an option string, ``,,`` unescaped."""
    items = []
    i, n = 0, len(text)
    while i < n:
        j = i
        while j < n and text[j] not in "=,":
            j += 1
        name = text[i:j]
        if j < n and text[j] == "=":
            value, i = _value(text, j + 1)
            items.append((name, value, False))
        else:
            if name.startswith("no") and name not in ("help",):
                items.append((name[2:], "off", True))
            else:
                items.append((name, "on", True))
            i = j
        if i < n and text[i] == ",":
            i += 1
    return items


def _value(text: str, i: int) -> tuple[str, int]:
    out = []
    n = len(text)
    while i < n:
        if text[i] == ",":
            if i + 1 < n and text[i + 1] == ",":
                out.append(",")
                i += 2
                continue
            break
        out.append(text[i])
        i += 1
    return "".join(out), i


def wants_help(text: str) -> bool:
    return any(flag and name in ("help", "?") for name, _, flag in split_options(text))


def _number(name: str, value: str) -> int:
    from imagetools.sizes import SizeError, strtou64
    try:
        number, end = strtou64(value, 0)
    except SizeError:
        end = -1
    if end != len(value):
        raise Reported(f"Parameter '{name}' expects a number")
    return number


def _bool(name: str, value: str) -> bool:
    if value in ("on", "yes", "true", "y"):
        return True
    if value in ("off", "no", "false", "n"):
        return False
    raise Reported(f"Parameter '{name}' expects 'on' or 'off'")


def _size(name: str, value: str) -> int:
    from imagetools.sizes import SizeError, parse_size
    try:
        return parse_size(value)
    except SizeError as err:
        if err.out_of_range:
            raise Reported(f"Value '{value}' is out of range for parameter '{name}'") from None
        raise Reported(
            f"Parameter '{name}' expects a non-negative number below 2^64\n"
            "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
            "and exabytes, respectively.") from None


class Options:
    """A parsed option list against one declared option set.

    ``given`` maps names to the text typed (last one wins); ``values`` maps
    names to typed values (int for sizes and numbers, bool for booleans,
    str otherwise), defaults included.
    """

    def __init__(self, descs: tuple[OptionDesc, ...]) -> None:
        self.descs = descs
        self._by_name = {d.name: d for d in descs}
        self.given: dict[str, str] = {}
        self.values: dict[str, object] = {}
        for desc in descs:
            if desc.default is not None:
                self.values[desc.name] = self._convert(desc, desc.default)

    def parse(self, text: str) -> "Options":
        for name, value, _ in split_options(text):
            self.set(name, value)
        return self

    def set(self, name: str, value: str) -> None:
        desc = self._by_name.get(name)
        if desc is None:
            raise Reported(f"Invalid parameter '{name}'")
        self.values[name] = self._convert(desc, value)
        self.given[name] = value

    def set_number(self, name: str, value: int) -> None:
        self.set(name, str(value))

    def given_values(self) -> dict[str, object]:
        """Typed values of the options that were given (no defaults)."""
        return {name: self.values[name] for name in self.given}

    def has(self, name: str) -> bool:
        return name in self.given

    def get(self, name: str, default: object = None) -> object:
        return self.values.get(name, default)

    @staticmethod
    def _convert(desc: OptionDesc, value: str) -> object:
        if desc.type == BOOL:
            return _bool(desc.name, value)
        if desc.type == NUMBER:
            return _number(desc.name, value)
        if desc.type == SIZE:
            return _size(desc.name, value)
        return value

    def formatting_line(self) -> str:
        """The ``key=value`` part of the Formatting line, in declared order."""
        parts = []
        for desc in self.descs:
            if desc.name in self.given:
                text = self.given[desc.name]
                if desc.type in (SIZE, NUMBER):
                    number = self.values[desc.name]
                    text = str(number - (1 << 64) if number >= 1 << 63 else number)
            elif desc.default is not None:
                text = desc.default
            else:
                continue
            if desc.type == STR:
                text = text.replace(",", ",,")
            parts.append(f"{desc.name}={text}")
        return " ".join(parts)


def target_options(fmt: str, text: str | None, backing_file: str | None = None,
                   backing_fmt: str | None = None) -> Options:
    """The creation options for a new ``fmt`` image: ``-o`` text plus ``-b``/``-F``.

    Raises qemu-img's errors for an unknown format, a format qimg cannot
    create, bad option names or values, and backing options the format
    does not have.
    """
    descs = format_options(fmt)
    if descs is None:
        from imagetools.ops.common import known_format
        if known_format(fmt):
            raise Reported(f"Format driver '{fmt}' does not support image creation")
        raise Reported(f"Unknown file format '{fmt}'")
    opts = Options(with_protocol(descs))
    if text:
        opts.parse(text)
    names = {d.name for d in descs}
    if backing_file is not None:
        if "backing_file" not in names:
            raise Reported(f"Backing file not supported for file format '{fmt}'")
        opts.set("backing_file", backing_file)
    if backing_fmt is not None:
        if "backing_fmt" not in names:
            raise Reported(f"Backing file format not supported for file format '{fmt}'")
        opts.set("backing_fmt", backing_fmt)
    return opts


def help_listing(descs: tuple[OptionDesc, ...]) -> str:
    """``-o help`` body: one sorted line per option."""
    lines = []
    for desc in descs:
        line = f"  {desc.name}=<{desc.type}>"
        if desc.help:
            line = line.ljust(24) + f" - {desc.help}"
        lines.append(line)
    lines.sort()
    return "".join(line + "\n" for line in lines)


def print_help(fmt: str, filename: str | None) -> int:
    """qemu-img's ``-o help``: the format's options, plus the protocol's with a file."""
    import sys
    descs = format_options(fmt)
    if descs is None:
        from imagetools.ops.common import known_format
        if known_format(fmt):
            raise Reported(f"Format driver '{fmt}' does not support image creation")
        raise Reported(f"Unknown file format '{fmt}'")
    if filename is not None:
        sys.stdout.write("Supported options:\n" + help_listing(with_protocol(descs)))
    else:
        sys.stdout.write(f"Supported {fmt} options:\n" + help_listing(descs) +
                         "\nThe protocol level may support further options.\n"
                         "Specify the target filename to include those options.\n")
    return 0
