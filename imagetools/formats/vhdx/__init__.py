"""vhdx: Hyper-V VHDX images, read, write, create and check as QEMU 7.2 does.

Layout (``structs.py``, ../shared/spec/formats.md section 5): a file
identifier, two headers (the valid one with the higher sequence number is
current), two region tables locating the BAT and the metadata region, the
metadata items (block size, virtual size, sector sizes, ...), the metadata
log (``log.py``) and payload blocks in 1 MiB units. The BAT interleaves one
sector-bitmap entry after every ``chunk_ratio`` payload entries.

QEMU's rules kept here: header selection (equal sequence numbers only for
identical headers); region overlap and required-entry checks; differencing
images are refused; a log that needs replaying is refused on a read-only
open (with QEMU's hint) and replayed on a read-write open; blocks in the
NOT_PRESENT / UNDEFINED / ZERO / UNMAPPED states read as zeros; a new block
goes at the 1 MiB-aligned end of the file and its BAT entry is written
through the log; the first guest-visible write of a session renews the
data-write GUID in both headers; block status reports the whole disk as
data without offsets, as QEMU (which has no block status for vhdx) does.

Better than QEMU: a BAT entry pointing past the end of the file makes reads
of that block fail (and ``check`` report it) instead of refusing the whole
image, so ``info`` and ``check`` still work on a truncated file.
"""

from __future__ import annotations

import errno
import struct
import uuid
from typing import Any, Iterator

from imagetools.errors import CorruptImageError, ImageError, ImageIOError, UnsupportedError
from imagetools.formats._common import CheckResult, OptionSpec, read_table, table_bytes
from imagetools.formats._mapped import DATA, ZERO, MappedDriver, Run
from imagetools.formats._writes import ClusterMap
from imagetools.formats.base import Extent
from imagetools.formats.hostfile import HostFile
from imagetools.formats.vhdx import log as vlog
from imagetools.formats.vhdx.structs import (BAT_FILE_OFF_MASK, BAT_GUID, BAT_STATE_MASK,
                                             BLOCK_SIZE_MAX, BLOCK_SIZE_MIN, FILE_PARAM_GUID,
                                             FILE_SIGNATURE, HEADER1_OFFSET, HEADER2_OFFSET,
                                             HEADER_BLOCK_SIZE, HEADER_SIZE, LOG_MIN_SIZE,
                                             LOGICAL_SECTOR_GUID, MAX_SECTORS_PER_BLOCK,
                                             META_IS_REQUIRED, METADATA_ENTRY, METADATA_GUID,
                                             METADATA_HEADER, METADATA_TABLE_MAX_SIZE,
                                             PAGE83_GUID, PARAMS_HAS_PARENT, PARENT_LOCATOR_GUID,
                                             PAYLOAD_BLOCK_FULLY_PRESENT, PHYS_SECTOR_GUID,
                                             REGION_ENTRY, REGION_ENTRY_REQUIRED, REGION_HEADER,
                                             REGION_TABLE_OFFSET, VIRTUAL_SIZE_GUID, ZERO_GUID,
                                             ZERO_STATES, MiB, VhdxHeader, checksum_valid,
                                             with_checksum)

EINVAL_TEXT = "Invalid argument"
ENOTSUP_TEXT = "Operation not supported"
METADATA_ITEMS = {FILE_PARAM_GUID: "file_parameters", VIRTUAL_SIZE_GUID: "virtual_disk_size",
                  PAGE83_GUID: "page83", LOGICAL_SECTOR_GUID: "logical_sector_size",
                  PHYS_SECTOR_GUID: "physical_sector_size",
                  PARENT_LOCATOR_GUID: "parent_locator"}
REQUIRED_ITEMS = ("file_parameters", "virtual_disk_size", "page83", "logical_sector_size",
                  "physical_sector_size")


class _Invalid(ImageError):
    """Open failure QEMU reports only with an errno (``str()`` is the text)."""


