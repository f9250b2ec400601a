"""VHDX on-disk structures (little-endian, GUIDs in Microsoft order) and CRC-32C.

Names follow the VHDX specification and QEMU's block/vhdx.h. Every
checksummed structure carries a CRC-32C computed with its checksum field
taken as zero (``crc32c_with_zeroed``).
"""

from __future__ import annotations

import struct
import uuid

KiB = 1 << 10
MiB = 1 << 20

FILE_SIGNATURE = b"vhdxfile"
HEADER1_OFFSET = 64 * KiB
HEADER2_OFFSET = 128 * KiB
REGION_TABLE_OFFSET = 192 * KiB
REGION_TABLE2_OFFSET = 256 * KiB
HEADER_SECTION_END = 1 * MiB
HEADER_SIZE = 4 * KiB                 # the checksummed part of a header
HEADER_BLOCK_SIZE = 64 * KiB          # region and metadata tables
METADATA_TABLE_MAX_SIZE = 64 * KiB
LOG_SECTOR_SIZE = 4 * KiB
LOG_MIN_SIZE = 1 * MiB
BLOCK_SIZE_MIN = 1 * MiB
BLOCK_SIZE_MAX = 256 * MiB
MAX_IMAGE_SIZE = 64 << 40
MAX_SECTORS_PER_BLOCK = 1 << 23

# head: signature checksum sequence_number file_write_guid data_write_guid log_guid
#       log_version version log_length log_offset
HEADER = struct.Struct("<4sIQ16s16s16sHHIQ")
REGION_HEADER = struct.Struct("<4sIII")          # signature checksum entry_count reserved
REGION_ENTRY = struct.Struct("<16sQII")          # guid file_offset length data_bits
METADATA_HEADER = struct.Struct("<8sHH20s")      # signature reserved entry_count reserved2
METADATA_ENTRY = struct.Struct("<16sIIII")       # item_id offset length data_bits reserved2
# loge: signature checksum entry_length tail sequence_number descriptor_count
#       reserved log_guid flushed_file_offset last_file_offset
LOG_HEADER = struct.Struct("<4sIIIQII16sQQ")
LOG_DESC = struct.Struct("<4sIQQQ")              # signature trailing/0 leading/zero_length
#                                                  file_offset sequence_number

REGION_ENTRY_REQUIRED = 1
META_IS_USER = 1
META_IS_VIRTUAL_DISK = 2
META_IS_REQUIRED = 4
PARAMS_LEAVE_BLOCKS_ALLOCATED = 1
PARAMS_HAS_PARENT = 2

# payload block states (BAT entry bits 0-2)
PAYLOAD_BLOCK_NOT_PRESENT = 0
PAYLOAD_BLOCK_UNDEFINED = 1
PAYLOAD_BLOCK_ZERO = 2
PAYLOAD_BLOCK_UNMAPPED = 3
PAYLOAD_BLOCK_UNMAPPED_V095 = 5
PAYLOAD_BLOCK_FULLY_PRESENT = 6
PAYLOAD_BLOCK_PARTIALLY_PRESENT = 7
ZERO_STATES = (PAYLOAD_BLOCK_NOT_PRESENT, PAYLOAD_BLOCK_UNDEFINED, PAYLOAD_BLOCK_ZERO,
               PAYLOAD_BLOCK_UNMAPPED, PAYLOAD_BLOCK_UNMAPPED_V095)
BAT_STATE_MASK = 0x7
BAT_FILE_OFF_MASK = 0xFFFFFFFFFFF00000


def guid(text: str) -> bytes:
    """A GUID in Microsoft (mixed-endian) byte order."""
    return uuid.UUID(text).bytes_le


BAT_GUID = guid("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_GUID = guid("8B7CA206-4790-4B9A-B8FE-575F050F886E")
FILE_PARAM_GUID = guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_SIZE_GUID = guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
PAGE83_GUID = guid("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_GUID = guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYS_SECTOR_GUID = guid("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR_GUID = guid("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
ZERO_GUID = bytes(16)


def _table() -> list[int]:
    table = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _table()


def _crc32c_py(data: bytes, crc: int = 0) -> int:
    crc ^= 0xFFFFFFFF
    table = _TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


try:                                    # the C implementation, when installed
    from crc32c import crc32c as _crc32c_c
except ImportError:                     # pragma: no cover - depends on the machine
    _crc32c_c = None


def crc32c(data: bytes, crc: int = 0) -> int:
    """CRC-32C (Castagnoli), continuing from ``crc`` (0 to start)."""
    if _crc32c_c is not None:
        return _crc32c_c(data, crc)
    return _crc32c_py(data, crc)


def crc32c_with_zeroed(buf: bytes, field: int) -> int:
    """The CRC of ``buf`` with the 4-byte checksum field at ``field`` as zeros."""
    data = bytearray(buf)
    data[field:field + 4] = bytes(4)
    return crc32c(bytes(data))


def checksum_valid(buf: bytes, field: int = 4) -> bool:
    stored = struct.unpack_from("<I", buf, field)[0]
    return crc32c_with_zeroed(buf, field) == stored


def with_checksum(buf: bytes, field: int = 4) -> bytes:
    data = bytearray(buf)
    data[field:field + 4] = bytes(4)
    data[field:field + 4] = struct.pack("<I", crc32c(bytes(data)))
    return bytes(data)


class VhdxHeader:
    """One of the two 4 KiB headers."""

    FIELDS = ("signature", "checksum", "sequence_number", "file_write_guid", "data_write_guid",
              "log_guid", "log_version", "version", "log_length", "log_offset")

    def __init__(self, raw: bytes) -> None:
        for name, value in zip(self.FIELDS, HEADER.unpack_from(raw)):
            setattr(self, name, value)

    def pack(self) -> bytes:
        """The whole checksummed 4 KiB (reserved bytes zero), checksum set."""
        raw = HEADER.pack(*(getattr(self, n) for n in self.FIELDS))
        return with_checksum(raw + bytes(HEADER_SIZE - len(raw)))

    def key(self) -> tuple:
        return tuple(getattr(self, n) for n in self.FIELDS)
