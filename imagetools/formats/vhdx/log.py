"""The VHDX metadata log: finding the active sequence, replaying it, writing entries.

The log is a circular buffer of 4 KiB sectors at ``log_offset``. An entry
is a header sector (``loge``, CRC-32C over the whole entry), descriptor
sectors (``desc``: one 4 KiB sector to write, whose first 8 and last 4 bytes
are kept in the descriptor; ``zero``: a range to zero) and one data sector
(``data``, the sequence number split around 4084 payload bytes) per data
descriptor. Replay finds the valid sequence of consecutive entries with the
highest sequence number (entries must carry the header's log GUID), applies
its descriptors in order, grows the file to ``last_file_offset`` and marks
the log empty by writing a zero log GUID into both headers -- QEMU's rules,
which also refuse an entry whose ``flushed_file_offset`` lies past the end
of the file.

Metadata updates made here (BAT sectors) go through the log exactly as QEMU
makes them: data flushed, entry written and flushed, entry replayed and
flushed, log GUID cleared.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from imagetools.errors import CorruptImageError
from imagetools.formats.vhdx.structs import (LOG_DESC, LOG_HEADER, LOG_SECTOR_SIZE, MiB,
                                             ZERO_GUID, crc32c, with_checksum)

DESC_PER_SECTOR = 128


def desc_sectors(count: int) -> int:
    """Sectors holding the entry header and ``count`` descriptors (never 0)."""
    return -(-(count + 2) // DESC_PER_SECTOR)


@dataclass
class LogEntry:
    offset: int            # in the log
    length: int
    sequence: int
    descriptors: list      # (kind, file_offset, leading, trailing, zero_length)
    data: list             # the 4084-byte payloads of the data descriptors, in order
    flushed_file_offset: int
    last_file_offset: int


class Log:
    """The log of one open image (``read`` sector access through ``file``)."""

    def __init__(self, file, offset: int, length: int, log_guid: bytes) -> None:
        self.file = file
        self.offset = offset
        self.length = length
        self.guid = log_guid

    def _sector(self, index: int) -> bytes:
        return self.file.pread_full(self.offset + index, LOG_SECTOR_SIZE)

    def _entry_at(self, pos: int, prev_seq: int) -> LogEntry | None:
        """The valid entry starting at log offset ``pos`` (None if there is none)."""
        first = self._sector(pos)
        (sig, checksum, entry_length, _tail, seq, count, _res, guid, flushed,
         last) = LOG_HEADER.unpack_from(first)
        if (sig != b"loge" or entry_length > self.length or entry_length % LOG_SECTOR_SIZE
                or not entry_length or seq == 0 or guid != self.guid
                or count * LOG_DESC.size > entry_length):
            return None
        if prev_seq and seq != prev_seq + 1:
            return None
        nsect = desc_sectors(count)
        total = entry_length // LOG_SECTOR_SIZE
        if nsect > total:
            return None
        raw = bytearray()
        idx = pos
        for _ in range(total):
            raw += self._sector(idx)
            idx = (idx + LOG_SECTOR_SIZE) % self.length
        stored = struct.unpack_from("<I", raw, 4)[0]
        raw[4:8] = bytes(4)
        if crc32c(bytes(raw)) != stored:
            return None
        descriptors = []
        data = []
        data_index = nsect
        for i in range(count):
            # descriptors follow the header back to back: 126 fill the first
            # sector, 128 every further one
            dsig, trailing, lead_or_len, file_offset, dseq = LOG_DESC.unpack_from(
                raw, LOG_HEADER.size + LOG_DESC.size * i)
            if dseq != seq or file_offset % LOG_SECTOR_SIZE:
                return None
            if dsig == b"zero":
                if lead_or_len % LOG_SECTOR_SIZE:
                    return None
                descriptors.append(("zero", file_offset, 0, 0, lead_or_len))
            elif dsig == b"desc":
                if data_index >= total:
                    return None
                sector = raw[data_index * LOG_SECTOR_SIZE:(data_index + 1) * LOG_SECTOR_SIZE]
                data_index += 1
                dsig2, high = struct.unpack_from("<4sI", sector)
                low = struct.unpack_from("<I", sector, LOG_SECTOR_SIZE - 4)[0]
                if dsig2 != b"data" or (high << 32 | low) != seq:
                    return None
                descriptors.append(("desc", file_offset, lead_or_len, trailing, 0))
                data.append(bytes(sector[8:8 + 4084]))
            else:
                return None
        return LogEntry(pos, entry_length, seq, descriptors, data, flushed, last)

    def search(self) -> list[LogEntry]:
        """The active sequence (highest sequence number), or [] when none is valid."""
        best: list[LogEntry] = []
        for pos in range(0, self.length, LOG_SECTOR_SIZE):
            entry = self._entry_at(pos, 0)
            if entry is None:
                continue
            chain = [entry]
            nxt = (pos + entry.length) % self.length
            while len(chain) < self.length // LOG_SECTOR_SIZE:
                follow = self._entry_at(nxt, chain[-1].sequence)
                if follow is None or follow.offset == pos:
                    break
                chain.append(follow)
                nxt = (nxt + follow.length) % self.length
            if not best or chain[-1].sequence > best[-1].sequence:
                best = chain
        return best

    def replay(self, entries: list[LogEntry]) -> None:
        """Apply a sequence to the file (the caller then clears the log GUID)."""
        file = self.file
        for entry in entries:
            if entry.flushed_file_offset > file.length():
                raise CorruptImageError("VHDX log entry refers past the end of the file: the "
                                        "image has been truncated")
            data = iter(entry.data)
            for kind, file_offset, leading, trailing, zero_length in entry.descriptors:
                if kind == "desc":
                    payload = next(data)
                    sector = struct.pack("<Q", leading) + payload + struct.pack("<I", trailing)
                    file.pwrite(file_offset, sector)
                else:
                    file.write_zero_data(file_offset, zero_length)
            if file.length() < entry.last_file_offset:
                file.truncate(-(-entry.last_file_offset // MiB) * MiB)
        file.flush()


def build_entry(guid: bytes, sequence: int, sectors: list[tuple[int, bytes]],
                file_length: int, tail: int = 0) -> bytes:
    """One log entry writing whole 4 KiB ``sectors`` [(file offset, bytes)]."""
    count = len(sectors)
    nsect = desc_sectors(count)
    head = bytearray(nsect * LOG_SECTOR_SIZE)
    body = bytearray()
    for i, (file_offset, sector) in enumerate(sectors):
        leading = struct.unpack_from("<Q", sector)[0]
        trailing = struct.unpack_from("<I", sector, LOG_SECTOR_SIZE - 4)[0]
        LOG_DESC.pack_into(head, LOG_HEADER.size + 32 * i, b"desc", trailing, leading,
                           file_offset, sequence)
        body += struct.pack("<4sI", b"data", sequence >> 32) + sector[8:8 + 4084] + \
            struct.pack("<I", sequence & 0xFFFFFFFF)
    length = len(head) + len(body)
    LOG_HEADER.pack_into(head, 0, b"loge", 0, length, tail, sequence, count, 0, guid,
                         file_length, file_length)
    return with_checksum(bytes(head + body))


def log_capacity(length: int) -> int:
    """Most 4 KiB data sectors one entry can carry in a log of ``length`` bytes."""
    usable = length // LOG_SECTOR_SIZE - 1          # QEMU keeps one sector open
    count = usable - 1
    while count > 0 and desc_sectors(count) + count > usable:
        count -= 1
    return max(count, 0)


__all__ = ["Log", "LogEntry", "build_entry", "log_capacity", "desc_sectors", "ZERO_GUID"]
