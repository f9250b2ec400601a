"""dd, measure and bench against qemu-img."""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.oracle


@pytest.fixture
def src(pair):
    pair.setup("image", "src.qcow2", "qcow2", "4M", "write -P 0xaa 0 1M", "write -P 0xbb 1M 1M",
               "write -P 0xcc 3000000 5000")
    pair.setup("image", "src.raw", "raw", "3M", "write -P 0x11 100 5000")
    return pair


DD_CASES = [
    ("-f", "qcow2", "-O", "raw", "bs=64k", "count=4", "if=src.qcow2", "of=out.raw"),
    ("-f", "qcow2", "-O", "raw", "bs=1M", "skip=1", "count=1", "if=src.qcow2", "of=out.raw"),
    ("-f", "qcow2", "-O", "raw", "bs=1M", "skip=1", "count=2", "if=src.qcow2", "of=out.raw"),
    ("-O", "qcow2", "if=src.qcow2", "of=out.qcow2"),
    ("-O", "raw", "bs=1M", "skip=10", "if=src.qcow2", "of=out.raw"),
    ("bs=3000", "count=700", "if=src.raw", "of=out.raw"),
    ("bs=7", "skip=3", "count=1000", "if=src.raw", "of=out.raw"),
    ("-O", "raw", "bs=64k", "count=0", "if=src.qcow2", "of=out.raw"),
    ("bs=4k", "count=1", "count=2", "if=src.raw", "of=out.raw"),
    ("if=src.raw", "of=out.raw", "if=src.qcow2"),
]


@pytest.mark.parametrize("argv", DD_CASES, ids=" ".join)
def test_dd(src, argv) -> None:
    result = src.same("dd", *argv)
    out = next(a[3:] for a in argv if a.startswith("of="))
    fmt = argv[argv.index("-O") + 1] if "-O" in argv else "raw"
    if result.rc == 0:
        ref, ours = src.ref.path(out), src.ours.path(out)
        assert ref.stat().st_size == ours.stat().st_size
        identical = src.ours.ref("compare", "-f", fmt, "-F", fmt, str(ref), str(ours))
        assert identical.rc == 0, identical.text()
        if fmt == "qcow2":
            src.judged_same("check", "--output=json", out)
            src.judged_same("map", "--output=json", out)


MEASURE_CASES = [
    ("--size", "1G", "-O", "qcow2"), ("--output=json", "--size", "1G", "-O", "qcow2"),
    ("--size", "1G", "-O", "raw"), ("--size", "1G"), ("--size", "1000", "-O", "raw"),
    ("--size", "1000", "-O", "qcow2"), ("--size", "0", "-O", "qcow2"),
    ("--size", "1G", "-O", "qcow2", "-o", "cluster_size=4k,refcount_bits=1"),
    ("--size", "1G", "-O", "qcow2", "-o", "preallocation=metadata"),
    ("--size", "1G", "-O", "qcow2", "-o", "preallocation=full"),
    ("--size", "100G", "-O", "qcow2", "-o", "extended_l2=on,cluster_size=2M"),
    ("--size", "1G", "-O", "qcow2", "-o", "compat=0.10"),
    ("--size", "1G", "-O", "qcow2", "-o", "cluster_size=1000"),
    ("-O", "qcow2", "src.qcow2"), ("--output=json", "-O", "qcow2", "src.qcow2"),
    ("-O", "raw", "src.qcow2"), ("src.qcow2",), ("-O", "qcow2", "src.raw"),
    ("-O", "qcow2", "-o", "compat=0.10", "src.qcow2"),
    ("-O", "qcow2", "-o", "cluster_size=512", "src.raw"),
]


@pytest.mark.parametrize("argv", MEASURE_CASES, ids=" ".join)
def test_measure(src, argv) -> None:
    src.ref.same("measure", *argv)


BENCH_CASES = [
    ("-c", "1000", "src.qcow2"), ("-w", "-c", "100", "-s", "64k", "-d", "4", "src.qcow2"),
    ("-w", "-c", "100", "-d", "4", "--pattern=0xab", "--flush-interval=10", "src.qcow2"),
    ("-w", "-c", "100", "-d", "4", "--flush-interval=10", "--no-drain", "src.qcow2"),
    ("-c", "10", "-o", "1M", "-S", "8k", "src.qcow2"), ("-q", "-c", "10", "src.raw"),
    ("-c", "0", "src.raw"), ("-c", "10", "-s", "128M", "src.qcow2"),
    ("-c", "3", "-s", "3M", "src.raw"), ("-c", "3", "-s", "4M", "src.raw"),
    ("-c", "300", "-s", "1000", "-S", "333", "-o", "7", "src.raw"),
]

_TIME = re.compile(rb"Run completed in \d+\.\d{3} seconds\.")


@pytest.mark.parametrize("argv", BENCH_CASES, ids=" ".join)
def test_bench(src, argv) -> None:
    ref, ours = src.ref.both("bench", *argv)
    assert (ours.rc, ours.err) == (ref.rc, ref.err)
    assert _TIME.sub(b"T", ours.out) == _TIME.sub(b"T", ref.out)


def test_bench_writes_what_qemu_img_writes(src) -> None:
    argv = ("-w", "-c", "300", "-s", "5000", "-S", "7000", "-o", "1000", "--pattern=0x5a")
    src.ref.ref("bench", *argv, "src.qcow2")
    src.ours.ours("bench", *argv, "src.qcow2")
    identical = src.ours.ref("compare", str(src.ref.path("src.qcow2")),
                             str(src.ours.path("src.qcow2")))
    assert identical.rc == 0, identical.text()
    assert src.ours.ref("check", "src.qcow2").rc == 0
