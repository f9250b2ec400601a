"""qimg snapshot -c / -a / -d against qemu-img 7.2: same output, and each
tool applies and deletes the snapshots the other one took.

Every step is judged by the real tools: ``qemu-img check`` must find the
image clean (no leaks either), ``qemu-img convert`` (with ``-l`` for a
snapshot) must give the expected guest content, and ``qemu-img snapshot -l``
the expected table.
"""

from __future__ import annotations

import pytest
from snap_helpers import guest_bytes, mask_dates, qemu_check, run, snapshot_names

pytestmark = pytest.mark.oracle


def test_cli_session_matches_qemu_img(pair):
    """The transcript's session, run by both tools in their own directory."""
    pair.setup("image", "s.qcow2", "qcow2", "64M", "write -P 0x01 0 64k")
    steps = [
        ("snapshot", "-l", "s.qcow2"),
        ("snapshot", "-c", "first", "s.qcow2"),
        ("snapshot", "-c", "second", "s.qcow2"),
        ("snapshot", "s.qcow2"),
        ("snapshot", "-c", "first", "s.qcow2"),
        ("snapshot", "-l", "s.qcow2"),
        ("snapshot", "-a", "first", "s.qcow2"),
        ("snapshot", "-a", "2", "s.qcow2"),
        ("snapshot", "-d", "3", "s.qcow2"),
        ("snapshot", "-d", "first", "s.qcow2"),
        ("snapshot", "-l", "s.qcow2"),
        ("snapshot", "-a", "nosuch", "s.qcow2"),
        ("snapshot", "-d", "nosuch", "s.qcow2"),
        ("snapshot", "-c", "second", "-a", "second", "s.qcow2"),
        ("snapshot", "-q", "-c", "third", "s.qcow2"),
        ("snapshot", "-U", "-c", "x", "s.qcow2"),
        ("snapshot", "-U", "-l", "s.qcow2"),
        ("snapshot", "-c", "", "s.qcow2"),
        ("snapshot", "-d", "", "s.qcow2"),
        ("snapshot", "-c", "x" * 300, "s.qcow2"),
        ("snapshot", "-l", "s.qcow2"),
        ("snapshot", "-c", "x", "nosuch.qcow2"),
    ]
    for step in steps:
        ref = pair.ref.ref(*step)
        ours = pair.ours.ours(*step)
        assert (ref.rc, mask_dates(ref.out), ref.err) == (ours.rc, mask_dates(ours.out), ours.err), \
            f"{' '.join(step)}:\n{ref.text()}\nvs\n{ours.text()}"
        qemu_check(pair.ours.qemu_img, pair.ours.path("s.qcow2"))
    assert snapshot_names(pair.ours.qemu_img, pair.ours.path("s.qcow2")) == \
        snapshot_names(pair.ref.qemu_img, pair.ref.path("s.qcow2"))
    assert guest_bytes(pair.ours.qemu_img, pair.ours.path("s.qcow2"), pair.ours.dir) == \
        guest_bytes(pair.ref.qemu_img, pair.ref.path("s.qcow2"), pair.ref.dir)


VARIANTS = {
    "default": ("64M", ""),
    "c512-many-l2": ("1M", "cluster_size=512"),
    "v2": ("8M", "compat=0.10"),
    "lazy": ("8M", "lazy_refcounts=on"),
    "extl2": ("8M", "extended_l2=on,cluster_size=32k"),
    "refbits4": ("8M", "refcount_bits=4"),
    "refbits64-c4k": ("8M", "refcount_bits=64,cluster_size=4k"),
}


