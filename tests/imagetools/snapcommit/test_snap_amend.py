"""qimg amend against qemu-img 7.2: same output, same images afterwards.

Each case runs the same amend sequence with both tools on copies of the
same images; stdout (progress included), stderr and exit codes must be
identical, and qemu-img must then report the same info, map and check for
both copies, and the same guest data (also of internal snapshots).
"""

from __future__ import annotations

import pytest
from snap_helpers import guest_bytes, qemu_check

pytestmark = pytest.mark.oracle


def _agree(pair, name: str, snapshots=()) -> None:
    pair.judged_same("info", "--output=json", name,
                     ignore=("actual-size", "date-sec", "date-nsec"))
    pair.judged_same("map", "--output=json", name)
    pair.judged_same("check", name)
    qemu_check(pair.ours.qemu_img, pair.ours.path(name))
    for snap in (None, *snapshots):
        assert guest_bytes(pair.ref.qemu_img, pair.ref.path(name), pair.ref.dir,
                           snapshot=snap) == \
            guest_bytes(pair.ours.qemu_img, pair.ours.path(name), pair.ours.dir,
                        snapshot=snap)


def test_transcript_session(pair):
    pair.setup("image", "a.qcow2", "qcow2", "8M", "write -P 1 0 1M", "write -z 2M 64k")
    pair.setup("image", "r.raw", "raw", "1M")
    pair.setup("image", "top.qcow2", "qcow2", "8M", backing=("a.qcow2", "qcow2"))
    for step in ["compat=0.10", "compat=1.1", "lazy_refcounts=on", "compat=0.10", "compat=1.1",
                 "compat=0.10,lazy_refcounts=on", "cluster_size=4096",
                 "compression_type=zstd", "size=16M", "foo=bar", "help", "compat=v9",
                 "refcount_bits=3", "refcount_bits=64", "lazy_refcounts=maybe", "size=abc",
                 "refcount_bits=16,compat=0.10", "data_file=x", "data_file_raw=on",
                 "data_file_raw=off", "encrypt.keyslot=1", "compat=1.1,lazy_refcounts=on",
                 "lazy_refcounts=off", "size=4M"]:
        pair.same("amend", "-o", step, "a.qcow2")
        _agree(pair, "a.qcow2")
    for args in [("-p", "-o", "refcount_bits=4", "a.qcow2"),
                 ("-p", "-o", "refcount_bits=2,compat=0.10", "a.qcow2"),
                 ("a.qcow2",), ("-f", "raw", "-o", "size=2M", "r.raw"),
                 ("-o", "backing_file=other.qcow2", "top.qcow2"),
                 ("-o", "backing_fmt=raw", "top.qcow2"), ("-o", "backing_file=a.qcow2", "top.qcow2"),
                 ("-o", "backing_file=a.qcow2,backing_fmt=qcow2", "top.qcow2"),
                 ("-f", "qcow2", "-o", "help"), ("-f", "raw", "-o", "help"),
                 ("-f", "foo", "-o", "help"), ("-o", "compat=1.1", "a.qcow2", "b.qcow2"),
                 ("-o", "compat=1.1", "-t", "bad", "a.qcow2"), ("-q", "-p", "-o", "size=8M",
                                                                  "a.qcow2")]:
        pair.same("amend", *args)
    _agree(pair, "a.qcow2")
    _agree(pair, "top.qcow2")


def _snapshot_image(pair, shared_zero: bool) -> None:
    pair.setup("image", "b.qcow2", "qcow2", "4M", "write -P 9 0 4M")
    pair.setup("image", "s.qcow2", "qcow2", "4M", "write -P 1 0 1M", "write -z 1M 128k",
               opts="cluster_size=4k", backing=("b.qcow2", "qcow2"))
    pair.setup("ok", "snapshot", "-c", "one", "s.qcow2")
    pair.setup("io", "qcow2", "s.qcow2", "write -P 2 2M 64k", "write -z 3M 64k",
               *(["write -z 0 64k"] if shared_zero else []))


@pytest.mark.parametrize("steps", [
    ["compat=0.10", "compat=1.1"],
    ["refcount_bits=1", "refcount_bits=64", "refcount_bits=16"],
    ["compat=0.10,refcount_bits=16", "compat=1.1,refcount_bits=8"],
])
def test_with_snapshots_zeros_and_backing(pair, steps):
    """Zero clusters over a backing file become zero data; snapshots keep
    their content; refcounts survive width changes (snapshots share clusters)."""
    _snapshot_image(pair, shared_zero=False)
    for step in steps:
        pair.same("amend", "-p", "-o", step, "s.qcow2")
        _agree(pair, "s.qcow2", snapshots=("one",))


def test_downgrade_keeps_snapshot_data(pair):
    """Zeroed after a snapshot, a cluster is a preallocated zero cluster the
    snapshot still reads data from. qemu-img 7.2 writes zeros into it in place
    (the snapshot loses its data and check then finds COPIED errors); qimg
    moves the zeros to a new cluster: same output, but nothing is lost."""
    _snapshot_image(pair, shared_zero=True)
    side = pair.ours
    before = {snap: guest_bytes(side.qemu_img, side.path("s.qcow2"), side.dir, snapshot=snap)
              for snap in (None, "one")}
    pair.same("amend", "-o", "compat=0.10", "s.qcow2")
    qemu_check(side.qemu_img, side.path("s.qcow2"))
    for snap, data in before.items():
        assert guest_bytes(side.qemu_img, side.path("s.qcow2"), side.dir,
                           snapshot=snap) == data


def test_refusals(pair):
    pair.setup("image", "x.qcow2", "qcow2", "1M", "write 0 64k", opts="extended_l2=on")
    pair.setup("image", "z.qcow2", "qcow2", "1M", "write -c 0 64k", opts="compression_type=zstd")
    pair.setup("image", "zz.qcow2", "qcow2", "1M", opts="compression_type=zstd")
    pair.setup("image", "d.qcow2", "qcow2", "1M", opts="data_file=d.raw")
    pair.setup("image", "s.qcow2", "qcow2", "1M", "write 0 64k")
    pair.setup("ok", "snapshot", "-c", "small", "s.qcow2")
    pair.setup("ok", "resize", "s.qcow2", "2M")
    pair.setup("image", "r.qcow2", "qcow2", "1M", "write 0 64k")
    pair.setup("ok", "snapshot", "-c", "a", "r.qcow2")
    pair.setup("ok", "snapshot", "-c", "b", "r.qcow2")
    for args in [("compat=0.10", "x.qcow2"), ("compat=0.10", "z.qcow2"),
                 ("compat=0.10", "zz.qcow2"), ("compat=0.10", "d.qcow2"),
                 ("data_file=e.raw", "d.qcow2"), ("compat=0.10", "s.qcow2"),
                 ("refcount_bits=1", "r.qcow2"), ("refcount_bits=2", "r.qcow2"),
                 ("compat=0.10,refcount_bits=16", "r.qcow2")]:
        pair.same("amend", "-o", args[0], args[1])
    for name in ("x.qcow2", "z.qcow2", "zz.qcow2", "s.qcow2", "r.qcow2"):
        _agree(pair, name)


def test_dirty_lazy_image_downgrade(pair):
    """Lazy refcounts on, then compat=0.10 drops them (the image is made clean first)."""
    pair.setup("image", "l.qcow2", "qcow2", "4M", "write -P 4 0 1M", opts="lazy_refcounts=on")
    pair.same("amend", "-o", "compat=0.10", "l.qcow2")
    _agree(pair, "l.qcow2")
