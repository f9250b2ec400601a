"""qimg commit against qemu-img 7.2, through chains up to 4 deep.

The same chain is built twice (``pair``) and committed by each tool; the
output must be identical (progress records aside, whose count depends on
qemu-img's event loop), and the real qemu-img must then find the same map,
the same check result and the same guest content in every image of both
chains -- and the top image must still show what it showed before.
"""

from __future__ import annotations

import re

import pytest
from snap_helpers import guest_bytes, qemu_check

pytestmark = pytest.mark.oracle


def _images_agree(pair, *names: str, fmt: dict | None = None, loose: tuple = ()) -> None:
    """Same map and check on both sides; ``loose`` images only need to be clean
    (qemu-img copies chunks in parallel, so their placement can vary)."""
    for name in names:
        f = (fmt or {}).get(name, "qcow2")
        if name in loose:
            ref, ours = pair.judge("map", "-f", f, "--output=json", name)
            assert _status(ref.out) == _status(ours.out), f"map of {name}"
            qemu_check(pair.ours.qemu_img, pair.ours.path(name))
            continue
        pair.judged_same("map", "-f", f, "--output=json", name)
        if f == "qcow2":
            pair.judged_same("check", name)
            qemu_check(pair.ours.qemu_img, pair.ours.path(name))


def _status(map_json: bytes) -> list[tuple]:
    """A qemu-img map without host offsets, equal neighbours merged."""
    import json
    out: list[list] = []
    for e in json.loads(map_json):
        key = (e["depth"], e["present"], e["zero"], e["data"])
        if out and out[-1][0] == key and out[-1][1] + out[-1][2] == e["start"]:
            out[-1][2] += e["length"]
        else:
            out.append([key, e["start"], e["length"]])
    return [tuple(x) for x in out]


def _views(side, names):
    return {n: guest_bytes(side.qemu_img, side.path(n), side.dir) for n in names}


def _chain(pair, opts_base="", opts_top="", base_fmt="qcow2"):
    pair.setup("image", "base.img", base_fmt, "8M", "write -P 0xaa 0 2M",
               opts=opts_base or None)
    pair.setup("image", "mid.qcow2", "qcow2", "8M", "write -P 0xbb 1M 1M", "write -z 3M 128k",
               "write -c -P 0xbc 5M 64k", backing=("base.img", base_fmt))
    pair.setup("image", "top.qcow2", "qcow2", "8M", "write -P 0xcc 1536k 4k",
               "write -P 0xcd 6M 640k", "write -z 0 64k", "discard 7M 64k",
               opts=opts_top or None, backing=("mid.qcow2", "qcow2"))


@pytest.mark.parametrize("args", [(), ("-d",), ("-b", "base.img"), ("-b", "mid.qcow2"),
                                  ("-q",), ("-t", "unsafe")])
def test_commit_levels(pair, args):
    _chain(pair)
    before = _views(pair.ours, ["top.qcow2"])
    pair.same("commit", *args, "top.qcow2")
    # the image written into: qemu-img copies chunks in parallel, so where its
    # new clusters land depends on which copy finishes first
    target = "base.img" if "base.img" in args else "mid.qcow2"
    _images_agree(pair, "top.qcow2", "mid.qcow2", "base.img", loose=(target, "top.qcow2"))
    assert _views(pair.ours, ["top.qcow2"]) == before
    assert _views(pair.ours, ["top.qcow2", "mid.qcow2", "base.img"]) == \
        _views(pair.ref, ["top.qcow2", "mid.qcow2", "base.img"])


@pytest.mark.parametrize("variant", ["top-c512", "top-v2", "base-raw", "base-c4k",
                                     "top-extl2", "base-v2", "top-snapshot", "top-lazy"])
def test_commit_variants(pair, variant):
    base_fmt = "raw" if variant == "base-raw" else "qcow2"
    opts_base = {"base-c4k": "cluster_size=4k", "base-v2": "compat=0.10"}.get(variant, "")
    opts_top = {"top-c512": "cluster_size=512", "top-v2": "compat=0.10",
                "top-extl2": "extended_l2=on", "top-lazy": "lazy_refcounts=on"}.get(variant, "")
    _chain(pair, opts_base, opts_top, base_fmt)
    if variant == "top-snapshot":
        pair.setup("ok", "snapshot", "-c", "keep", "top.qcow2")
        pair.setup("io", "qcow2", "top.qcow2", "write -P 0xdd 2M 64k")
    before = _views(pair.ours, ["top.qcow2"])
    pair.same("commit", "top.qcow2")
    # qemu-img's chunks complete in any order (see test_commit_levels)
    loose = ("mid.qcow2", "top.qcow2")
    _images_agree(pair, "top.qcow2", "mid.qcow2", "base.img", fmt={"base.img": base_fmt},
                  loose=loose)
    assert _views(pair.ours, ["top.qcow2"]) == before
    assert _views(pair.ours, ["mid.qcow2"]) == _views(pair.ref, ["mid.qcow2"])


