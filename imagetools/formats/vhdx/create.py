"""``qemu-img create -f vhdx``: the layout QEMU 7.2 writes.

File identifier (``vhdxfile`` + creator ``QEMU v7.2.22`` in UTF-16LE), two
headers (random sequence number, the second one higher), two identical
region tables, the log (1 MiB by default, left empty), the BAT right after
it and the 1 MiB metadata region after that; payload data starts 5 MiB past
the BAT region. ``block_state_zero=on`` (the default) marks every block ZERO;
``subformat=fixed`` maps every block FULLY_PRESENT on a sparse file
(unless ``block_state_zero`` wins, as in QEMU).
"""

from __future__ import annotations

import random
import struct
import uuid
from typing import Any

from imagetools.errors import ImageError
from imagetools.formats._common import (bool_option, file_preallocation, new_host_file,
                                        refuse_options, round_up, size_option)
from imagetools.formats.vhdx.structs import (BAT_GUID, BLOCK_SIZE_MAX, FILE_PARAM_GUID,
                                             FILE_SIGNATURE, HEADER1_OFFSET, HEADER2_OFFSET,
                                             HEADER_BLOCK_SIZE, HEADER_SECTION_END,
                                             LOGICAL_SECTOR_GUID, MAX_IMAGE_SIZE,
                                             MAX_SECTORS_PER_BLOCK, META_IS_REQUIRED,
                                             META_IS_VIRTUAL_DISK, METADATA_ENTRY,
                                             METADATA_GUID, METADATA_HEADER,
                                             PAGE83_GUID, PAYLOAD_BLOCK_FULLY_PRESENT,
                                             PAYLOAD_BLOCK_ZERO,
                                             PHYS_SECTOR_GUID, REGION_ENTRY, REGION_HEADER,
                                             REGION_TABLE2_OFFSET, REGION_TABLE_OFFSET,
                                             VIRTUAL_SIZE_GUID, ZERO_GUID, MiB, VhdxHeader,
                                             with_checksum)

CREATOR = "QEMU v7.2.22"
SECTOR = 512
GiB = 1 << 30
TiB = 1 << 40


def _block_size(size: int, given: int) -> int:
    if given:
        return given
    if size > 32 * TiB:
        return 64 * MiB
    if size > 100 * GiB:
        return 32 * MiB
    if size > 1 * GiB:
        return 16 * MiB
    return 8 * MiB


