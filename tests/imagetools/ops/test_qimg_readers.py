"""The read-only commands against qemu-img on images QEMU wrote:
info, map, check, compare, snapshot -l, measure (same stdout, stderr, exit).

The images are made once per module by qemu-img and qemu-io, with data,
zero writes and discards at odd offsets, backing chains, compressed and
extended-L2 clusters, internal snapshots and damage patched in by hand.
"""

from __future__ import annotations

import struct

import pytest

pytestmark = [pytest.mark.oracle]


def _patch(path, offset: int, fmt: str, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def _read(path, offset: int, fmt: str) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


@pytest.fixture(scope="module")
def ws(shared_tools):
    t = shared_tools
    t.image("r.raw", "raw", "64M", "write -P 0x11 0 1M")
    t.image("sparse.raw", "raw", "4M", "write -P 0x22 1M 64k")
    t.image("q.qcow2", "qcow2", "64M")
    t.image("base.qcow2", "qcow2", "8M", "write -P 0xaa 0 256k", "write -P 0xbb 1M 64k")
    t.image("top.qcow2", "qcow2", "8M", "write -P 0xcc 128k 64k", "write -z 1M 64k",
            "write -z 2M 64k", "write -P 0xdd 4M 128k", backing=("base.qcow2", "qcow2"))
    t.image("mid.qcow2", "qcow2", "8M", "write -P 0x01 3M 64k", backing=("base.qcow2", "qcow2"))
    t.image("top3.qcow2", "qcow2", "8M", "write -P 0x02 5M 4k", "discard 1M 64k",
            backing=("mid.qcow2", "qcow2"))
    t.image("odd.qcow2", "qcow2", "3M", "write -P 0x31 1000 3000", "write -z 65000 70000",
            "write -P 0x32 2000000 100000", "discard 2040000 5000")
    t.image("v2.qcow2", "qcow2", "2M", "write -z 0 64k", "write -P 0x44 64k 64k",
            opts="compat=0.10")
    t.image("small.qcow2", "qcow2", "4M", "write -P 0x45 0 10k", "write -z 100k 20k",
            opts="cluster_size=4096,refcount_bits=1,lazy_refcounts=on")
    t.image("el2.qcow2", "qcow2", "4M", "write -P 0x55 100k 5000", "write -z 1M 300k",
            "write -P 0x56 2M 64k", opts="extended_l2=on,cluster_size=128k")
    t.image("zx.qcow2", "qcow2", "4M", "write -P 0x57 0 100k",
            opts="compression_type=zstd,extended_l2=on")
    t.image("pm.qcow2", "qcow2", "1M", opts="preallocation=metadata")
    t.image("ext.qcow2", "qcow2", "4M", "write -P 0x58 64k 64k",
            opts="data_file=ext.data,data_file_raw=on")
    t.image("snap.qcow2", "qcow2", "4M", "write -P 0x01 0 64k")
    t.ok("snapshot", "-c", "first", "snap.qcow2")
    t.io("qcow2", "snap.qcow2", "write -P 0x02 0 64k")
    t.ok("snapshot", "-c", "a-very-long-snapshot-name-exceeding-the-column", "snap.qcow2")
    t.ok("convert", "-c", "-O", "qcow2", "base.qcow2", "comp.qcow2")
    t.ok("convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", "base.qcow2",
         "compz.qcow2")
    t.image("frag.qcow2", "qcow2", "4M", *[f"write -P {i} {(i * 7 % 64) * 65536} 64k"
                                            for i in range(1, 40, 3)])
    # damage: a leaked cluster, a refcount of 0, an L2 entry past EOF, a dirty bit
    t.image("clean.qcow2", "qcow2", "64M", "write -P 0xaa 0 64k", "write -P 0xbb 64k 64k")
    for name in ("leak", "c1", "c2", "c3"):
        t.ok("convert", "-O", "qcow2", "clean.qcow2", f"{name}.qcow2")
    l1 = _read(t.path("leak.qcow2"), 40, ">Q")
    l2 = _read(t.path("leak.qcow2"), l1, ">Q") & 0x00FFFFFFFFFFFE00
    _patch(t.path("leak.qcow2"), l2 + 8, ">Q", 0)
    rt = _read(t.path("c1.qcow2"), 48, ">Q")
    rb = _read(t.path("c1.qcow2"), rt, ">Q")
    data = _read(t.path("c1.qcow2"), l2, ">Q") & 0x00FFFFFFFFFFFE00
    _patch(t.path("c1.qcow2"), rb + 2 * (data // 65536), ">H", 0)
    _patch(t.path("c2.qcow2"), l2 + 8, ">Q", 0x8000000001000000)
    _patch(t.path("c3.qcow2"), l2 + 8, ">Q", 0x8000000000060200)
    t.image("dirty.qcow2", "qcow2", "64M", opts="cluster_size=4096,lazy_refcounts=on")
    _patch(t.path("dirty.qcow2"), 72, ">Q", 1)
    t.image("corrupt.qcow2", "qcow2", "64M")
    _patch(t.path("corrupt.qcow2"), 72, ">Q", 2)
    t.image("orphan.qcow2", "qcow2", "64M")
    t.ok("rebase", "-u", "-b", "gone.qcow2", "-F", "qcow2", "orphan.qcow2")
    t.path("sub").mkdir()
    t.image("sub/b.qcow2", "qcow2", "1M")
    t.image("sub/t.qcow2", "qcow2", "1M", backing=("b.qcow2", "qcow2"))
    t.path("text.img").write_text("hello world, this is not an image\n")
    t.path('we"ird\\name.qcow2').write_bytes(t.path("q.qcow2").read_bytes())
    t.path("sp\u00e9c").write_bytes(t.path("small.qcow2").read_bytes())
    t.image("a.qcow2", "qcow2", "8M", "write -P 0xaa 0 1M")
    t.ok("convert", "-O", "raw", "a.qcow2", "a.raw")
    t.ok("convert", "-O", "qcow2", "a.qcow2", "b.qcow2")
    t.io("qcow2", "b.qcow2", "write -P 0x01 1048581 1")
    t.ok("convert", "-O", "qcow2", "a.qcow2", "c.qcow2")
    t.io("qcow2", "c.qcow2", "write -P 0x00 1000 1")
    t.image("big.qcow2", "qcow2", "16M", "write -P 0xaa 0 1M")
    t.ok("convert", "-O", "qcow2", "big.qcow2", "big2.qcow2")
    t.io("qcow2", "big2.qcow2", "write -P 0x01 12M 512")
    t.ok("convert", "-O", "qcow2", "big.qcow2", "big3.qcow2")
    t.io("qcow2", "big3.qcow2", "write -P 0x01 12583900 1")
    t.ok("convert", "-O", "qcow2", "a.qcow2", "zeros.qcow2")
    t.io("qcow2", "zeros.qcow2", "write -P 0 2M 64k")
    return t


IMAGES = ["r.raw", "sparse.raw", "q.qcow2", "base.qcow2", "top.qcow2", "top3.qcow2", "odd.qcow2",
          "v2.qcow2", "small.qcow2", "el2.qcow2", "zx.qcow2", "pm.qcow2", "ext.qcow2",
          "snap.qcow2", "comp.qcow2", "compz.qcow2", "frag.qcow2", "clean.qcow2", "leak.qcow2",
          "c1.qcow2", "c2.qcow2", "c3.qcow2", "dirty.qcow2", "corrupt.qcow2", "orphan.qcow2",
          "sub/t.qcow2", "text.img", 'we"ird\\name.qcow2', "sp\u00e9c"]


@pytest.mark.parametrize("image", IMAGES)
@pytest.mark.parametrize("cmd", [("info",), ("info", "--output=json"),
                                 ("info", "--backing-chain"),
                                 ("info", "--backing-chain", "--output=json"), ("info", "-U")])
def test_info(ws, cmd, image) -> None:
    ws.same(*cmd, image)


@pytest.mark.parametrize("image", IMAGES)
@pytest.mark.parametrize("cmd", [("map",), ("map", "--output=json")])
def test_map(ws, cmd, image) -> None:
    ws.same(*cmd, image)


@pytest.mark.parametrize("argv", [
    ("map", "--output=json", "--start-offset=100k", "--max-length=1M", "top.qcow2"),
    ("map", "--output=json", "--start-offset=1000", "--max-length=100", "odd.qcow2"),
    ("map", "--output=json", "--start-offset=9M", "top.qcow2"),
    ("map", "--output=json", "--max-length=0", "top.qcow2"),
    ("map", "--start-offset=64k", "top3.qcow2"),
    ("map", "--output=json", "-f", "raw", "top.qcow2"),
    ("map", "-f", "raw", "sparse.raw"),
    ("info", "-f", "raw", "q.qcow2"), ("info", "--output=json", "-f", "raw", "q.qcow2"),
    ("info", "-f", "qcow2", "text.img"), ("info", "-f", "qcow2", "r.raw"),
    ("info", "--image-opts", "driver=qcow2,file.filename=top.qcow2"),
])
def test_map_and_info_options(ws, argv) -> None:
    ws.same(*argv)


@pytest.mark.parametrize("image", [i for i in IMAGES if i not in ("r.raw", "sparse.raw", "text.img")]
                         + ["r.raw"])
@pytest.mark.parametrize("cmd", [("check",), ("check", "--output=json"), ("check", "-q")])
def test_check(ws, cmd, image) -> None:
    ws.same(*cmd, image)


@pytest.mark.parametrize("argv", [
    ("a.qcow2", "a.raw"), ("-q", "a.qcow2", "a.raw"), ("a.qcow2", "b.qcow2"),
    ("-q", "a.qcow2", "b.qcow2"), ("a.qcow2", "c.qcow2"), ("a.qcow2", "big.qcow2"),
    ("big.qcow2", "a.qcow2"), ("a.qcow2", "big2.qcow2"), ("big2.qcow2", "a.qcow2"),
    ("a.qcow2", "big3.qcow2"), ("-s", "a.qcow2", "big.qcow2"), ("-s", "a.qcow2", "zeros.qcow2"),
    ("a.qcow2", "zeros.qcow2"), ("-s", "a.qcow2", "a.raw"), ("-p", "a.qcow2", "a.raw"),
    ("-p", "a.qcow2", "big2.qcow2"), ("-p", "top.qcow2", "base.qcow2"),
    ("-f", "raw", "-F", "qcow2", "a.raw", "a.qcow2"), ("-f", "qcow2", "-F", "qcow2", "a.raw", "a.qcow2"),
    ("top.qcow2", "top3.qcow2"), ("comp.qcow2", "base.qcow2"), ("compz.qcow2", "comp.qcow2"),
    ("-s", "comp.qcow2", "base.qcow2"), ("el2.qcow2", "el2.qcow2"), ("odd.qcow2", "odd.qcow2"),
    ("-s", "top.qcow2", "top.qcow2"), ("snap.qcow2", "a.qcow2"), ("ext.qcow2", "ext.qcow2"),
    ("pm.qcow2", "q.qcow2"), ("-s", "pm.qcow2", "q.qcow2"),
])
def test_compare(ws, argv) -> None:
    ws.same("compare", *argv)


@pytest.mark.parametrize("argv", [("-l", "snap.qcow2"), ("-l", "q.qcow2"), ("-l", "r.raw"),
                                  ("-l", "-U", "snap.qcow2"), ("snap.qcow2",),
                                  ("-l", "--image-opts", "driver=raw,file.filename=r.raw")])
def test_snapshot_list(ws, argv) -> None:
    ws.same("snapshot", *argv)


def test_snapshot_table_is_local_time(ws) -> None:
    import os
    import subprocess
    env = dict(os.environ, TZ="America/New_York", LC_ALL="C")
    ref = subprocess.run([ws.qemu_img, "snapshot", "-l", "snap.qcow2"], cwd=ws.dir, env=env,
                         capture_output=True, timeout=60)
    ours = subprocess.run([ws.qimg, "snapshot", "-l", "snap.qcow2"], cwd=ws.dir, env=env,
                          capture_output=True, timeout=60)
    assert (ours.returncode, ours.stdout, ours.stderr) == (ref.returncode, ref.stdout, ref.stderr)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("argv", [("info", "c.qcow2"), ("info", "--backing-chain", "c.qcow2"),
                                  ("map", "c.qcow2"), ("check", "c.qcow2"),
                                  ("compare", "c.qcow2", "c.qcow2"),
                                  ("convert", "-O", "raw", "c.qcow2", "x.raw")])
def test_backing_loops_are_one_clear_error(tools, argv) -> None:
    # qemu-img recurses until it runs out of file descriptors (check: memory)
    tools.image("a.qcow2", "qcow2", "1M")
    tools.image("b.qcow2", "qcow2", "1M", backing=("a.qcow2", "qcow2"))
    tools.ok("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2")
    tools.ok("create", "-q", "-f", "qcow2", "-u", "-b", "b.qcow2", "-F", "qcow2", "c.qcow2", "1M")
    run = tools.ours(*argv, timeout=30)
    if argv == ("info", "c.qcow2"):
        assert run.rc == 0
        return
    assert run.rc == (2 if argv[0] == "compare" else 1)
    assert run.err.decode().splitlines() == [
        "qemu-img: Could not open 'c.qcow2': Backing file 'b.qcow2' creates an infinite loop."
        if argv[1] != "--backing-chain" else
        "qemu-img: Backing file 'b.qcow2' creates an infinite loop."]
