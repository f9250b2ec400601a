"""Geometry of one qcow2 image and the meaning of L1/L2 entries.

:class:`Layout` holds the sizes derived from the header (cluster, L2 and
refcount-block geometry, compressed-descriptor bit fields) and classifies
L2 entries into QEMU's (sub)cluster types:

============================  ================================================
``UNALLOCATED_PLAIN``         nothing here: read the backing file (or zeros)
``UNALLOCATED_ALLOC``         extended L2: host cluster exists, subcluster not
``ZERO_PLAIN``                reads as zeros, no host cluster
``ZERO_ALLOC``                reads as zeros, host cluster kept (preallocated)
``NORMAL``                    data at the host offset
``COMPRESSED``                compressed data at a byte offset
============================  ================================================
"""

from __future__ import annotations

from imagetools.formats.qcow2.header import Header

QCOW_OFLAG_COPIED = 1 << 63
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_STD_RESERVED_MASK = 0x3F000000000001FE

UNALLOCATED_PLAIN = 0
UNALLOCATED_ALLOC = 1
ZERO_PLAIN = 2
ZERO_ALLOC = 3
NORMAL = 4
COMPRESSED = 5
INVALID = 6

SUBCLUSTERS = 32
BITMAP_ALL_ALLOC = 0xFFFFFFFF
BITMAP_ALL_ZERO = 0xFFFFFFFF << 32


class Layout:
    """Sizes and bit fields of one image, computed once from its header."""

    def __init__(self, header: Header) -> None:
        from imagetools.formats.qcow2.header import INCOMPAT_DATA_FILE
        #: with an external data file, host offset 0 is valid (COPIED tells)
        self.has_data_file = bool(header.incompatible_features & INCOMPAT_DATA_FILE)
        self.cluster_bits = header.cluster_bits
        self.cluster_size = 1 << self.cluster_bits
        self.extended_l2 = header.extended_l2
        self.version = header.version
        self.l2_entry_words = 2 if self.extended_l2 else 1
        self.l2_entries = self.cluster_size // (8 * self.l2_entry_words)
        self.l2_bits = self.l2_entries.bit_length() - 1
        self.subclusters = SUBCLUSTERS if self.extended_l2 else 1
        self.subcluster_size = self.cluster_size // self.subclusters
        self.subcluster_bits = self.subcluster_size.bit_length() - 1
        self.refcount_order = header.refcount_order
        self.refcount_bits = 1 << self.refcount_order
        self.refcount_max = (1 << self.refcount_bits) - 1
        self.refblock_entries = self.cluster_size * 8 // self.refcount_bits
        self.refblock_bits = self.refblock_entries.bit_length() - 1
        self.csize_shift = 62 - (self.cluster_bits - 8)
        self.csize_mask = (1 << (self.cluster_bits - 8)) - 1
        self.cluster_offset_mask = (1 << self.csize_shift) - 1
        self.l2_coverage = self.cluster_size * self.l2_entries

    # -- address arithmetic ------------------------------------------------

    def l1_index(self, guest: int) -> int:
        return guest >> (self.cluster_bits + self.l2_bits)

    def l2_index(self, guest: int) -> int:
        return (guest >> self.cluster_bits) & (self.l2_entries - 1)

    def l1_entries_for(self, size: int) -> int:
        return -(-size // self.l2_coverage)

    def clusters(self, nbytes: int) -> int:
        return -(-nbytes // self.cluster_size)

    # -- entries -----------------------------------------------------------

    def compressed_range(self, entry: int) -> tuple[int, int]:
        """(host offset, bytes to read) of a compressed cluster descriptor."""
        coffset = entry & self.cluster_offset_mask
        nb_csectors = ((entry >> self.csize_shift) & self.csize_mask) + 1
        return coffset, nb_csectors * 512 - (coffset & 511)

    def compressed_entry(self, coffset: int, csize: int) -> int:
        """The L2 entry for ``csize`` compressed bytes stored at ``coffset``."""
        nb_csectors = ((coffset + csize - 1) >> 9) - (coffset >> 9)
        return QCOW_OFLAG_COMPRESSED | (nb_csectors << self.csize_shift) | coffset

    def cluster_type(self, entry: int) -> int:
        """Type of a whole cluster from a standard (not extended) L2 entry."""
        if entry & QCOW_OFLAG_COMPRESSED:
            return COMPRESSED
        if entry & QCOW_OFLAG_ZERO:
            return ZERO_ALLOC if entry & L2E_OFFSET_MASK else ZERO_PLAIN
        if entry & L2E_OFFSET_MASK:
            return NORMAL
        # with an external data file, offset 0 + COPIED means host offset 0
        if self.has_data_file and entry & QCOW_OFLAG_COPIED:
            return NORMAL
        return UNALLOCATED_PLAIN

    def subcluster_type(self, entry: int, bitmap: int, sc: int) -> int:
        """Type of subcluster ``sc`` from an extended L2 entry and its bitmap."""
        if entry & QCOW_OFLAG_COMPRESSED:
            return COMPRESSED
        alloc = (bitmap >> sc) & 1
        zero = (bitmap >> (32 + sc)) & 1
        if alloc and zero:
            return INVALID
        allocated_cluster = bool(entry & L2E_OFFSET_MASK or (
            self.has_data_file and entry & QCOW_OFLAG_COPIED))
        if zero:
            return ZERO_ALLOC if allocated_cluster else ZERO_PLAIN
        if alloc:
            return NORMAL if allocated_cluster else INVALID
        return UNALLOCATED_ALLOC if allocated_cluster else UNALLOCATED_PLAIN