def test_commit_messages_and_errors(pair):
    _chain(pair)
    pair.setup("image", "lone.qcow2", "qcow2", "1M")
    pair.setup("image", "r.raw", "raw", "1M")
    pair.setup("image", "sb.qcow2", "qcow2", "4M", "write -P 1 0 4M")
    pair.setup("image", "st.qcow2", "qcow2", "8M", "write -P 2 6M 64k",
               backing=("sb.qcow2", "qcow2"))
    for step in [("commit", "-b", "nosuch.qcow2", "top.qcow2"),
                 ("commit", "-b", "top.qcow2", "top.qcow2"),
                 ("commit", "lone.qcow2"), ("commit", "-f", "raw", "r.raw"),
                 ("commit", "st.qcow2"), ("commit", "nonexistent.qcow2"),
                 ("commit", "-r", "abc", "top.qcow2"), ("commit", "-t", "foo", "top.qcow2"),
                 ("commit", "top.qcow2", "x"), ("commit", "-U", "top.qcow2"), ("commit",),
                 ("commit", "-r", "100M", "-q", "mid.qcow2")]:
        pair.same(*step)
    _images_agree(pair, "st.qcow2", "sb.qcow2", "mid.qcow2", "base.img")


_RECORD = re.compile(rb"    \((\d+\.\d\d)/100%\)\r")


def test_progress_records(pair):
    """-p prints qemu-img's records (their count follows qemu-img's event loop)."""
    _chain(pair)
    ref = pair.ref.ref("commit", "-p", "top.qcow2")
    ours = pair.ours.ours("commit", "-p", "top.qcow2")
    for run in (ref, ours):
        assert run.rc == 0 and run.err == b""
        assert run.out.endswith(b"\r\nImage committed.\n")
        records = _RECORD.findall(run.out)
        assert b"".join(b"    (%s/100%%)\r" % r for r in records) + b"\nImage committed.\n" \
            == run.out
        assert records[0] == b"0.00" and records[-1] == b"100.00"
        values = [float(r) for r in records]
        assert values == sorted(values)


def test_commit_error_with_progress(pair):
    _chain(pair)
    pair.same("commit", "-p", "-b", "nosuch", "top.qcow2")


def test_commit_into_an_image_in_use(pair, qemu_io):
    """A base a running QEMU writes to is refused, with qemu-img's words."""
    import subprocess
    import time
    _chain(pair)
    holders = [subprocess.Popen([qemu_io, "-f", "qcow2", str(side.path("mid.qcow2"))],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE) for side in (pair.ref, pair.ours)]
    try:
        time.sleep(0.5)
        run = pair.same("commit", "top.qcow2")
        assert run.rc == 1 and b'"write" lock' in run.err
    finally:
        for holder in holders:
            holder.communicate(b"quit\n", timeout=30)
    _images_agree(pair, "top.qcow2", "mid.qcow2")


def test_commit_layout_like_qemu_img(pair):
    """The transcript's chain: qemu-img's placement is deterministic here and
    qimg's base must look the same, offset for offset."""
    pair.setup("image", "base.qcow2", "qcow2", "8M", "write -P 0xaa 0 2M")
    pair.setup("image", "top.qcow2", "qcow2", "8M", "write -P 0xbb 1M 1M", "write -z 4M 1M",
               "write -P 0xcc 6M 4k", backing=("base.qcow2", "qcow2"))
    pair.same("commit", "top.qcow2")
    _images_agree(pair, "top.qcow2", "base.qcow2")


def test_commit_resets_a_rearranged_overlay(pair):
    """After snapshot transactions moved its tables, the emptied overlay still
    ends up in QEMU's four-cluster layout."""
    pair.setup("image", "b.qcow2", "qcow2", "64M", "write -P 1 0 1M")
    pair.setup("image", "t.qcow2", "qcow2", "64M", "write -P 2 512k 1M",
               backing=("b.qcow2", "qcow2"))
    for side, tool in ((pair.ref, pair.ref.ref), (pair.ours, pair.ours.ours)):
        assert tool("snapshot", "-c", "s", "t.qcow2").rc == 0
        assert tool("snapshot", "-d", "s", "t.qcow2").rc == 0
    pair.same("commit", "t.qcow2")
    _images_agree(pair, "t.qcow2", "b.qcow2")
    assert pair.ref.path("t.qcow2").stat().st_size == pair.ours.path("t.qcow2").stat().st_size
