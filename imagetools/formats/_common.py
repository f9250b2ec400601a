"""Values and helpers the other image formats share (qcow v1, qed, vdi, vpc,
vhdx, vmdk, parallels, bochs, cloop, dmg).

:class:`OptionSpec` is a create option as the ``Formatting ...`` line and
``-o help`` need it; :class:`CheckResult` is what ``qemu-img check`` reports
(the qcow2 driver's field names); the rest are the bounds-checked table
readers, integer helpers and ``-o`` option parsers every header parser uses.

The mapping machinery is in :mod:`._mapped` (runs, the driver base) and
:mod:`._writes` (copy-on-write allocation).
"""

from __future__ import annotations

import struct
from array import array
from typing import Any, NamedTuple

from imagetools.errors import CorruptImageError, ImageError

SECTOR = 512

#: tables larger than this are refused outright (a hostile header could
#: otherwise make us allocate gigabytes before looking at the file)
MAX_TABLE_BYTES = 1 << 30


# -- values --------------------------------------------------------------------

class OptionSpec(NamedTuple):
    """One ``-o`` create option: what ``-o help`` and the Formatting line show.

    ``type`` is qemu-img's type word as ``-o help`` prints it (``str``,
    ``bool (on/off)``, ``num``, ``size``); ``default`` the text the
    Formatting line prints when the option was not given (None: omitted).
    Drivers list their options in QEMU's declaration order as
    ``create_options`` (the order of the Formatting line).
    """

    name: str
    type: str
    help: str
    default: str | None = None


class CheckResult:
    """What ``qemu-img check`` reports (the qcow2 driver's field names).

    ``messages`` are the per-problem lines qemu-img prints on stderr, in
    order, without the final newline.
    """

    FIELDS = ("check_errors", "corruptions", "leaks", "corruptions_fixed", "leaks_fixed",
              "image_end_offset", "total_clusters", "allocated_clusters",
              "fragmented_clusters", "compressed_clusters")

    def __init__(self, **values: int) -> None:
        for name in self.FIELDS:
            setattr(self, name, int(values.pop(name, 0)))
        if values:
            raise TypeError(f"unknown check fields {sorted(values)}")
        self.messages: list[str] = []

    def error(self, message: str) -> None:
        """One corruption, with qemu-img's stderr line."""
        self.corruptions += 1
        self.messages.append(message)

    def leak(self, message: str | None = None) -> None:
        self.leaks += 1
        if message:
            self.messages.append(message)

    def __repr__(self) -> str:
        values = ", ".join(f"{n}={getattr(self, n)}" for n in self.FIELDS if getattr(self, n))
        return f"CheckResult({values})"


# -- small helpers ----------------------------------------------------------------

def round_up(n: int, align: int) -> int:
    return -(-n // align) * align


def div_round_up(n: int, d: int) -> int:
    return -(-n // d)


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def cstr(field: bytes) -> bytes:
    """A NUL-terminated C string inside a fixed-size field."""
    end = field.find(b"\0")
    return field if end < 0 else field[:end]


def le_table(data: bytes, width: int) -> array:
    """A little-endian table of u32 (width 4) or u64 (width 8) entries."""
    table = array("I" if width == 4 else "Q")
    if table.itemsize != width:                         # pragma: no cover - exotic ABIs
        table = array("L" if width == 4 else "Q")
    table.frombytes(data[:len(data) // width * width])
    if struct.pack("=H", 1) != struct.pack("<H", 1):    # pragma: no cover - big-endian host
        table.byteswap()
    return table


def be_table(data: bytes, width: int) -> array:
    """A big-endian table of u32 / u64 entries."""
    table = le_table(data, width)
    table.byteswap()
    return table


def table_bytes(table: array, start: int, stop: int, big_endian: bool = False) -> bytes:
    """Entries ``[start, stop)`` of ``table`` encoded for the disk."""
    part = table[start:stop]
    little_host = struct.pack("=H", 1) == struct.pack("<H", 1)
    if big_endian == little_host:
        part.byteswap()
    return part.tobytes()


def read_table(file, offset: int, count: int, width: int, what: str, *,
               big_endian: bool = False, pad_to: int = 1) -> array:
    """Load ``count`` entries at ``offset``, refusing tables outside the file.

    ``pad_to`` rounds the byte length read up (QEMU reads whole sectors);
    the padding is read too but only ``count`` entries are returned.
    """
    nbytes = count * width
    if nbytes > MAX_TABLE_BYTES:
        raise CorruptImageError(f"{what} is too large ({count} entries)")
    if offset < 0 or offset + nbytes > file.length():
        raise CorruptImageError(f"{what} lies beyond the end of the file "
                                f"(offset {offset}, {nbytes} bytes)")
    data = file.pread_full(offset, round_up(nbytes, pad_to))[:nbytes]
    table = be_table(data, width) if big_endian else le_table(data, width)
    return table






def bool_option(options: dict[str, Any], name: str, default: bool = False) -> bool:
    """A boolean create option given as bool or QEMU's on/off words."""
    value = options.get(name)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    text = str(value)
    if text in ("on", "yes", "true", "y"):
        return True
    if text in ("off", "no", "false", "n"):
        return False
    raise ImageError(f"Parameter '{name}' expects 'on' or 'off'")


def size_option(options: dict[str, Any], name: str, default: int) -> int:
    """A size create option given as int or as text with QEMU's suffixes."""
    value = options.get(name)
    if value is None:
        return default
    if isinstance(value, int):
        return value
    from imagetools.sizes import SizeError, parse_size
    try:
        return parse_size(str(value))
    except SizeError:
        raise ImageError(f"Parameter '{name}' expects a non-negative number below 2^64\n"
                         "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, "
                         "tera-, peta-\nand exabytes, respectively.") from None


def refuse_options(options: dict[str, Any], allowed: tuple[str, ...]) -> None:
    """Unknown ``-o`` names, as qemu-img's QemuOpts reports them."""
    for key in options:
        if key not in allowed and key not in ("size", "preallocation", "nocow",
                                               "extent_size_hint"):
            raise ImageError(f"Invalid parameter '{key}'")


def file_preallocation(options: dict[str, Any]) -> str:
    """The file protocol's ``preallocation`` option (off | falloc | full)."""
    mode = str(options.get("preallocation") or "off")
    if mode not in ("off", "falloc", "full"):
        raise ImageError(f"Parameter 'preallocation' does not accept value '{mode}'")
    return mode


def new_host_file(filename: str):
    """Create (truncate) the container file of a new image, with QEMU's locks."""
    from imagetools.formats.hostfile import HostFile
    file = HostFile.open(filename, read_only=False, create=True)
    try:
        file.truncate(0)
    except BaseException:
        file.close()
        raise
    return file
