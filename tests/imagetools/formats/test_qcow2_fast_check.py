"""qcow2 check's whole-table path against qemu-img check and against its definitions.

check counts plain L2 tables (data, zero and unallocated entries only) in
whole-table passes and skips the COPIED walk of those tables when every
counted cluster has refcount 1. qemu-img check is the judge on the images
where that shortcut must not apply (shared clusters of a snapshot, a
cleared COPIED flag, a leak, a cluster referenced twice, a refcount that
overflows 8 bits) and where it does; the helpers are checked against
their plain-Python definitions on random tables.
"""

from __future__ import annotations

import os
import random
from array import array

import pytest
from fmt_helpers import run
from image_oracle import qimg_wrapper
from test_qcow2_fast_map import both, make, scattered

from imagetools.formats.qcow2.check import _discontiguous, _ones_at_most
from imagetools.formats.qcow2.tables import contiguous_pairs, plain_clusters, plain_entries

L2_MASK = 0x00FFFFFFFFFFFE00


@pytest.fixture(scope="module")
def qimg(tmp_path_factory) -> str:
    return qimg_wrapper(tmp_path_factory.mktemp("qimg"), "qemu-img")


def l2_table(path: str) -> int:
    """Host offset of the first L2 table."""
    with open(path, "rb") as f:
        l1 = int.from_bytes(f.read(48)[40:48], "big")
        f.seek(l1)
        return int.from_bytes(f.read(8), "big") & L2_MASK


