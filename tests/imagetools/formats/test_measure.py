"""measure agrees with qemu-img measure (raw and qcow2 targets, --size and sources)."""

from __future__ import annotations

import json

import pytest
from fmt_helpers import io_cmds, run

from imagetools.formats import driver
from imagetools.image import open_image

pytestmark = pytest.mark.oracle


def qemu_measure(qemu_img, *args):
    return json.loads(run(qemu_img, "measure", "--output=json", *args).stdout)


@pytest.mark.parametrize("fmt,options,size", [
    ("qcow2", {}, 1 << 30),
    ("qcow2", {}, 64 << 20),
    ("qcow2", {"cluster_size": 4096, "refcount_bits": 1}, 1 << 30),
    ("qcow2", {"preallocation": "metadata"}, 1 << 30),
    ("qcow2", {"preallocation": "full"}, 100 << 20),
    ("qcow2", {"cluster_size": 512}, 3 << 30),
    ("qcow2", {"extended_l2": "on"}, 5 << 30),
    ("qcow2", {"refcount_bits": 64, "cluster_size": 2 << 20}, 1 << 40),
    ("qcow2", {"compat": "0.10"}, 12345678),
    ("raw", {}, 1 << 30),
    ("raw", {}, 1000),
])
def test_measure_size(qemu_img, fmt, options, size):
    opts = ",".join(f"{k}={v}" for k, v in options.items())
    args = ["--size", str(size), "-O", fmt] + (["-o", opts] if opts else [])
    assert driver(fmt).measure(options, size=size) == qemu_measure(qemu_img, *args)


def test_measure_sources(qemu_img, qemu_io, tmp_path):
    base = str(tmp_path / "base.qcow2")
    run(qemu_img, "create", "-q", "-f", "qcow2", base, "64M")
    io_cmds(qemu_io, base, "write -P 1 0 3m", "write -P 2 10m 1000", "write -z 20m 1m")
    top = str(tmp_path / "top.qcow2")
    run(qemu_img, "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    io_cmds(qemu_io, top, "write -P 3 30m 70000", "write -z 0 64k")
    run(qemu_img, "bitmap", "--add", top, "b0")
    raw = tmp_path / "src.raw"
    raw.write_bytes(b"\1" * 5000)
    for src in (base, top, str(raw)):
        for fmt, opts in (("qcow2", {}), ("qcow2", {"cluster_size": 4096}),
                          ("qcow2", {"compat": "0.10"}), ("raw", {})):
            o = ",".join(f"{k}={v}" for k, v in opts.items())
            args = ["-O", fmt] + (["-o", o] if o else []) + [src]
            with open_image(src) as drv:
                assert driver(fmt).measure(opts, source=drv) == qemu_measure(qemu_img, *args)
