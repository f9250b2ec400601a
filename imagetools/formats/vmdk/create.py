"""``qemu-img create -f vmdk``: the five subformats, laid out as QEMU 7.2 lays them out.

Sparse extents (monolithicSparse, streamOptimized, each file of
twoGbMaxExtentSparse): a 512-byte KDMV header, 20 sectors reserved for the
descriptor, the redundant grain directory and all its grain tables, the
primary directory and its tables, then grains from the next grain boundary.
Flat extents are sparse raw files. Split subformats cut the disk into
2 GiB extent files named ``NAME-s001.EXT`` / ``NAME-f001.EXT``; monolithicFlat
uses ``NAME-flat.EXT``; the descriptor names them relative to itself.
"""

from __future__ import annotations

import os
import random
import struct
from typing import Any

from imagetools.errors import ImageError, UnsupportedError
from imagetools.formats._common import (SECTOR, bool_option, div_round_up, file_preallocation,
                                        new_host_file, refuse_options, round_up)
from imagetools.formats.vmdk import descriptor as desc_mod
from imagetools.formats.vmdk.extents import (COMPRESSION_DEFLATE, FLAG_COMPRESS, FLAG_MARKER,
                                             FLAG_NL_DETECT, FLAG_RGD, FLAG_ZERO_GRAIN,
                                             VMDK4, VMDK4_MAGIC)

SUBFORMATS = ("monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
              "twoGbMaxExtentFlat", "streamOptimized")
ADAPTER_TYPES = ("ide", "buslogic", "lsilogic", "legacyESX")
SPLIT_SIZE = 0x80000000
GRAIN_SECTORS = 128
GTES_PER_GT = 512
OPTIONS = ("adapter_type", "backing_file", "backing_fmt", "compat6", "hwversion",
           "toolsversion", "subformat", "zeroed_grain")


def sparse_layout(size: int, *, compress: bool,
                  zeroed_grain: bool) -> tuple[list[tuple[int, bytes]], int]:
    """([(file offset, bytes)] to write, file length) of a new sparse extent.

    The header, then 20 empty descriptor sectors, the redundant grain
    directory followed by all its (zeroed) grain tables, the primary one
    likewise, and grains from the next grain boundary: the tables are left
    as holes, only the header and the two directories hold data.
    """
    capacity = size // SECTOR
    grains = div_round_up(capacity, GRAIN_SECTORS)
    gt_sectors = div_round_up(GTES_PER_GT * 4, SECTOR)
    gt_count = div_round_up(grains, GTES_PER_GT)
    gd_sectors = div_round_up(gt_count * 4, SECTOR)
    desc_offset, desc_size = 1, 20
    rgd_offset = desc_offset + desc_size
    gd_offset = rgd_offset + gd_sectors + gt_sectors * gt_count
    grain_offset = round_up(gd_offset + gd_sectors + gt_sectors * gt_count, GRAIN_SECTORS)
    version = 3 if compress else 2 if zeroed_grain else 1
    flags = FLAG_RGD | FLAG_NL_DETECT
    if compress:
        flags |= FLAG_COMPRESS | FLAG_MARKER
    if zeroed_grain:
        flags |= FLAG_ZERO_GRAIN
    header = VMDK4_MAGIC + VMDK4.pack(version, flags, capacity, GRAIN_SECTORS, desc_offset,
                                      desc_size, GTES_PER_GT, rgd_offset, gd_offset, grain_offset,
                                      0, b"\n \r\n", COMPRESSION_DEFLATE if compress else 0)
    writes = [(0, header)]
    for gd in (rgd_offset, gd_offset):
        first_gt = gd + gd_sectors
        table = struct.pack(f"<{gt_count}I", *range(first_gt, first_gt + gt_count * gt_sectors,
                                                      gt_sectors))
        writes.append((gd * SECTOR, table))
    return writes, grain_offset * SECTOR


def write_sparse_extent(path: str, size: int, *, compress: bool, zeroed_grain: bool) -> None:
    writes, length = sparse_layout(size, compress=compress, zeroed_grain=zeroed_grain)
    file = new_host_file(path)
    try:
        file.truncate(length)
        for offset, data in writes:
            file.pwrite(offset, data)
        file.flush()
    finally:
        file.close()


def write_flat_extent(path: str, size: int) -> None:
    file = new_host_file(path)
    try:
        file.truncate(size)
        file.flush()
    finally:
        file.close()