def entry(path: str, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return int.from_bytes(f.read(8), "big")


def poke(path: str, offset: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(value.to_bytes(8, "big"))


def same_check(qemu_img: str, qimg: str, path: str) -> None:
    for fmt in ("--output=json", "--output=human"):
        both(qemu_img, qimg, "check", fmt, path, cwd=os.path.dirname(path))


def test_scattered_image_checks_like_qemu_img(qemu_img, qemu_io, qimg, tmp_path):
    path = make(qemu_img, qemu_io, tmp_path / "s.qcow2", "8M", "cluster_size=4k",
                *scattered(900, 2048, 4096, 1), "write -z 100k 8k")
    same_check(qemu_img, qimg, path)


@pytest.mark.parametrize("bits", [8, 16, 64])
def test_shared_clusters_of_a_snapshot_are_not_taken_as_copied(qemu_img, qemu_io, qimg,
                                                                 tmp_path, bits):
    path = make(qemu_img, qemu_io, tmp_path / "snap.qcow2", "4M",
                f"cluster_size=4k,refcount_bits={bits}", *scattered(500, 1024, 4096, 2))
    run(qemu_img, "snapshot", "-c", "one", path)
    same_check(qemu_img, qimg, path)
    # a COPIED flag set on a shared cluster is an error both see
    l2 = l2_table(path)
    for i in range(512):
        value = entry(path, l2 + 8 * i)
        if value & L2_MASK:
            poke(path, l2 + 8 * i, value | 1 << 63)
            break
    same_check(qemu_img, qimg, path)


def test_a_cleared_copied_flag_is_found(qemu_img, qemu_io, qimg, tmp_path):
    path = make(qemu_img, qemu_io, tmp_path / "c.qcow2", "4M", "cluster_size=4k",
                *scattered(400, 512, 4096, 3))
    l2 = l2_table(path)
    cleared = 0
    for i in range(512):
        value = entry(path, l2 + 8 * i)
        if value & L2_MASK and cleared < 3:
            poke(path, l2 + 8 * i, value & ~(1 << 63))
            cleared += 1
    assert cleared == 3
    same_check(qemu_img, qimg, path)


def test_a_leak_and_a_cluster_referenced_twice(qemu_img, qemu_io, qimg, tmp_path):
    path = make(qemu_img, qemu_io, tmp_path / "d.qcow2", "4M", "cluster_size=4k",
                *scattered(300, 512, 4096, 4))
    l2 = l2_table(path)
    data = [i for i in range(512) if entry(path, l2 + 8 * i) & L2_MASK]
    poke(path, l2 + 8 * data[1], entry(path, l2 + 8 * data[0]))    # twice, other leaked
    same_check(qemu_img, qimg, path)


def test_an_overflowing_8_bit_refcount_is_reported_as_qemu_img_does(qemu_img, qemu_io, qimg,
                                                                      tmp_path):
    """300 entries of one table point at one cluster: the whole-table count
    overflows part-way, is undone and the entry walk reports it."""
    path = make(qemu_img, qemu_io, tmp_path / "o.qcow2", "4M",
                "cluster_size=4k,refcount_bits=8", "write -P 1 0 4k", "write -P 2 1M 4k")
    l2 = l2_table(path)
    first = entry(path, l2)
    with open(path, "r+b") as f:
        f.seek(l2 + 8 * 10)
        f.write(first.to_bytes(8, "big") * 300)
    same_check(qemu_img, qimg, path)


def _random_table(rng: random.Random, n: int, cbits: int) -> array:
    words = array("Q", bytes(8 * n))
    for i in range(n):
        kind = rng.random()
        if kind < 0.3:
            continue
        host = rng.randrange(1, 1 << 20) << cbits
        copied = (1 << 63) if rng.random() < 0.9 else 0
        if kind < 0.35:
            words[i] = copied | 1                     # plain zero
        elif kind < 0.4:
            words[i] = copied | host | 1              # allocated zero
        else:
            words[i] = copied | host
    return words


@pytest.mark.parametrize("cbits", [9, 12, 14, 16, 21])
def test_plain_clusters_agrees_with_plain_entries_and_the_entries(cbits):
    rng = random.Random(cbits)
    for n in (1, 2, 7, 512, 2048):
        for _ in range(5):
            words = _random_table(rng, n, cbits)
            ks, copied = plain_clusters(words, cbits)
            clusters, flags, _ = plain_entries(words, cbits)
            assert ks == clusters == [(w & L2_MASK) >> cbits for w in words if w & L2_MASK]
            assert copied == all(w >> 63 for w in words if w & L2_MASK)
            assert copied == (flags.count(0x80) == len(flags))
    bad = _random_table(rng, 64, cbits)
    bad[5] = (1 << 62) | 12345                        # compressed
    assert plain_clusters(bad, cbits) is None


def test_contiguity_helpers_match_their_definitions():
    rng = random.Random(7)
    for n in (0, 1, 2, 3, 50, 1000):
        ks = [rng.choice((k, k + 1)) for k in sorted(rng.sample(range(1, 5000), n))]
        follow = sum(1 for a, b in zip(ks, ks[1:]) if b == a + 1)
        assert contiguous_pairs(array("Q", ks), 1) == follow
        assert _discontiguous(array("Q", ks)) == max(0, len(ks) - 1 - follow)
        hosts = array("Q", [k << 16 for k in ks])
        assert contiguous_pairs(hosts, 1 << 16) == follow


@pytest.mark.parametrize("code", ["B", "H", "I", "Q"])
def test_ones_at_most(code):
    counts = array(code, [0, 1, 1, 0, 1])
    assert _ones_at_most(counts, array(code, counts))
    assert not _ones_at_most(counts, array(code, [0, 1, 1, 0, 0]))
    assert not _ones_at_most(counts, array(code, [0, 1, 1, 0]))
    two = array(code, [0, 1, 2, 0, 1])
    assert not _ones_at_most(two, array(code, two))
    if code != "B":
        big = array(code, [0, 1, 256, 0, 1])          # a 1 in a high byte only
        assert not _ones_at_most(big, array(code, big))


@pytest.mark.parametrize("cut", [512, 4096, 4096 + 512, 3 * 4096])
def test_data_clusters_at_and_past_the_end_of_the_file(qemu_img, qemu_io, qimg, tmp_path, cut):
    """A file cut short inside or before its last data clusters: the
    whole-table path leaves those to the entry walk, which reports as
    qemu-img does."""
    path = make(qemu_img, qemu_io, tmp_path / "cut.qcow2", "4M", "cluster_size=4k",
                *scattered(200, 512, 4096, 14), "write -P 9 3M 16k")
    os.truncate(path, os.path.getsize(path) - cut)
    same_check(qemu_img, qimg, path)


def test_contiguity_at_byte_and_width_boundaries():
    """Fields whose bytes carry into the next byte (0xFF...), values just under
    2**56 and steps of one and of a cluster: the folded XOR finds exactly the
    pairs that follow each other."""
    rng = random.Random(56)
    top = (1 << 56) - 1
    for step in (1, 1 << 9, 1 << 16, 1 << 21):
        edges = [0xFF * step, 0xFFFF * step, (top // step - 1) * step, step]
        for n in (2, 3, 9, 300):
            values = []
            for _ in range(n):
                if values and rng.random() < 0.4 and values[-1] + step <= top:
                    values.append(values[-1] + step)
                else:
                    values.append(rng.choice(edges) if rng.random() < 0.5
                                  else rng.randrange(0, top // step) * step)
            follow = sum(1 for a, b in zip(values, values[1:]) if b == a + step)
            assert contiguous_pairs(array("Q", values), step) == follow


@pytest.mark.parametrize("cbits", [9, 14, 16, 21])
def test_data_hosts_matches_its_definition(cbits):
    """Map's whole-slice view: host offsets and presence of a table of data and
    unallocated entries (COPIED or not); None for anything else, including a
    COPIED flag on an entry without an offset."""
    from imagetools.formats.qcow2.tables import data_hosts
    rng = random.Random(cbits)
    for n in (1, 2, 9, 512):
        words = array("Q", bytes(8 * n))
        for i in range(n):
            if rng.random() < 0.7:
                words[i] = (rng.random() < 0.5) << 63 | rng.randrange(1, 1 << 30) << cbits
        hosts, present = data_hosts(words, cbits)
        assert list(hosts) == [w & L2_MASK for w in words]
        assert present == bytes(bool(w) for w in words)
        for odd in ((1 << 63), (1 << 63) | 1, 1, 1 << 62, 1 << cbits | 1 << 8):
            bad = array("Q", words)
            bad[rng.randrange(n)] = odd
            assert data_hosts(bad, cbits) is None, hex(odd)


@pytest.mark.parametrize("cbits", [9, 16])
def test_plain_clusters_of_a_full_table(cbits):
    """Every entry has a host cluster (nothing to leave out): the same clusters,
    as a list, and COPIED found as in a table with holes."""
    rng = random.Random(cbits + 1)
    for copied in (True, False):
        ks = [rng.randrange(1, 1 << 20) for _ in range(512)]
        words = array("Q", [(copied << 63) | k << cbits for k in ks])
        assert plain_clusters(words, cbits) == (ks, copied)
        words[7] &= ~(1 << 63) if copied else ~0
        if copied:
            assert plain_clusters(words, cbits) == (ks, False)


@pytest.mark.parametrize("code", ["B", "H", "I", "Q"])
def test_count_run_and_count_each(code):
    """A run of clusters with no reference yet is counted at once; one with a
    reference already, or past the limit, is left alone (nothing changed) and
    counted one by one, which also counts duplicates and undoes an overflow."""
    from imagetools.formats.qcow2.check import _count_each, _count_run
    counts = array(code, [1, 0, 0, 0, 0, 2, 0, 0])
    assert _count_run(counts, 1, 4, 8)
    assert list(counts) == [1, 1, 1, 1, 1, 2, 0, 0]
    for first, n in ((4, 3), (6, 3)):        # a counted cluster in it; past the limit
        before = array(code, counts)
        assert not _count_run(counts, first, n, 8)
        assert counts == before
    assert _count_each(counts, [6, 7, 6, 0], 8)
    assert list(counts) == [2, 1, 1, 1, 1, 2, 2, 1]
    before = array(code, counts)
    assert not _count_each(counts, [6, 7, 8], 8)     # 8 is past the limit: undone
    assert counts == before
    if code == "B":
        counts[3] = 254
        assert not _count_each(counts, [2, 3, 1, 3], 8)   # 3 would reach 256: undone
        assert list(counts) == [2, 1, 1, 254, 1, 2, 2, 1]


@pytest.mark.parametrize("bits", [8, 16, 64])
def test_contiguous_tables_shared_with_a_snapshot(qemu_img, qemu_io, qimg, tmp_path, bits,
                                                  monkeypatch):
    """Tables of contiguous clusters are counted a run at a time; the same
    tables again for a snapshot (their clusters counted already) one by one,
    and a file cut inside the last run leaves that table to the entry walk."""
    from imagetools.formats.qcow2 import check
    from imagetools.image import open_image
    path = make(qemu_img, qemu_io, tmp_path / "run.qcow2", "8M",
                f"cluster_size=4k,refcount_bits={bits}", "write -P 1 0 3M")
    same_check(qemu_img, qimg, path)
    run(qemu_img, "snapshot", "-c", "one", path)
    run(qemu_io, "-f", "qcow2", "-c", "write -P 2 1M 64k", "-c", "write -P 3 5M 1M", path)
    same_check(qemu_img, qimg, path)
    outcomes = []
    real = check._count_run
    monkeypatch.setattr(check, "_count_run", lambda *a: outcomes.append(real(*a)) or outcomes[-1])
    with open_image(path) as drv:
        drv.check()
    assert True in outcomes and False in outcomes        # both ways were taken
    os.truncate(path, os.path.getsize(path) - 3 * 4096)
    same_check(qemu_img, qimg, path)
