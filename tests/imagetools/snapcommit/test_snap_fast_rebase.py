"""Safe rebase over long walks, and its read errors.

The walk writes more than the few MiB after which the kernel is told to
start writing the image's dirty pages back (the flush at the end then has
little left to do); the backing files end inside a cluster or not, the new
one is qcow2 or raw; a read of the new backing file fails part way. qimg
must say and leave what qemu-img says and leaves: output, map, info,
check, and the guest's view of the image.
"""

from __future__ import annotations

import struct

import pytest
from snap_helpers import guest_bytes, qemu_check

pytestmark = [pytest.mark.oracle, pytest.mark.timeout(300)]

#: 20 MiB and one sector: ends inside a 64 KiB cluster
ODD = str(20 * 1024 * 1024 + 512)


def _agree(pair, name: str) -> None:
    pair.judged_same("map", "--output=json", name)
    pair.judged_same("info", "--output=json", name, ignore=("actual-size",))
    pair.judged_same("check", name)
    qemu_check(pair.ours.qemu_img, pair.ours.path(name))


def _scattered(pattern: int, size_mib: int, every_kib: int, shift_kib: int) -> list[str]:
    """qemu-io writes of 64 KiB every ``every_kib`` KiB (differences in most
    2 MiB chunks)."""
    return [f"write -P {pattern} {k}k 64k"
            for k in range(shift_kib, size_mib * 1024 - 64, every_kib)]


@pytest.mark.parametrize("old_size,new_size,new_fmt", [
    ("24M", "24M", "qcow2"),
    (ODD, "24M", "qcow2"),
    ("24M", ODD, "qcow2"),
    ("24M", "24M", "raw"),
])
def test_long_rebase_matches_qemu_img(pair, old_size, new_size, new_fmt):
    pair.setup("image", "old.qcow2", "qcow2", old_size, "write -P 0x11 0 20M",
               *_scattered(0x12, 20, 448, 32))
    pair.setup("image", f"new.{new_fmt}", new_fmt, new_size)
    # 12 MiB that differ everywhere, then differences here and there
    pair.setup("io", new_fmt, f"new.{new_fmt}", "write -P 0x21 0 12M",
               "write -P 0x11 12M 8M", *_scattered(0x21, 20, 320, 12 * 1024),
               "write -P 0x22 20M 512")
    pair.setup("image", "top.qcow2", "qcow2", "32M", "write -P 0x33 3M 1M",
               "write -P 0x34 9M 100k", "write -P 0x35 20M 4k",
               backing=("old.qcow2", "qcow2"))
    before = guest_bytes(pair.ours.qemu_img, pair.ours.path("top.qcow2"), pair.ours.dir)
    run = pair.same("rebase", "-b", f"new.{new_fmt}", "-F", new_fmt, "top.qcow2")
    assert run.rc == 0
    _agree(pair, "top.qcow2")
    assert guest_bytes(pair.ours.qemu_img, pair.ours.path("top.qcow2"),
                       pair.ours.dir) == before


def _break_l2_pointer(path, l1_index: int) -> None:
    """Make L1 entry ``l1_index`` point at an unaligned L2 table (reads there fail)."""
    with open(path, "r+b") as f:
        l1_offset = struct.unpack(">Q", f.read(48)[40:48])[0]
        f.seek(l1_offset + 8 * l1_index)
        entry = struct.unpack(">Q", f.read(8))[0]
        assert entry
        f.seek(l1_offset + 8 * l1_index)
        f.write(struct.pack(">Q", entry + 512))


def test_a_failing_read_of_the_new_backing_file_stops_as_in_qemu_img(pair):
    # 4 KiB clusters: an L2 table maps 2 MiB, so the read of the second
    # 2 MiB fails after the first chunk was compared and written
    for name, pattern in (("old", 0x41), ("new", 0x42)):
        pair.setup("image", f"{name}.qcow2", "qcow2", "16M", f"write -P {pattern} 0 16M",
                   opts="cluster_size=4096")
    pair.setup("image", "top.qcow2", "qcow2", "16M", "write -P 0x43 10M 64k",
               backing=("old.qcow2", "qcow2"))
    for side in (pair.ref, pair.ours):
        _break_l2_pointer(side.path("new.qcow2"), 1)
    run = pair.same("rebase", "-b", "new.qcow2", "-F", "qcow2", "top.qcow2")
    assert run.rc == 1 and b"error while reading from new backing file" in run.err
    _agree(pair, "top.qcow2")
