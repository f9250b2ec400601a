"""convert from a qcow2 whose tables are damaged, against qemu-img.

qemu-img reports the corruption (``qcow2: Image is corrupt: ...``, with
offsets and indices printed by C's ``%#x``, so a zero index is ``0``), then
``error while reading block status at offset N: Input/output error``, where
N is the guest offset whose status could not be read. Each case runs both
tools on their own copy of the same damaged image: the same lines, the same
exit code, and the same bytes written before the error.
"""

from __future__ import annotations

import filecmp
import struct

import pytest

#: mask of the host offset in L1 and L2 entries
_OFFSET = ((1 << 56) - 1) & ~511


def _entry_at(path, where: int) -> int:
    with open(path, "rb") as f:
        f.seek(where)
        return struct.unpack(">Q", f.read(8))[0]


def _nudge(path, where: int) -> None:
    """Move the table entry at file offset ``where`` 512 bytes off alignment."""
    entry = _entry_at(path, where)
    with open(path, "r+b") as f:
        f.seek(where)
        f.write(struct.pack(">Q", entry + 512))


def _l1_offset(path) -> int:
    with open(path, "rb") as f:
        return struct.unpack(">Q", f.read(48)[40:48])[0]


def _damage(path, case: str) -> None:
    l1 = _l1_offset(path)
    if case == "l2 table, L1 index 0":
        _nudge(path, l1)
    elif case == "l2 table, L1 index 1":
        _nudge(path, l1 + 8)
    else:                                  # "data cluster, L2 index 0x10"
        _nudge(path, (_entry_at(path, l1) & _OFFSET) + 16 * 8)


@pytest.mark.oracle
@pytest.mark.parametrize("case", ["l2 table, L1 index 0", "l2 table, L1 index 1",
                                  "data cluster, L2 index 0x10"])
@pytest.mark.parametrize("target", ["raw", "qcow2"])
def test_convert_of_a_damaged_table(pair, case, target) -> None:
    # 4 KiB clusters: one L2 table maps 2 MiB
    pair.setup("image", "src.qcow2", "qcow2", "8M", "write -P 0x11 0 128k",
               "write -P 0x22 1M 64k", "write -P 0x33 3M 64k", "write -P 0x44 6M 64k",
               opts="cluster_size=4k")
    for side in (pair.ref, pair.ours):
        _damage(side.path("src.qcow2"), case)
    run = pair.same("convert", "-O", target, "src.qcow2", f"out.{target}")
    assert run.rc == 1
    assert b"error while reading block status at offset " in run.err
    assert b"Image is corrupt" in run.err
    if target == "raw":
        # what was written before the error is the same
        assert filecmp.cmp(pair.ref.path("out.raw"), pair.ours.path("out.raw"), shallow=False)
