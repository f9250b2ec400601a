"""qimg check -r leaks|all against qemu-img 7.2 on images broken on purpose.

Each case is built twice (``pair``): qemu-img repairs one copy, qimg the
other. stdout, stderr and the exit code must be identical, and afterwards
the real ``qemu-img check`` must say the same about both copies (clean,
where qemu-img manages to repair) and the guest data must be the same.
"""

from __future__ import annotations

import struct

import pytest
from snap_helpers import guest_bytes

pytestmark = pytest.mark.oracle


def _header(path):
    with open(path, "rb") as f:
        data = f.read(104)
    (_, version, _, _, cluster_bits, size, _, l1_size, l1_offset, rt_offset, rt_clusters,
     nb_snap, snap_offset) = struct.unpack(">IIQIIQIIQQIIQ", data[:72])
    return {"cs": 1 << cluster_bits, "l1": l1_offset, "rt": rt_offset, "size": size,
            "snapshots": snap_offset, "version": version}


def _u64(path, offset):
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(">Q", f.read(8))[0]


def _put(path, offset, fmt, value):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def _l2(path):
    h = _header(path)
    return _u64(path, h["l1"]) & 0x00FFFFFFFFFFFE00


def _refblock0(path):
    return _u64(path, _header(path)["rt"])


def leak(path):               # the L2 entry of the 2nd data cluster is zeroed
    _put(path, _l2(path) + 8, ">Q", 0)


def refcount_zero(path):      # corruption A
    _put(path, _refblock0(path) + 2 * 5, ">H", 0)


def past_eof(path):           # corruption B
    _put(path, _l2(path) + 8, ">Q", (1 << 63) | 0x1000000)


def l1_past_eof(path):        # corruption D
    _put(path, _header(path)["l1"], ">Q", (1 << 63) | 0x1000000)


def refcount_two(path):       # refcount too high
    _put(path, _refblock0(path) + 2 * 5, ">H", 2)


def onto_refblock(path):      # corruption E: a data cluster on the refcount block
    _put(path, _l2(path) + 8, ">Q", (1 << 63) | _refblock0(path))


def unaligned_l1(path):       # corruption D2
    _put(path, _header(path)["l1"], ">Q", (1 << 63) | (_l2(path) + 0x200))


def unaligned_prealloc(path):  # a preallocated zero cluster at an unaligned offset
    _put(path, _l2(path) + 8, ">Q", (1 << 63) | 0x60200 | 1)


def refblock_past_eof(path):  # the only refcount block beyond the end of the file
    _put(path, _header(path)["rt"], ">Q", 0x4000000)


def copied_missing(path):     # COPIED flag cleared on a refcount-1 data cluster
    _put(path, _l2(path), ">Q", _u64(path, _l2(path)) & ~(1 << 63))


def copied_on_l1(path):       # COPIED cleared on the L1 entry
    h = _header(path)
    _put(path, h["l1"], ">Q", _u64(path, h["l1"]) & ~(1 << 63))


def corrupt_bit(path):        # the corrupt bit, plus a leak to repair
    _put(path, 72, ">Q", 2)
    leak(path)


CASES = {
    "leak": leak, "refcount-zero": refcount_zero, "past-eof": past_eof,
    "l1-past-eof": l1_past_eof, "refcount-two": refcount_two, "onto-refblock": onto_refblock,
    "unaligned-prealloc": unaligned_prealloc,
    "refblock-past-eof": refblock_past_eof, "copied-missing": copied_missing,
    "copied-on-l1": copied_on_l1, "corrupt-bit": corrupt_bit,
}


def _build(pair, name, breaker):
    pair.setup("image", name, "qcow2", "64M", "write -P 0xab 0 64k", "write -P 0xcd 64k 64k",
               "write -P 0xef 1M 64k")
    for side in (pair.ref, pair.ours):
        breaker(str(side.path(name)))


