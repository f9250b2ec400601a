"""The qcow2 internal snapshot table: reading, encoding, looking entries up.

Each entry: L1 table offset and size, id and name strings, date, VM clock,
VM state size and "extra data" (64-bit VM state size, virtual disk size,
icount). Entries are variable length and 8-byte aligned. Everything is
bounds-checked: QEMU's limits (65536 snapshots, 1 KiB of extra data per
entry, 64 MiB for the whole table, L1 tables of at most 32 MiB) apply.

Written tables are QEMU 7.2's: every entry carries at least the 24 bytes of
extra data (unknown extra data read from an entry is kept after them), the
32-bit VM state size is 0 when the size does not fit, and new IDs are one
more than the largest numeric ID. Creating, applying and deleting snapshots
is :mod:`.snapshot_ops`.
"""

from __future__ import annotations

import struct

from imagetools.errors import CorruptImageError
from imagetools.formats.base import SnapshotInfo
from imagetools.formats.hostfile import HostFile
from imagetools.formats.qcow2.header import QCOW_MAX_L1_SIZE, Header

QCOW_MAX_SNAPSHOT_EXTRA_DATA = 1024
QCOW_MAX_SNAPSHOTS_SIZE = 1024 * 0x10000
_ENTRY = struct.Struct(">QIHHIIQII")
_EXTRA = struct.Struct(">QQq")


def read_snapshots(file: HostFile, header: Header) -> list[SnapshotInfo]:
    """Parse the snapshot table described by ``header``."""
    if header.nb_snapshots == 0:
        return []
    cluster_size = header.cluster_size
    offset = header.snapshots_offset
    file_len = file.length()
    snaps: list[SnapshotInfo] = []
    total = 0
    for i in range(header.nb_snapshots):
        # Past the end of the file the table reads as zeros, as in QEMU
        # (``check`` reports such entries as incomplete).
        offset = (offset + 7) & ~7
        start = offset
        (l1_offset, l1_size, id_len, name_len, date_sec, date_nsec, vm_clock_nsec,
         vm_state_size, extra_len) = _ENTRY.unpack(file.pread_full(offset, _ENTRY.size))
        offset += _ENTRY.size
        if extra_len > QCOW_MAX_SNAPSHOT_EXTRA_DATA:
            raise CorruptImageError(f"Too much extra metadata in snapshot table entry {i}")
        extra = file.pread_full(offset, extra_len)
        offset += extra_len
        names = file.pread_full(offset, id_len + name_len)
        offset += id_len + name_len
        total = offset - header.snapshots_offset
        if total > QCOW_MAX_SNAPSHOTS_SIZE:
            raise CorruptImageError("Snapshot table too large")
        if l1_size > QCOW_MAX_L1_SIZE // 8:
            raise CorruptImageError("Snapshot L1 table too large")
        if l1_offset % cluster_size:
            raise CorruptImageError("Snapshot L1 table offset invalid")
        incomplete = offset > file_len or start + _ENTRY.size > file_len
        disk_size = icount = None
        if len(extra) >= 8:
            vm_state_size = struct.unpack_from(">Q", extra, 0)[0]
        if len(extra) >= 16:
            disk_size = struct.unpack_from(">Q", extra, 8)[0]
        if len(extra) >= 24:
            raw_icount = struct.unpack_from(">q", extra, 16)[0]
            icount = None if raw_icount < 0 else raw_icount
        snaps.append(SnapshotInfo(
            id=names[:id_len].decode("utf-8", "replace"),
            name=names[id_len:].decode("utf-8", "replace"),
            vm_state_size=vm_state_size, date_sec=date_sec, date_nsec=date_nsec,
            vm_clock_nsec=vm_clock_nsec, icount=icount,
            disk_size=disk_size if disk_size is not None else header.size,
            l1_table_offset=l1_offset, l1_size=l1_size, extra=extra))
        snaps[-1].incomplete = incomplete
    return snaps


def snapshot_table_size(file: HostFile, header: Header) -> int:
    """Bytes the snapshot table occupies (for refcount checks)."""
    offset = header.snapshots_offset
    for _ in range(min(header.nb_snapshots, 65536)):
        offset = (offset + 7) & ~7
        (_, _, id_len, name_len, _, _, _, _, extra_len) = _ENTRY.unpack(
            file.pread_full(offset, _ENTRY.size))
        offset += _ENTRY.size + min(extra_len, QCOW_MAX_SNAPSHOT_EXTRA_DATA) + id_len + name_len
    return offset - header.snapshots_offset


def find_snapshot(snaps: list[SnapshotInfo], name_or_id: str) -> SnapshotInfo | None:
    """As qemu-img convert -l / -s: an ID match first, then a name match."""
    for snap in snaps:
        if snap.id == name_or_id:
            return snap
    for snap in snaps:
        if snap.name == name_or_id:
            return snap
    return None


def find_by_id_and_name(snaps: list[SnapshotInfo], snapshot_id: str | None,
                        name: str | None) -> int:
    """Index of the first entry matching the keys given (QEMU's rule), or -1."""
    if snapshot_id is None and name is None:
        return -1
    for i, snap in enumerate(snaps):
        if (snapshot_id is None or snap.id == snapshot_id) and \
                (name is None or snap.name == name):
            return i
    return -1


def new_snapshot_id(snaps: list[SnapshotInfo]) -> str:
    """One more than the largest ID read as a number (strtoul), as QEMU does."""
    highest = 0
    for snap in snaps:
        highest = max(highest, _strtoul(snap.id))
    return str(highest + 1)


def _strtoul(text: str) -> int:
    """C strtoul(text, NULL, 10): leading blanks, sign, digits; 0 if none."""
    s = text.lstrip(" \t\n\v\f\r")
    neg = s[:1] == "-"
    if s[:1] in "+-" and s:
        s = s[1:]
    digits = ""
    for ch in s:
        if not "0" <= ch <= "9":
            break
        digits += ch
    if not digits:
        return 0
    value = min(int(digits), (1 << 64) - 1)
    return ((1 << 64) - value) % (1 << 64) if neg else value


def entry_extra(snap: SnapshotInfo) -> bytes:
    """The extra data QEMU 7.2 writes for an entry (24 bytes + unknown rest)."""
    icount = -1 if snap.icount is None else snap.icount
    disk_size = snap.disk_size or 0
    known = _EXTRA.pack(snap.vm_state_size, disk_size, icount)
    return known + bytes(snap.extra[_EXTRA.size:]) if len(snap.extra) > _EXTRA.size else known


def encode_table(snaps: list[SnapshotInfo]) -> bytes:
    """The snapshot table for ``snaps`` (L1 offsets and sizes as set in them)."""
    out = bytearray()
    for snap in snaps:
        out += bytes(-len(out) % 8)
        ident = snap.id.encode("utf-8", "surrogateescape")
        name = snap.name.encode("utf-8", "surrogateescape")
        extra = entry_extra(snap)
        vm_state = snap.vm_state_size if snap.vm_state_size <= 0xFFFFFFFF else 0
        out += _ENTRY.pack(snap.l1_table_offset, snap.l1_size, len(ident), len(name),
                           snap.date_sec, snap.date_nsec, snap.vm_clock_nsec, vm_state,
                           len(extra))
        out += extra + ident + name
    if len(out) > QCOW_MAX_SNAPSHOTS_SIZE:
        from imagetools.errors import ImageIOError
        import errno
        raise ImageIOError("File too large", errno.EFBIG)
    return bytes(out)