class VhdxDriver(MappedDriver):
    format_name = "vhdx"
    unallocated_is_zero = True

    create_options = (
        OptionSpec("size", "size", "Virtual disk size; max of 64TB."),
        OptionSpec("log_size", "size", "Log size; min 1MB.", str(1 * MiB)),
        OptionSpec("block_size", "size", "Block Size; min 1MB, max 256MB. 0 means "
                   "auto-calculate based on image size.", "0"),
        OptionSpec("subformat", "str", "VHDX format type, can be either 'dynamic' or 'fixed'. "
                   "Default is 'dynamic'."),
        OptionSpec("block_state_zero", "bool (on/off)", "Force use of payload blocks of type "
                   "'ZERO'. Non-standard, but default.  Do not set to 'off' when using "
                   "'qemu-img convert' with subformat=dynamic."),
    )

    def __init__(self, file: HostFile, *, read_only: bool) -> None:
        super().__init__(file, read_only=read_only)
        self.regions: list[tuple[int, int]] = []
        self.log_replayed_on_open = False
        self._session_guid = uuid.uuid4().bytes_le
        self._first_visible_write = True
        self._log_sequence = 0
        if file.pread_full(0, 8) != FILE_SIGNATURE:
            raise _Invalid(EINVAL_TEXT)
        self._parse_headers()
        self._parse_log()
        self._parse_region_table()
        self._parse_metadata()
        self._size = self.virtual_disk_size
        self.data_blocks = -(-self.virtual_disk_size // self.block_size)
        self.bat_entries = self.data_blocks + ((self.data_blocks - 1) >> self.chunk_ratio_bits) \
            if self.data_blocks else 0
        self.bat_offset, bat_length = self.bat_region
        if self.bat_entries > bat_length // 8:
            raise _Invalid(EINVAL_TEXT)
        try:
            self.bat = read_table(file, self.bat_offset, self.bat_entries, 8, "VHDX BAT")
        except CorruptImageError as err:
            raise _Invalid(str(err)) from None
        self.bad_blocks: dict[int, str] = {}
        for message, index in self._bat_problems():
            self.bad_blocks.setdefault(index, message)
        self._map = _VhdxMap(self)

    # -- headers ----------------------------------------------------------------------

    def _parse_headers(self) -> None:
        headers = []
        for offset in (HEADER1_OFFSET, HEADER2_OFFSET):
            raw = self.file.pread_full(offset, HEADER_SIZE)
            hdr = VhdxHeader(raw)
            valid = checksum_valid(raw) and hdr.signature == b"head" and hdr.version == 1
            headers.append((hdr, valid))
        (h1, v1), (h2, v2) = headers
        if v1 and not v2:
            current = 0
        elif v2 and not v1:
            current = 1
        elif not v1 and not v2:
            raise _Invalid("No valid VHDX header found")
        elif h1.sequence_number > h2.sequence_number:
            current = 0
        elif h2.sequence_number > h1.sequence_number:
            current = 1
        elif h1.key() == h2.key():
            current = 0
        else:
            raise _Invalid("No valid VHDX header found")
        self.headers = [h1, h2]
        self.current = current
        hdr = self.header
        self.regions.append((hdr.log_offset, hdr.log_offset + hdr.log_length))

    @property
    def header(self) -> VhdxHeader:
        return self.headers[self.current]

    def _update_header(self, *, new_data_guid: bool, log_guid: bytes | None) -> None:
        """Write the non-current header as the new current one (QEMU's procedure)."""
        other = 1 - self.current
        active, inactive = self.headers[self.current], self.headers[other]
        for name in VhdxHeader.FIELDS:
            setattr(inactive, name, getattr(active, name))
        inactive.sequence_number = active.sequence_number + 1
        inactive.file_write_guid = self._session_guid
        if new_data_guid:
            inactive.data_write_guid = uuid.uuid4().bytes_le
        if log_guid is not None:
            inactive.log_guid = log_guid
        offset = HEADER1_OFFSET if other == 0 else HEADER2_OFFSET
        existing = bytearray(self.file.pread_full(offset, HEADER_SIZE))
        packed = inactive.pack()
        existing[:80] = packed[:80]
        existing[4:8] = bytes(4)
        data = with_checksum(bytes(existing))
        self.file.pwrite(offset, data)
        self.file.flush()
        self.current = other

    def update_headers(self, *, new_data_guid: bool = False, log_guid: bytes | None = None):
        """Both headers, one after the other, so that both end up valid and current."""
        self._update_header(new_data_guid=new_data_guid, log_guid=log_guid)
        self._update_header(new_data_guid=new_data_guid, log_guid=log_guid)

    def user_visible_write(self) -> None:
        if self._first_visible_write:
            self._first_visible_write = False
            self.update_headers(new_data_guid=True)

    # -- log ------------------------------------------------------------------------------

    def _parse_log(self) -> None:
        hdr = self.header
        if hdr.log_offset < LOG_MIN_SIZE or hdr.log_offset % LOG_MIN_SIZE:
            raise _Invalid(EINVAL_TEXT)
        if hdr.log_version != 0:
            raise _Invalid(EINVAL_TEXT)
        self.log = vlog.Log(self.file, hdr.log_offset, hdr.log_length, hdr.log_guid)
        if hdr.log_guid == ZERO_GUID or hdr.log_length == 0:
            return
        if hdr.log_length % LOG_MIN_SIZE:
            raise _Invalid(EINVAL_TEXT)
        if hdr.log_offset + hdr.log_length > self.file.length():
            raise _Invalid("The VHDX log lies beyond the end of the file")
        entries = self.log.search()
        if not entries:
            return
        if self.read_only:
            name = self.filename
            raise _Invalid(f"VHDX image file '{name}' opened read-only, but contains a log that "
                           f"needs to be replayed\nTo replay the log, run:\n"
                           f"qemu-img check -r all '{name}'")
        self.user_visible_write()
        self.log.replay(entries)
        self._log_sequence = entries[-1].sequence + 1
        self.update_headers(log_guid=ZERO_GUID)
        self.log_replayed_on_open = True

    # -- region table and metadata ----------------------------------------------------------

    def _register(self, start: int, length: int) -> None:
        end = start + length
        for rstart, rend in self.regions:
            if not (start >= rend or end <= rstart):
                raise _Invalid(f"VHDX region {start}-{end} overlaps with region "
                               f"{rstart}-{rend}")
        self.regions.append((start, end))

    def _parse_region_table(self) -> None:
        raw = self.file.pread_full(REGION_TABLE_OFFSET, HEADER_BLOCK_SIZE)
        if not checksum_valid(raw):
            raise _Invalid(EINVAL_TEXT)
        signature, _crc, count, _res = REGION_HEADER.unpack_from(raw)
        if signature != b"regi" or count > 2047:
            raise _Invalid(EINVAL_TEXT)
        bat = metadata = None
        for i in range(count):
            rguid, offset, length, bits = REGION_ENTRY.unpack_from(raw, 16 + 32 * i)
            self._register(offset, length)
            if rguid == BAT_GUID:
                if bat is not None:
                    raise _Invalid(EINVAL_TEXT)
                bat = (offset, length)
            elif rguid == METADATA_GUID:
                if metadata is not None:
                    raise _Invalid(EINVAL_TEXT)
                metadata = (offset, length)
            elif bits & REGION_ENTRY_REQUIRED:
                raise _Invalid(ENOTSUP_TEXT)
        if bat is None or metadata is None:
            raise _Invalid(EINVAL_TEXT)
        self.bat_region = bat
        self.metadata_region = metadata

    def _parse_metadata(self) -> None:
        base = self.metadata_region[0]
        raw = self.file.pread_full(base, METADATA_TABLE_MAX_SIZE)
        signature, _res, count, _res2 = METADATA_HEADER.unpack_from(raw)
        if signature != b"metadata":
            raise _Invalid(EINVAL_TEXT)
        if count * METADATA_ENTRY.size > METADATA_TABLE_MAX_SIZE - METADATA_HEADER.size:
            raise _Invalid(EINVAL_TEXT)
        items: dict[str, tuple[int, int]] = {}
        for i in range(count):
            item, offset, length, bits, _ = METADATA_ENTRY.unpack_from(raw, 32 + 32 * i)
            name = METADATA_ITEMS.get(item)
            if name is not None:
                if name in items:
                    raise _Invalid(EINVAL_TEXT)
                items[name] = (offset, length)
            elif bits & META_IS_REQUIRED:
                raise _Invalid(ENOTSUP_TEXT)
        if any(name not in items for name in REQUIRED_ITEMS):
            raise _Invalid(ENOTSUP_TEXT)

        def value(name: str, fmt: str):
            return struct.unpack(fmt, self.file.pread_full(base + items[name][0],
                                                           struct.calcsize(fmt)))

        self.block_size, data_bits = value("file_parameters", "<II")
        if data_bits & PARAMS_HAS_PARENT:
            if "parent_locator" in items:
                raise UnsupportedError("Differencing VHDX images (with a parent) are not "
                                       "supported, as in QEMU")
            raise _Invalid(EINVAL_TEXT)
        self.fixed = bool(data_bits & 1)
        (self.virtual_disk_size,) = value("virtual_disk_size", "<Q")
        (self.logical_sector_size,) = value("logical_sector_size", "<I")
        (self.physical_sector_size,) = value("physical_sector_size", "<I")
        bs = self.block_size
        if bs < BLOCK_SIZE_MIN or bs > BLOCK_SIZE_MAX or bs & (bs - 1):
            raise _Invalid(EINVAL_TEXT)
        if self.logical_sector_size not in (512, 4096):
            raise _Invalid(EINVAL_TEXT)
        self.chunk_ratio = MAX_SECTORS_PER_BLOCK * self.logical_sector_size // bs
        self.chunk_ratio_bits = self.chunk_ratio.bit_length() - 1
        if self.virtual_disk_size > (64 << 40):
            raise _Invalid(EINVAL_TEXT)

    def _bat_index(self, block: int) -> int:
        return block + (block >> self.chunk_ratio_bits)

    def _bat_problems(self) -> Iterator[tuple[str, int]]:
        """QEMU's BAT checks: present blocks inside the file, outside other regions."""
        file_size = self.file.length()
        payblocks = self.chunk_ratio
        for i, entry in enumerate(self.bat):
            if entry & BAT_STATE_MASK != PAYLOAD_BLOCK_FULLY_PRESENT:
                continue
            offset = entry & BAT_FILE_OFF_MASK
            length = min(self.block_size, self._size - i * self.block_size)
            if offset >= file_size:
                yield (f"VHDX BAT entry {i} start offset {offset} points after end of file "
                       f"({file_size}). Image has probably been truncated.", i)
            elif offset + length > file_size:
                yield (f"VHDX BAT entry {i} end offset {offset + length - 1} points after end "
                       f"of file ({file_size}). Image has probably been truncated.", i)
            if payblocks:
                payblocks -= 1
                end = offset + self.block_size
                for rstart, rend in self.regions:
                    if not (offset >= rend or end <= rstart):
                        yield (f"VHDX region {offset}-{end} overlaps with region "
                               f"{rstart}-{rend}", i)
                        break
            else:
                payblocks = self.chunk_ratio

    # -- class level ------------------------------------------------------------------------

    @classmethod
    def open_reason(cls, filename: str, err: ImageError) -> str:
        """QEMU fails most vhdx opens with a bare errno: qemu-img then says
        ``Could not open 'F': Could not open 'F': Invalid argument``."""
        text = str(err)
        if isinstance(err, _Invalid) and text in (EINVAL_TEXT, ENOTSUP_TEXT):
            return f"Could not open '{filename}': {text}"
        return text

    @classmethod
    def create(cls, filename: str, size: int, options: dict[str, Any]) -> None:
        from imagetools.formats.vhdx.create import create
        create(filename, size, options)

    # -- metadata -------------------------------------------------------------------------------

    @property
    def cluster_size(self) -> int:
        return self.block_size

    def has_zero_init(self) -> bool:
        if self.bat_entries and \
                self.bat[0] & BAT_STATE_MASK == PAYLOAD_BLOCK_FULLY_PRESENT:
            return not self.file.is_block
        return True

    # -- mapping -----------------------------------------------------------------------------------

    def _runs(self, offset: int, length: int) -> Iterator[Run]:
        bs = self.block_size
        end = offset + length
        pos = offset
        while pos < end:
            block = pos // bs
            inner = pos - block * bs
            n = min(bs - inner, end - pos)
            index = self._bat_index(block)
            entry = self.bat[index]
            state = entry & BAT_STATE_MASK
            if state in ZERO_STATES:
                yield Run(pos, n, ZERO)
            elif state == PAYLOAD_BLOCK_FULLY_PRESENT:
                if index in self.bad_blocks:
                    raise ImageIOError(self.bad_blocks[index], errno.EIO)
                yield Run(pos, n, DATA, (entry & BAT_FILE_OFF_MASK) + inner, self.file)
            else:
                raise ImageIOError(f"VHDX block {block} is in state {state}, which is not "
                                   "supported (differencing images are not)", errno.EIO)
            pos += n

    def block_status(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        """Everything is data without offset: QEMU has no block status for vhdx."""
        if length is None:
            length = self._size - offset
        self._check_range(offset, length)
        if length:
            yield Extent(offset, length, True, False, True, None, 0, self.filename)

    # -- writes ------------------------------------------------------------------------------

    def _before_write(self) -> None:
        self.user_visible_write()

    def write_bat_sectors(self, indexes: set[int]) -> None:
        """Write the BAT sectors holding ``indexes`` through the log, as QEMU does."""
        per_sector = 4096 // 8
        sectors = sorted({i // per_sector for i in indexes})
        capacity = max(1, vlog.log_capacity(self.log.length))
        for start in range(0, len(sectors), capacity):
            chunk = sectors[start:start + capacity]
            updates = []
            for s in chunk:
                lo = s * per_sector
                hi = min(len(self.bat), lo + per_sector)
                data = table_bytes(self.bat, lo, hi)
                if len(data) < 4096:
                    # the tail of the last BAT sector keeps what the file holds
                    old = self.file.pread_full(self.bat_offset + lo * 8, 4096)
                    data = data + old[len(data):]
                updates.append((self.bat_offset + lo * 8, data))
            self._log_write_and_flush(updates)

    def _log_write_and_flush(self, updates: list[tuple[int, bytes]]) -> None:
        file = self.file
        file.flush()                                    # the new data is stable first
        guid = uuid.uuid4().bytes_le
        self.update_headers(log_guid=guid)
        if self._log_sequence == 0:
            self._log_sequence = 1
        entry = vlog.build_entry(guid, self._log_sequence, updates, file.length())
        file.pwrite(self.log.offset, entry)
        file.flush()
        for offset, data in updates:                   # replay what was logged
            file.pwrite(offset, data)
        file.flush()
        self._log_sequence += 1
        self.update_headers(log_guid=ZERO_GUID)

    # -- check ---------------------------------------------------------------------------------

    def check(self) -> CheckResult:
        """QEMU: BAT entries past the end of the file or over metadata; a replayed log."""
        from imagetools.output import prog
        result = CheckResult()
        if self.log_replayed_on_open:
            result.corruptions_fixed += 1
        for message, _index in self._bat_problems():
            result.error(f"{prog()}: {message}")
        return result


class _VhdxMap(ClusterMap):
    """Payload block allocation at the 1 MiB-aligned end of the file."""

    def __init__(self, drv: VhdxDriver) -> None:
        self.drv = drv
        self.file = drv.file
        self.unit = drv.block_size
        self.dirty: set[int] = set()
        self._next = 0

    def lookup(self, index: int) -> int | None:
        drv = self.drv
        bat_index = drv._bat_index(index)
        entry = drv.bat[bat_index]
        state = entry & BAT_STATE_MASK
        if state in ZERO_STATES:
            return None
        if state != PAYLOAD_BLOCK_FULLY_PRESENT:
            raise ImageIOError(f"VHDX block {index} is in state {state}, which is not "
                               "supported", errno.EIO)
        if bat_index in drv.bad_blocks:
            raise ImageIOError(drv.bad_blocks[bat_index], errno.EIO)
        offset = entry & BAT_FILE_OFF_MASK
        if offset < MiB:
            raise ImageIOError(f"VHDX block {index} lies in the header section", errno.EFAULT)
        return offset

    def cow_zero(self, index: int) -> bool:
        return True

    def allocate(self, index: int, count: int) -> int:
        start = max(self.file.length(), self._next)
        host = -(-start // MiB) * MiB
        self._next = host + count * self.unit
        return host

    def map_units(self, index: int, count: int, host: int) -> None:
        drv = self.drv
        for i in range(count):
            bat_index = drv._bat_index(index + i)
            drv.bat[bat_index] = (host + i * self.unit) | PAYLOAD_BLOCK_FULLY_PRESENT
            self.dirty.add(bat_index)

    def commit(self) -> None:
        if self.dirty:
            dirty, self.dirty = self.dirty, set()
            self.drv.write_bat_sectors(dirty)
        self._next = 0


DRIVER = VhdxDriver