@pytest.mark.parametrize("mode", ["leaks", "all"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_repair_matches_qemu_img(pair, case, mode):
    _build(pair, "b.qcow2", CASES[case])
    pair.same("check", "-r", mode, "b.qcow2")
    pair.judged_same("check", "--output=json", "b.qcow2")
    pair.judged_same("info", "--output=json", "b.qcow2", ignore=("actual-size",))
    ref = _content(pair.ref)
    assert _content(pair.ours) == ref


def _content(side) -> bytes | None:
    """The guest content, or None when qemu-img cannot read it all."""
    try:
        return guest_bytes(side.qemu_img, side.path("b.qcow2"), side.dir)
    except AssertionError:
        return None


@pytest.mark.parametrize("case", ["leak", "refcount-zero", "onto-refblock", "refcount-two"])
def test_repair_json_and_quiet(pair, case):
    _build(pair, "j.qcow2", CASES[case])
    pair.same("check", "-r", "all", "--output=json", "j.qcow2")
    _build(pair, "q.qcow2", CASES[case])
    pair.same("check", "-q", "-r", "all", "q.qcow2")


def test_repair_usage_and_refusals(pair):
    pair.setup("image", "c.qcow2", "qcow2", "1M")
    pair.setup("image", "r.raw", "raw", "1M")
    for step in [("check", "-r", "leaks", "-U", "c.qcow2"), ("check", "-r", "all", "r.raw"),
                 ("check", "-r", "all", "-f", "raw", "r.raw"), ("check", "-r", "all", "nope"),
                 ("check", "-r", "all", "c.qcow2"), ("check", "-r", "bogus", "c.qcow2")]:
        pair.same(*step)


def test_repair_with_snapshots_and_small_clusters(pair):
    """Leaks and a zeroed refcount in an image with internal snapshots, 4k clusters."""
    pair.setup("image", "s.qcow2", "qcow2", "4M", "write -P 1 0 1M", opts="cluster_size=4k")
    pair.setup("ok", "snapshot", "-c", "one", "s.qcow2")
    pair.setup("io", "qcow2", "s.qcow2", "write -P 2 256k 256k")
    for side in (pair.ref, pair.ours):
        path = str(side.path("s.qcow2"))
        refblock = _refblock0(path)
        _put(path, refblock + 2 * 3, ">H", 0)            # the L1 table's refcount
        _put(path, refblock + 2 * 200, ">H", 7)          # a data cluster's
    pair.same("check", "-r", "all", "s.qcow2")
    pair.judged_same("check", "--output=json", "s.qcow2")
    for snap in (None, "one"):
        assert guest_bytes(pair.ref.qemu_img, pair.ref.path("s.qcow2"), pair.ref.dir,
                           snapshot=snap) == \
            guest_bytes(pair.ours.qemu_img, pair.ours.path("s.qcow2"), pair.ours.dir,
                        snapshot=snap)


def test_dirty_lazy_image(pair):
    """A lazy-refcounts image killed before its refcounts were written."""
    pair.setup("image", "d.qcow2", "qcow2", "8M", "write -P 3 0 2M", opts="lazy_refcounts=on")
    for side in (pair.ref, pair.ours):
        path = str(side.path("d.qcow2"))
        _put(path, 72, ">Q", 1)                                   # dirty
        _put(path, _refblock0(path) + 2 * 10, ">H", 0)            # lost increment
        _put(path, _refblock0(path) + 2 * 30, ">H", 1)            # a leak
    pair.same("check", "d.qcow2")
    pair.same("check", "-r", "all", "d.qcow2")
    pair.judged_same("info", "--output=json", "d.qcow2", ignore=("actual-size",))
    pair.judged_same("check", "d.qcow2")


def test_unaligned_l2_table_is_not_written_through(pair):
    """An L1 entry pointing into the middle of a cluster: qemu-img -r all reads
    an "L2 table" there and rewrites its entries -- over guest data. qimg
    reports the same corruption and leaves that table alone."""
    _build(pair, "u.qcow2", unaligned_l1)
    path = str(pair.ours.path("u.qcow2"))
    with open(path, "rb") as f:
        before = f.read()
    run = pair.ours.ours("check", "-r", "all", "u.qcow2")
    assert run.rc == 2, run.text()
    assert run.err.startswith(b"ERROR l2_offset=40200: Table is not cluster aligned; L1 entry "
                              b"corrupted\n")
    with open(path, "rb") as f:
        after = f.read()
    assert after[0x40000:0x60000] == before[0x40000:0x60000]   # L2 table and first data
    assert pair.ours.ref("check", "u.qcow2").rc == 2     # still corrupt, as qemu-img leaves it


@pytest.mark.parametrize("mode", ["leaks", "all"])
def test_snapshot_table_past_the_end(pair, mode):
    """The snapshot table pointer moved past EOF: incomplete entry, leaks, a
    refcount 0; -r all rebuilds and rewrites the table as QEMU does."""
    pair.setup("image", "t.qcow2", "qcow2", "1M", "write -P 1 0 64k")
    pair.setup("ok", "snapshot", "-c", "s", "t.qcow2")
    for side in (pair.ref, pair.ours):
        path = str(side.path("t.qcow2"))
        import os
        _put(path, 64, ">Q", -(-os.path.getsize(path) // 65536) * 65536)
    pair.same("check", "t.qcow2")
    pair.same("check", "-r", mode, "t.qcow2")
    pair.judged_same("check", "t.qcow2")
    pair.judged_same("snapshot", "-l", "t.qcow2")
