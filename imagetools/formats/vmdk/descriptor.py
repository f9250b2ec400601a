"""The VMDK text descriptor, read with QEMU's rules and written as QEMU writes it.

QEMU does not parse the descriptor as a key/value file: it looks values up
by substring search (``createType="``, ``parentFileNameHint="``, the first
``CID``, ``parentCID``) and reads extent lines with one ``sscanf`` pattern,
``<access> <sectors> <type> "<file>" [<offset>]``, applied at the start of
every line (so a conversion may run on into the following lines, as in C).
Keeping those rules means a descriptor opens here exactly when it opens in
QEMU, with the same extents.

:func:`render` produces the text ``qemu-img create -f vmdk`` writes, and
:func:`with_cid` the in-place CID update QEMU makes on the first write of
every session.
"""

from __future__ import annotations

from dataclasses import dataclass

#: bytes of an embedded descriptor QEMU reads for the CIDs (20 sectors)
DESC_SIZE = 20 * 512
#: longest stand-alone descriptor QEMU reads
MAX_DESC_FILE = (1 << 20) - 1

TEMPLATE = (
    "# Disk DescriptorFile\n"
    "version=1\n"
    "CID={cid:x}\n"
    "parentCID={parent_cid:x}\n"
    "createType=\"{create_type}\"\n"
    "{parent_line}"
    "\n"
    "# Extent description\n"
    "{extents}"
    "\n"
    "# The Disk Data Base\n"
    "#DDB\n"
    "\n"
    "ddb.virtualHWVersion = \"{hw_version}\"\n"
    "ddb.geometry.cylinders = \"{cylinders}\"\n"
    "ddb.geometry.heads = \"{heads}\"\n"
    "ddb.geometry.sectors = \"63\"\n"
    "ddb.adapterType = \"{adapter_type}\"\n"
    "ddb.toolsVersion = \"{tools_version}\"\n"
)


@dataclass
class ExtentLine:
    access: str
    sectors: int
    type: str
    filename: str
    offset: int          # start sector in the file (FLAT), 0 otherwise


class DescriptorError(Exception):
    """The descriptor cannot be used; ``str()`` is QEMU's message."""


def text_of(raw: bytes) -> str:
    """Descriptor bytes as text, up to the first NUL (QEMU reads C strings)."""
    end = raw.find(b"\0")
    if end >= 0:
        raw = raw[:end]
    return raw.decode("latin-1")


def quoted_value(desc: str, name: str) -> str | None:
    """QEMU's vmdk_parse_description: the text after ``name="`` up to ``"``."""
    pos = desc.find(name)
    if pos < 0:
        return None
    start = pos + len(name) + 2
    if start >= len(desc):
        return None
    end = desc.find('"', start)
    if end < 0:
        return None
    return desc[start:end]


def parent_hint(desc: str) -> str | None:
    """``parentFileNameHint="..."`` (None when absent); raises when malformed."""
    pos = desc.find("parentFileNameHint")
    if pos < 0:
        return None
    start = pos + len("parentFileNameHint") + 2
    end = desc.find('"', start)
    if end < 0 or end - start > 4095:
        raise DescriptorError("Invalid argument")
    return desc[start:end]


def _hex_after(desc: str, pos: int) -> int | None:
    """sscanf("%x") at ``pos``: optional blanks, optional 0x, hex digits."""
    i = pos
    n = len(desc)
    while i < n and desc[i] in " \t\n\r\v\f":
        i += 1
    if i + 1 < n and desc[i] == "0" and desc[i + 1] in "xX" and i + 2 < n and \
            desc[i + 2] in "0123456789abcdefABCDEF":
        i += 2
    j = i
    while j < n and desc[j] in "0123456789abcdefABCDEF":
        j += 1
    if j == i:
        return None
    return int(desc[i:j], 16) & 0xFFFFFFFF


def read_cid(desc: str, parent: bool) -> int:
    """The CID (or parentCID) as QEMU reads it: first occurrence of the name."""
    name = "parentCID" if parent else "CID"
    pos = desc.find(name)
    if pos < 0:
        raise DescriptorError("Invalid argument")
    value = _hex_after(desc, pos + len(name) + 1)
    if value is None:
        raise DescriptorError("Invalid argument")
    return value