def _fill(tools, name: str, size: str, round_: int) -> None:
    """Data, zeros and compressed clusters at places that move with ``round_``."""
    k = round_ * 3
    cmds = [f"write -P {0x10 + round_} {k}k 20k", f"write -z {64 + k}k 8k",
            f"write -P {0x30 + round_} 200k 100k"]
    if size != "1M":
        cmds.append(f"write -c -P {0x50 + round_} {1024 + 64 * round_}k 64k")
    tools.io("qcow2", name, *cmds)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_snapshots_cross_tool(tools, variant):
    """qimg and qemu-img take turns: each applies and deletes the other's snapshots."""
    size, opts = VARIANTS[variant]
    img = tools.image("x.qcow2", "qcow2", size, opts=opts or None)
    qemu, qimg = tools.ref, tools.ours
    states = {}

    def content() -> bytes:
        return guest_bytes(tools.qemu_img, tools.path(img), tools.dir)

    def snap(tool, name: str) -> None:
        run_ = tool("snapshot", "-c", name, img)
        assert run_.rc == 0, run_.text()
        states[name] = content()
        qemu_check(tools.qemu_img, tools.path(img))

    _fill(tools, img, size, 0)
    snap(qimg, "a")                       # qimg takes, then writes over it
    _fill(tools, img, size, 1)
    snap(qemu, "b")
    _fill(tools, img, size, 2)
    snap(qimg, "c")
    _fill(tools, img, size, 3)
    for tool, name in ((qemu, "a"), (qimg, "b"), (qimg, "a"), (qemu, "c"), (qimg, "c")):
        run_ = tool("snapshot", "-a", name, img)
        assert run_.rc == 0, run_.text()
        qemu_check(tools.qemu_img, tools.path(img))
        assert content() == states[name], f"content after -a {name}"
        _fill(tools, img, size, 4)
    for name in states:                   # every snapshot still reads as taken
        assert guest_bytes(tools.qemu_img, tools.path(img), tools.dir, snapshot=name) == \
            states[name]
    for tool, name in ((qimg, "b"), (qemu, "a"), (qimg, "c")):
        run_ = tool("snapshot", "-d", name, img)
        assert run_.rc == 0, run_.text()
        qemu_check(tools.qemu_img, tools.path(img))
    assert snapshot_names(tools.qemu_img, tools.path(img)) == []
    # nothing is left behind: every cluster is used by the active image only
    info = qemu_check(tools.qemu_img, tools.path(img))
    assert info.get("leaks", 0) == 0


def test_ids_continue_after_the_highest(tools):
    img = tools.image("x.qcow2", "qcow2", "1M")
    for name in ("a", "b", "c"):
        tools.ref("snapshot", "-c", name, img)
    tools.ref("snapshot", "-d", "b", img)
    tools.ref("snapshot", "-d", "c", img)
    assert tools.ours("snapshot", "-c", "d", img).rc == 0
    assert snapshot_names(tools.qemu_img, tools.path(img)) == [("1", "a"), ("2", "d")]


def test_table_larger_than_a_cluster(pair):
    """16 snapshots with long names on 512-byte clusters: a multi-cluster table."""
    pair.setup("image", "t.qcow2", "qcow2", "256k", "write -P 7 0 256k",
               opts="cluster_size=512")
    for i in range(16):
        name = f"snapshot-{i:02d}-" + "n" * 40
        pair.same("snapshot", "-c", name, "t.qcow2")
    for i in range(0, 16, 3):
        pair.same("snapshot", "-d", f"snapshot-{i:02d}-" + "n" * 40, "t.qcow2")
    pair.same("snapshot", "-a", "snapshot-20-" + "n" * 40, "t.qcow2")
    qemu_check(pair.ours.qemu_img, pair.ours.path("t.qcow2"))
    ref = pair.ref.ref("snapshot", "-l", "t.qcow2")
    ours = pair.ours.ref("snapshot", "-l", "t.qcow2")
    assert mask_dates(ref.out) == mask_dates(ours.out)


