"""qimg resize against qemu-img 7.2: same output, same resulting images.

Both tools resize copies of the same images (``pair``); their stdout,
stderr and exit codes must be identical, and the real qemu-img must then
report the same map (so layout and allocation agree), the same check result
and the same guest content for both copies.
"""

from __future__ import annotations

import struct

import pytest
from snap_helpers import guest_bytes, qemu_check

pytestmark = pytest.mark.oracle


def _same_images(pair, *names: str, fmt: str = "qcow2") -> None:
    for name in names:
        pair.judged_same("map", "-f", fmt, "--output=json", name)
        if fmt == "qcow2":
            pair.judged_same("check", name)
            qemu_check(pair.ours.qemu_img, pair.ours.path(name))
        assert guest_bytes(pair.ref.qemu_img, pair.ref.path(name), pair.ref.dir, fmt=fmt) == \
            guest_bytes(pair.ours.qemu_img, pair.ours.path(name), pair.ours.dir, fmt=fmt)


def test_transcript_session(pair):
    pair.setup("image", "r.raw", "raw", "1M")
    pair.setup("image", "q.qcow2", "qcow2", "8M", "write -P 1 0 1M", "write -P 2 7M 1M")
    steps = ["r.raw 16M", "-f raw r.raw 16M", "-f raw r.raw 4M", "-f raw --shrink r.raw 4M",
             "q.qcow2 +8M", "q.qcow2 4M", "q.qcow2 -- -12M", "--shrink q.qcow2 4M",
             "q.qcow2 20000000", "-f raw r.raw 5000001", "-q q.qcow2 10M",
             "--preallocation=full q.qcow2 12M", "q.qcow2 -- -100M", "q.qcow2 abc",
             "nonexist.qcow2 1M", "q.qcow2", "q.qcow2 16E", "q.qcow2 8E", "q.qcow2 +0",
             "--preallocation=metadata -f raw r.raw 8M", "--preallocation=bogus q.qcow2 1G",
             "--preallocation=full q.qcow2 12M", "--preallocation=falloc -f raw r.raw 6M",
             "--preallocation=full -f raw r.raw 7M", "--shrink --preallocation=off q.qcow2 1M",
             "--image-opts driver=qcow2,file.filename=q.qcow2 3M", "-U q.qcow2 4M",
             "-f vmdk q.qcow2 1M"]
    for step in steps:
        pair.same("resize", *step.split())
    _same_images(pair, "q.qcow2")
    _same_images(pair, "r.raw", fmt="raw")
    assert pair.ref.path("r.raw").stat().st_size == pair.ours.path("r.raw").stat().st_size