def with_cid(desc: str, cid: int) -> str:
    """The descriptor with a new CID, rewritten the way QEMU rewrites it."""
    tail = desc.find("parentCID")
    if tail < 0:
        raise DescriptorError("Invalid argument")
    rest = desc[tail:]
    pos = desc.find("CID")
    return desc[:pos + 4] + f"{cid:x}\n" + rest


# -- extent lines ------------------------------------------------------------------

_WS = " \t\n\r\v\f"


class _Scanner:
    """Just enough of sscanf for QEMU's extent-line pattern."""

    def __init__(self, text: str, pos: int) -> None:
        self.s = text
        self.i = pos

    def skip_ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i] in _WS:
            self.i += 1

    def word(self, width: int) -> str | None:
        self.skip_ws()
        j = self.i
        while j < len(self.s) and j - self.i < width and self.s[j] not in _WS:
            j += 1
        if j == self.i:
            return None
        out, self.i = self.s[self.i:j], j
        return out

    def integer(self) -> int | None:
        self.skip_ws()
        j = self.i
        if j < len(self.s) and self.s[j] in "+-":
            j += 1
        k = j
        while k < len(self.s) and self.s[k].isdigit():
            k += 1
        if k == j:
            return None
        out, self.i = int(self.s[self.i:k]), k
        return out

    def literal(self, ch: str) -> bool:
        if self.i < len(self.s) and self.s[self.i] == ch:
            self.i += 1
            return True
        return False

    def name(self, width: int) -> str | None:
        j = self.i
        while j < len(self.s) and j - self.i < width and self.s[j] not in '\n\r"':
            j += 1
        if j == self.i:
            return None
        out, self.i = self.s[self.i:j], j
        return out


def scan_extent_line(text: str, pos: int) -> tuple[int, list]:
    """(number of conversions, [access, sectors, type, filename, offset])."""
    sc = _Scanner(text, pos)
    values: list = []
    access = sc.word(10)
    if access is None:
        return 0, values
    values.append(access)
    sectors = sc.integer()
    if sectors is None:
        return 1, values
    values.append(sectors)
    kind = sc.word(10)
    if kind is None:
        return 2, values
    values.append(kind)
    sc.skip_ws()
    if not sc.literal('"'):
        return 3, values
    fname = sc.name(511)
    if fname is None:
        return 3, values
    values.append(fname)
    if not sc.literal('"'):
        return 4, values
    offset = sc.integer()
    if offset is None:
        return 4, values
    values.append(offset)
    return 5, values


EXTENT_TYPES = ("FLAT", "SPARSE", "VMFS", "VMFSSPARSE", "SESPARSE")


def extent_lines(desc: str) -> list[ExtentLine]:
    """The usable extent lines, in order, as QEMU's vmdk_parse_extents finds them."""
    out = []
    pos = 0
    n = len(desc)
    while pos < n:
        nl = desc.find("\n", pos)
        line_end = n if nl < 0 else nl + 1
        matches, v = scan_extent_line(desc, pos)
        if matches >= 4 and v[0] == "RW":
            kind = v[2]
            offset = v[4] if matches == 5 else -1
            if kind == "FLAT":
                if matches != 5 or offset < 0:
                    raise DescriptorError("Invalid extent line: "
                                          + desc[pos:line_end].rstrip("\n"))
            elif kind == "VMFS":
                if matches != 4:
                    raise DescriptorError("Invalid extent line: "
                                          + desc[pos:line_end].rstrip("\n"))
                offset = 0
            elif matches != 4:
                raise DescriptorError("Invalid extent line: " + desc[pos:line_end].rstrip("\n"))
            if v[1] > 0 and kind in EXTENT_TYPES:
                out.append(ExtentLine(v[0], v[1], kind, v[3], max(offset, 0)))
        pos = line_end
    return out


def render(*, cid: int, parent_cid: int, create_type: str, parent_hint_name: str | None,
           extents: list[str], hw_version: str, size: int, heads: int, adapter_type: str,
           tools_version: str) -> str:
    """The descriptor ``qemu-img create -f vmdk`` writes."""
    parent_line = f'parentFileNameHint="{parent_hint_name}"' if parent_hint_name else ""
    return TEMPLATE.format(cid=cid, parent_cid=parent_cid, create_type=create_type,
                           parent_line=parent_line, extents="".join(extents),
                           hw_version=hw_version, cylinders=size // (63 * heads * 512),
                           heads=heads, adapter_type=adapter_type,
                           tools_version=tools_version)