def decompose(filename: str) -> tuple[str, str, str]:
    """QEMU's filename_decompose: (directory part, name without suffix, suffix)."""
    if not filename:
        raise ImageError("No filename provided")
    cut = -1
    for sep in ("/", "\\", ":"):
        cut = filename.rfind(sep)
        if cut >= 0:
            break
    path, base = filename[:cut + 1], filename[cut + 1:]
    dot = base.rfind(".")
    if dot < 0:
        return path, base, ""
    return path, base[:dot], base[dot:]


def _parent_cid(filename: str, backing: str) -> int:
    """The CID of the would-be backing file, which must be a VMDK image."""
    from imagetools.image import open_image, resolve_backing_path
    path = resolve_backing_path(filename, backing)
    drv = open_image(path, None, read_only=True, force_share=True, open_backing=False)
    try:
        if drv.format_name != "vmdk":
            raise ImageError(f"Invalid backing file format: {drv.format_name}. Must be vmdk")
        return drv.cid
    finally:
        drv.close()


def create(filename: str, size: int, options: dict[str, Any]) -> None:
    refuse_options(options, OPTIONS)
    file_preallocation(options)
    backing_fmt = options.get("backing_fmt")
    if backing_fmt and backing_fmt != "vmdk":
        raise ImageError("backing_file must be a vmdk image")
    path, prefix, postfix = decompose(filename)
    size = round_up(size, SECTOR)
    adapter = str(options.get("adapter_type") or "ide")
    backing = options.get("backing_file") or None
    hw_version = options.get("hwversion")
    if hw_version == "undefined":
        hw_version = None
    tools = options.get("toolsversion")
    compat6 = bool_option(options, "compat6")
    zeroed_grain = bool_option(options, "zeroed_grain")
    subformat = str(options.get("subformat") or "monolithicSparse")
    if adapter not in ADAPTER_TYPES:
        raise ImageError(f"invalid parameter value: {adapter}")
    if subformat not in SUBFORMATS:
        raise ImageError(f"invalid parameter value: {subformat}")
    if compat6:
        if hw_version:
            raise ImageError("compat6 cannot be enabled with hwversion set")
        hw_version = "6"
    hw_version = hw_version or "4"
    tools = tools or "2147483647"
    heads = 16 if adapter == "ide" else 255
    split = subformat in ("twoGbMaxExtentFlat", "twoGbMaxExtentSparse")
    flat = subformat in ("monolithicFlat", "twoGbMaxExtentFlat")
    compress = subformat == "streamOptimized"
    if flat and backing:
        raise UnsupportedError("Flat image can't have backing file")
    if flat and zeroed_grain:
        raise UnsupportedError("Flat image can't enable zeroed grain")
    line = 'RW {} FLAT "{}" 0\n' if flat else 'RW {} SPARSE "{}"\n'
    extents: list[str] = []
    parent_cid = 0xFFFFFFFF
    main = filename
    if not split and not flat:
        write_sparse_extent(main, size, compress=compress, zeroed_grain=zeroed_grain)
        extents.append(line.format(div_round_up(size, SECTOR), os.path.basename(main)))
    else:
        write_flat_extent(main, 0)
    if backing:
        parent_cid = _parent_cid(filename, str(backing))
    created = size if not split and not flat else 0
    index = 1
    while created < size:
        cur = min(size - created, SPLIT_SIZE if split else size)
        if split:
            name = f"{prefix}-{'f' if flat else 's'}{index:03d}{postfix}"
        else:
            name = f"{prefix}-flat{postfix}"
        ext_path = path + name
        if flat:
            write_flat_extent(ext_path, cur)
        else:
            write_sparse_extent(ext_path, cur, compress=compress, zeroed_grain=zeroed_grain)
        extents.append(line.format(div_round_up(cur, SECTOR), name))
        created += cur
        index += 1
    text = desc_mod.render(cid=random.getrandbits(32), parent_cid=parent_cid,
                           create_type=subformat, parent_hint_name=backing, extents=extents,
                           hw_version=str(hw_version), size=size, heads=heads,
                           adapter_type=adapter, tools_version=str(tools))
    data = text.encode("utf-8", "surrogateescape")
    from imagetools.formats.hostfile import HostFile
    file = HostFile.open(main, read_only=False)
    try:
        if not split and not flat:
            file.pwrite(0x200, data)
        else:
            file.pwrite(0, data)
            file.truncate(len(data))
        file.flush()
    finally:
        file.close()
