"""Format probing by magic, as qemu-img 7.2 probes (a light table, no drivers).

QEMU reads the first 2048 bytes of a file (zero padded when the file is
shorter), asks every format driver for a score and takes the highest; raw
answers 1 for anything, so it wins only when nothing else claims the file.
Empty files are raw without probing. The scores and rules here restate the
probe functions of QEMU 7.2's block drivers:

=========  ===============================================================  =====
format     rule                                                             score
=========  ===============================================================  =====
qcow2      ``QFI\\xfb`` and big-endian version >= 2                          100
qcow       ``QFI\\xfb`` and version == 1                                     100
qed        little-endian magic ``QED\\0``                                   100
vdi        little-endian 0xbeda107f at offset 0x40                          100
vmdk       ``KDMV`` or ``COWD``, or a text descriptor whose first           100
           non-comment, non-blank line is ``version=1|2|3``
vpc        ``conectix`` at offset 0 (fixed VHDs have it only at the end     100
           and are therefore probed as raw)
vhdx       ``vhdxfile``                                                     100
parallels  ``WithoutFreeSpace`` / ``WithouFreSpacExt`` and version 2        100
bochs      ``Bochs Virtual HD Image`` / ``Redolog`` / ``Growing``, v1 or v2  100
luks       ``LUKS\\xba\\xbe`` and big-endian version 1                        100
cloop      the V2.0 shell-script preamble                                   2
dmg        the file *name* ends in ``.dmg``                                 2
raw        anything                                                         1
=========  ===============================================================  =====
"""

from __future__ import annotations

import struct

#: formats QEMU 7.2 knows that qimg recognises but cannot open yet
FOREIGN_FORMATS = ("luks",)

_CLOOP_MAGIC = (b"#!/bin/sh\n#V2.0 Format\n"
                b"modprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n")


def _cstr(field: bytes) -> bytes:
    """A NUL-terminated C string inside a fixed-size field."""
    end = field.find(b"\0")
    return field if end < 0 else field[:end]


def probe_qcow2(buf: bytes, filename: str) -> int:
    if len(buf) >= 72 and buf[:4] == b"QFI\xfb" and struct.unpack_from(">I", buf, 4)[0] >= 2:
        return 100
    return 0


def probe_qcow(buf: bytes, filename: str) -> int:
    if len(buf) >= 48 and buf[:4] == b"QFI\xfb" and struct.unpack_from(">I", buf, 4)[0] == 1:
        return 100
    return 0


def probe_qed(buf: bytes, filename: str) -> int:
    return 100 if len(buf) >= 64 and buf[:4] == b"QED\0" else 0


def probe_vdi(buf: bytes, filename: str) -> int:
    if len(buf) >= 512 and struct.unpack_from("<I", buf, 0x40)[0] == 0xBEDA107F:
        return 100
    return 0


def _vmdk_descriptor(buf: bytes) -> bool:
    """A text descriptor: comments and blank lines, then ``version=N``."""
    p, end = 0, len(buf)
    while p < end:
        ch = buf[p:p + 1]
        if ch == b"#":
            nl = buf.find(b"\n", p)
            p = end if nl < 0 else nl + 1
            continue
        if ch == b" ":
            while p < end and buf[p:p + 1] == b" ":
                p += 1
            if p < end and buf[p:p + 1] == b"\r":
                p += 1
            if p == end or buf[p:p + 1] != b"\n":
                return False
            p += 1
            continue
        line = buf[p:p + 11]
        return any(line.startswith(b"version=%d%s" % (v, eol))
                   for v in (1, 2, 3) for eol in (b"\n", b"\r\n"))
    return False


def probe_vmdk(buf: bytes, filename: str) -> int:
    if len(buf) < 4:
        return 0
    if buf[:4] in (b"KDMV", b"COWD"):
        return 100
    return 100 if _vmdk_descriptor(buf) else 0


def probe_vpc(buf: bytes, filename: str) -> int:
    return 100 if buf[:8] == b"conectix" else 0


def probe_vhdx(buf: bytes, filename: str) -> int:
    return 100 if buf[:8] == b"vhdxfile" else 0


def probe_parallels(buf: bytes, filename: str) -> int:
    if len(buf) < 64:
        return 0
    if buf[:16] in (b"WithoutFreeSpace", b"WithouFreSpacExt") and \
            struct.unpack_from("<I", buf, 16)[0] == 2:
        return 100
    return 0


def probe_bochs(buf: bytes, filename: str) -> int:
    if len(buf) < 512:
        return 0
    if (_cstr(buf[0:32]) == b"Bochs Virtual HD Image" and _cstr(buf[32:48]) == b"Redolog"
            and _cstr(buf[48:64]) == b"Growing"
            and struct.unpack_from("<I", buf, 64)[0] in (0x00020000, 0x00010000)):
        return 100
    return 0


def probe_luks(buf: bytes, filename: str) -> int:
    if len(buf) >= 40 and buf[:6] == b"LUKS\xba\xbe" and struct.unpack_from(">H", buf, 6)[0] == 1:
        return 100
    return 0


def probe_cloop(buf: bytes, filename: str) -> int:
    n = min(len(_CLOOP_MAGIC), len(buf))
    return 2 if buf[:n] == _CLOOP_MAGIC[:n] else 0


def probe_dmg(buf: bytes, filename: str) -> int:
    return 2 if len(filename) > 4 and filename.endswith(".dmg") else 0


def probe_raw(buf: bytes, filename: str) -> int:
    return 1


#: in QEMU's driver registration order (ties go to the first)
PROBES = (
    ("raw", probe_raw), ("bochs", probe_bochs), ("cloop", probe_cloop), ("dmg", probe_dmg),
    ("luks", probe_luks), ("parallels", probe_parallels), ("qcow", probe_qcow),
    ("qcow2", probe_qcow2), ("qed", probe_qed), ("vdi", probe_vdi), ("vhdx", probe_vhdx),
    ("vmdk", probe_vmdk), ("vpc", probe_vpc),
)

_BY_NAME = dict(PROBES)


def score(fmt: str, buf: bytes, filename: str) -> int:
    """The probe score of one format (0 for names not in the table)."""
    fn = _BY_NAME.get(fmt)
    return fn(buf, filename) if fn is not None else 0


def probe_format(buf: bytes, filename: str) -> str:
    """The highest-scoring format for ``buf`` (the zero-padded first 2 KiB)."""
    best, best_score = "raw", 0
    for name, fn in PROBES:
        s = fn(buf, filename)
        if s > best_score:
            best, best_score = name, s
    return best