@pytest.mark.parametrize("opts,steps", [
    ("cluster_size=512", ["--shrink x.qcow2 64k", "x.qcow2 3M", "--shrink x.qcow2 1000k"]),
    ("cluster_size=4k", ["x.qcow2 100M", "--shrink x.qcow2 300k", "x.qcow2 2M"]),
    ("compat=0.10", ["x.qcow2 16M", "--shrink x.qcow2 512k"]),
    ("extended_l2=on", ["x.qcow2 9M", "--shrink x.qcow2 3M"]),
    ("refcount_bits=1,cluster_size=1k", ["--shrink x.qcow2 200k", "x.qcow2 4M"]),
])
def test_grow_and_shrink(pair, opts, steps):
    """Shrinking drops clusters, L2 tables and refcount blocks as QEMU does."""
    pair.setup("image", "x.qcow2", "qcow2", "2M", "write -P 5 0 1900k", "write -z 50k 10k",
               opts=opts)
    for step in steps:
        pair.same("resize", *step.split())
        _same_images(pair, "x.qcow2")
        # qemu-img's discard first allocates L2 tables for unallocated parts
        # (then frees them), so its file can end on a cluster boundary where
        # qimg's ends inside the L1 table's last cluster
        cs = 512 if "cluster_size=512" in opts else 1024 if "=1k" in opts else 4096
        assert -(-pair.ref.path("x.qcow2").stat().st_size // cs) == \
            -(-pair.ours.path("x.qcow2").stat().st_size // cs)


@pytest.mark.parametrize("old,new,mode", [
    ("1M", "2M", "metadata"), ("1M", "2200k", "metadata"), ("1M", "2M", "falloc"),
    ("1M", "1200k", "full"), ("1000k", "3M", "full"), ("1000k", "2M", "metadata"),
])
def test_preallocation(pair, old, new, mode):
    pair.setup("image", "p.qcow2", "qcow2", old, "write -P 1 0 64k")
    pair.same("resize", f"--preallocation={mode}", "p.qcow2", new)
    _same_images(pair, "p.qcow2")


def test_overlay_over_a_larger_backing_file(pair):
    """The grown part must read as zeros, not as the backing file (v3: zero
    clusters; v2 cannot and fails as in QEMU)."""
    pair.setup("image", "b.qcow2", "qcow2", "8M", "write -P 0x11 0 8M")
    pair.setup("image", "v3.qcow2", "qcow2", "4M", backing=("b.qcow2", "qcow2"))
    pair.setup("image", "v2.qcow2", "qcow2", "4M", opts="compat=0.10",
               backing=("b.qcow2", "qcow2"))
    pair.setup("image", "odd.qcow2", "qcow2", "4000k", backing=("b.qcow2", "qcow2"))
    pair.same("resize", "v3.qcow2", "6000k")
    pair.same("resize", "v2.qcow2", "6M")
    pair.same("resize", "odd.qcow2", "5M")
    _same_images(pair, "v3.qcow2", "v2.qcow2", "odd.qcow2")
    data = guest_bytes(pair.ours.qemu_img, pair.ours.path("odd.qcow2"), pair.ours.dir)
    assert data[4000 << 10:] == bytes(len(data) - (4000 << 10))


def test_snapshots_and_resize(pair):
    """Grow and shrink with an internal snapshot, then apply it back (its
    size returns); either tool does each step."""
    pair.setup("image", "s.qcow2", "qcow2", "4M", "write -P 3 0 4M", opts="cluster_size=4k")
    pair.setup("ok", "snapshot", "-c", "four", "s.qcow2")
    pair.same("resize", "s.qcow2", "16M")
    pair.setup("io", "qcow2", "s.qcow2", "write -P 4 10M 1M")
    pair.same("resize", "--shrink", "s.qcow2", "2M")
    _same_images(pair, "s.qcow2")
    pair.same("snapshot", "-a", "four", "s.qcow2")
    pair.judged_same("info", "--output=json", "s.qcow2", ignore=("actual-size", "date-sec",
                                                                  "date-nsec"))
    qemu_check(pair.ours.qemu_img, pair.ours.path("s.qcow2"))
    assert guest_bytes(pair.ours.qemu_img, pair.ours.path("s.qcow2"), pair.ours.dir) == \
        b"\x03" * (4 << 20)


def test_apply_snapshot_of_another_size_made_by_qemu(tools):
    img = tools.image("g.qcow2", "qcow2", "1M", "write -P 7 0 1M")
    tools.ref("snapshot", "-c", "small", img)
    tools.ref("resize", img, "8M")
    tools.io("qcow2", img, "write -P 8 0 8M")
    assert tools.ours("snapshot", "-a", "small", img).rc == 0
    qemu_check(tools.qemu_img, tools.path(img))
    assert guest_bytes(tools.qemu_img, tools.path(img), tools.dir) == b"\x07" * (1 << 20)


def test_external_data_file(pair):
    pair.setup("image", "d.qcow2", "qcow2", "1M", opts="data_file=d.raw")
    for step in (["d.qcow2", "2M"], ["--shrink", "d.qcow2", "1M"],
                 ["--preallocation=full", "d.qcow2", "3M"]):
        pair.same("resize", *step)
        assert pair.ref.path("d.raw").stat().st_size == pair.ours.path("d.raw").stat().st_size
    _same_images(pair, "d.qcow2")


def _bitmap_bits(path: str) -> dict[str, bytes]:
    """Each persistent bitmap's stored bits, read by the spec (the oracle of
    the layout is qemu-img, which must accept the image; see the caller)."""
    with open(path, "rb") as f:
        data = f.read()
    cluster_bits = struct.unpack_from(">I", data, 20)[0]
    cs = 1 << cluster_bits
    pos, out = 112, {}
    while True:
        kind, length = struct.unpack_from(">II", data, pos)
        if kind == 0:
            break
        if kind == 0x23852875:
            nb, _, _, dir_offset = struct.unpack_from(">IIQQ", data, pos + 8)
            at = dir_offset
            for _ in range(nb):
                table, size, _, _, _, name_len, extra = struct.unpack_from(">QIIBBHI", data, at)
                name = data[at + 24 + extra:at + 24 + extra + name_len].decode()
                bits = b""
                for i in range(size):
                    entry = struct.unpack_from(">Q", data, table + 8 * i)[0]
                    off = entry & 0x00FFFFFFFFFFFE00
                    bits += data[off:off + cs] if off else (b"\xff" if entry & 1 else b"\0") * cs
                out[name] = bits
                at = (at + 24 + extra + name_len + 7) & ~7
        pos += 8 + ((length + 7) & ~7)
    return out


@pytest.mark.parametrize("size", ["100G", "512k", "1536k", "+1M"])
def test_persistent_bitmaps_follow_the_size(pair, size):
    pair.setup("image", "b.qcow2", "qcow2", "1M")
    pair.setup("ok", "bitmap", "--add", "b.qcow2", "b0")
    pair.setup("ok", "bitmap", "--add", "-g", "512", "b.qcow2", "fine")
    pair.setup("io", "qcow2", "b.qcow2", "write 0 1M")
    pair.same("resize", "--shrink", "b.qcow2", size)
    for side in (pair.ref, pair.ours):
        side.ok("bitmap", "--enable", "b.qcow2", "fine")     # QEMU must load them
    assert _bitmap_bits(str(pair.ref.path("b.qcow2"))) == \
        _bitmap_bits(str(pair.ours.path("b.qcow2")))
    pair.judged_same("check", "b.qcow2")