def test_refusals_match_qemu_img(pair):
    """External data file, bitmaps, 1-bit refcounts, raw images, -U."""
    pair.setup("image", "df.qcow2", "qcow2", "1M", opts="data_file=df.raw")
    pair.setup("image", "bm.qcow2", "qcow2", "1M")
    pair.setup("ok", "snapshot", "-c", "s", "bm.qcow2")
    pair.setup("ok", "bitmap", "--add", "bm.qcow2", "b0")
    pair.setup("image", "r1.qcow2", "qcow2", "1M", "write 0 64k", opts="refcount_bits=1")
    pair.setup("image", "r.raw", "raw", "1M")
    for step in [("snapshot", "-c", "x", "df.qcow2"), ("snapshot", "-a", "x", "df.qcow2"),
                 ("snapshot", "-d", "x", "df.qcow2"), ("snapshot", "-l", "df.qcow2"),
                 ("snapshot", "-a", "s", "bm.qcow2"), ("snapshot", "-c", "t", "bm.qcow2"),
                 ("snapshot", "-d", "t", "bm.qcow2"),
                 ("snapshot", "-c", "x", "r.raw"), ("snapshot", "-a", "x", "r.raw"),
                 ("snapshot", "-d", "x", "r.raw"), ("snapshot", "-l", "r.raw"),
                 ("snapshot", "-l", "--image-opts", "driver=raw,file.filename=r.raw"),
                 ("snapshot", "-c", "x", "-f", "raw", "r.raw")]:
        pair.same(*step)
    ref = pair.ref.ref("snapshot", "-c", "x", "r1.qcow2")
    ours = pair.ours.ours("snapshot", "-c", "x", "r1.qcow2")
    assert (ref.rc, ref.out, ref.err) == (ours.rc, ours.out, ours.err)
    # qemu-img leaks the L1 copy it allocated before failing; qimg leaves nothing
    qemu_check(pair.ours.qemu_img, pair.ours.path("r1.qcow2"))


def test_snapshot_of_qemu_written_compressed_and_zero_clusters(tools):
    """Compressed clusters are shared by refcount ranges, never COPIED."""
    img = tools.image("z.qcow2", "qcow2", "4M", "write -c -P 1 0 1M", "write -z 1M 1M",
                      "write -P 2 2M 64k", opts="cluster_size=4k")
    before = guest_bytes(tools.qemu_img, tools.path(img), tools.dir)
    assert tools.ours("snapshot", "-c", "s", img).rc == 0
    qemu_check(tools.qemu_img, tools.path(img))
    tools.io("qcow2", img, "write -P 9 0 2M", "discard 2M 64k")
    qemu_check(tools.qemu_img, tools.path(img))
    assert tools.ours("snapshot", "-a", "s", img).rc == 0
    qemu_check(tools.qemu_img, tools.path(img))
    assert guest_bytes(tools.qemu_img, tools.path(img), tools.dir) == before
    assert tools.ours("snapshot", "-d", "s", img).rc == 0
    assert qemu_check(tools.qemu_img, tools.path(img)).get("leaks", 0) == 0
    run(tools.qemu_img, "compare", "-U", img, img, cwd=tools.dir)


def test_listing_pads_multibyte_names_by_bytes(pair):
    """qemu-img pads the ID and TAG columns with printf, which counts bytes:
    a UTF-8 name of N characters and M > N bytes takes M columns."""
    pair.setup("image", "u.qcow2", "qcow2", "1M", "write -P 3 0 4k")
    names = ["äöü", "日本語のスナップ", "naïve-ünïcödé-näme", "x", "€" * 6]
    for name in names:
        pair.same("snapshot", "-c", name, "u.qcow2")
    for step in (("snapshot", "-l", "u.qcow2"), ("info", "u.qcow2")):
        ref = pair.ref.ref(*step)
        ours = pair.ours.ours(*step)
        assert ref.rc == ours.rc == 0
        assert mask_dates(ours.out) == mask_dates(ref.out), f"{ref.text()}\nvs\n{ours.text()}"
    assert "日本語のスナップ".encode() in pair.ours.ours("snapshot", "-l", "u.qcow2").out