def create(filename: str, size: int, options: dict[str, Any]) -> None:
    refuse_options(options, ("log_size", "block_size", "subformat", "block_state_zero"))
    file_preallocation(options)
    size = round_up(size, SECTOR)
    log_size = options.get("log_size")
    log_size = round_up(size_option(options, "log_size", MiB), MiB) if log_size is not None \
        else MiB
    block_size = round_up(size_option(options, "block_size", 0), MiB)
    block_size = min(block_size, BLOCK_SIZE_MAX)
    subformat = str(options.get("subformat") or "dynamic")
    if subformat not in ("dynamic", "fixed"):
        raise ImageError(f"Parameter 'subformat' does not accept value '{subformat}'")
    zero_blocks = bool_option(options, "block_state_zero", True)
    if size > MAX_IMAGE_SIZE:
        raise ImageError("Image size too large; max of 64TB")
    if log_size > 0xFFFFFFFF:
        raise ImageError("Log size must be smaller than 4 GB")
    if log_size < MiB or log_size % MiB:
        raise ImageError("Log size must be a multiple of 1 MB")
    block_size = _block_size(size, block_size)
    if block_size < MiB or block_size % MiB:
        raise ImageError("Block size must be a multiple of 1 MB")
    if block_size & (block_size - 1):
        raise ImageError("Block size must be a power of two")
    fixed = subformat == "fixed"

    chunk_ratio = MAX_SECTORS_PER_BLOCK * SECTOR // block_size
    blocks = -(-size // block_size)
    bat_entries = blocks + ((blocks - 1) // chunk_ratio) if blocks else 0
    bat_offset = round_up(HEADER_SECTION_END + log_size, MiB)
    bat_length = round_up(bat_entries * 8, MiB)
    metadata_offset = round_up(bat_offset + bat_length, MiB)
    data_offset = bat_offset + bat_length + 5 * MiB

    file = new_host_file(filename)
    try:
        file.pwrite(0, FILE_SIGNATURE + CREATOR.encode("utf-16-le"))
        hdr = VhdxHeader(bytes(80))
        hdr.signature = b"head"
        hdr.sequence_number = random.getrandbits(32)
        hdr.file_write_guid = uuid.uuid4().bytes_le
        hdr.data_write_guid = uuid.uuid4().bytes_le
        hdr.log_guid = ZERO_GUID
        hdr.log_version = 0
        hdr.version = 1
        hdr.log_length = log_size
        hdr.log_offset = HEADER_SECTION_END
        file.pwrite(HEADER1_OFFSET, hdr.pack()[:80])
        hdr.sequence_number += 1
        file.pwrite(HEADER2_OFFSET, hdr.pack()[:80])
        file.truncate(data_offset + size if fixed else data_offset)
        if fixed or zero_blocks:
            state = PAYLOAD_BLOCK_ZERO if zero_blocks else PAYLOAD_BLOCK_FULLY_PRESENT
            bat = bytearray(bat_length)
            for block in range(blocks):
                index = block + block // chunk_ratio
                entry = state
                if state == PAYLOAD_BLOCK_FULLY_PRESENT:
                    entry |= round_up(data_offset + block * block_size, MiB)
                struct.pack_into("<Q", bat, index * 8, entry)
            file.pwrite(bat_offset, bytes(bat[:round_up(bat_entries * 8, 4096)]))
        table = bytearray(HEADER_BLOCK_SIZE)
        REGION_HEADER.pack_into(table, 0, b"regi", 0, 2, 0)
        REGION_ENTRY.pack_into(table, 16, BAT_GUID, bat_offset, bat_length, 0)
        REGION_ENTRY.pack_into(table, 48, METADATA_GUID, metadata_offset, MiB, 0)
        table = with_checksum(bytes(table))
        file.pwrite(REGION_TABLE_OFFSET, table)
        file.pwrite(REGION_TABLE2_OFFSET, table)
        _write_metadata(file, metadata_offset, size, block_size, fixed)
        file.flush()
    finally:
        file.close()


def _write_metadata(file, offset: int, size: int, block_size: int, fixed: bool) -> None:
    table = bytearray(HEADER_BLOCK_SIZE)
    METADATA_HEADER.pack_into(table, 0, b"metadata", 0, 5, bytes(20))
    items = [
        (FILE_PARAM_GUID, struct.pack("<II", block_size, 1 if fixed else 0), META_IS_REQUIRED),
        (VIRTUAL_SIZE_GUID, struct.pack("<Q", size), META_IS_REQUIRED | META_IS_VIRTUAL_DISK),
        (PAGE83_GUID, uuid.uuid4().bytes_le, META_IS_REQUIRED | META_IS_VIRTUAL_DISK),
        (LOGICAL_SECTOR_GUID, struct.pack("<I", SECTOR), META_IS_REQUIRED | META_IS_VIRTUAL_DISK),
        (PHYS_SECTOR_GUID, struct.pack("<I", SECTOR), META_IS_REQUIRED | META_IS_VIRTUAL_DISK),
    ]
    data = b""
    item_offset = 64 * 1024
    for i, (item, value, bits) in enumerate(items):
        METADATA_ENTRY.pack_into(table, 32 + 32 * i, item, item_offset + len(data), len(value),
                                 bits, 0)
        data += value
    file.pwrite(offset, bytes(table))
    file.pwrite(offset + item_offset, data)
