"""Killing a writer at any moment leaves a qcow2 image qemu-img finds consistent.

A child process keeps writing, zeroing and discarding through the qcow2
driver (growing refcount structures, copy-on-write over a backing file and
over an internal snapshot, lazy refcounts) and is SIGKILLed after a random
delay; ``qemu-img check`` must then find no corruption (leaked clusters are
allowed), and the data flushed before the kill must still be there.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from fmt_helpers import io_cmds, qemu_check, run

from imagetools.image import open_image

pytestmark = [pytest.mark.oracle, pytest.mark.slow, pytest.mark.timeout(240)]

WRITER = textwrap.dedent(r"""
    import os, random, sys
    from imagetools.image import open_image
    path, seed = sys.argv[1], int(sys.argv[2])
    r = random.Random(seed)
    drv = open_image(path, "qcow2", read_only=False)
    size = drv.size
    marker = sys.argv[3]
    step = 0
    while True:
        off = r.randrange(65536, size)     # [0, 64k) holds the flushed pattern
        n = min(r.randrange(1, 300000), size - off)
        k = r.random()
        if k < 0.6:
            drv.write(off, bytes([r.randrange(1, 256)]) * n)
        elif k < 0.8:
            drv.write_zeroes(off, n, unmap=r.random() < 0.5)
        else:
            drv.discard(off, n)
        step += 1
        if step % 7 == 0:
            # a known pattern, flushed: it must survive the kill
            drv.write(0, b"\xee" * 65536)
            drv.flush()
            with open(marker, "w") as f:
                f.write(str(step))
""")


@pytest.mark.parametrize("variant", ["plain", "backing", "snapshot", "lazy-c512"])
def test_sigkill_leaves_consistent_image(qemu_img, qemu_io, tmp_path, variant):
    path = str(tmp_path / "victim.qcow2")
    if variant == "backing":
        base = str(tmp_path / "base.qcow2")
        run(qemu_img, "create", "-q", "-f", "qcow2", base, "8M")
        io_cmds(qemu_io, base, "write -P 0x5a 0 8m")
        run(qemu_img, "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", path)
    elif variant == "lazy-c512":
        run(qemu_img, "create", "-q", "-f", "qcow2", "-o",
            "cluster_size=512,lazy_refcounts=on", path, "8M")
    else:
        run(qemu_img, "create", "-q", "-f", "qcow2", path, "8M")
        io_cmds(qemu_io, path, "write -P 0x33 0 8m")
        if variant == "snapshot":
            run(qemu_img, "snapshot", "-c", "keep", path)
    rng = random.Random(sum(variant.encode()))
    marker = str(tmp_path / "flushed")
    for round_ in range(4):
        if os.path.exists(marker):
            os.unlink(marker)
        proc = subprocess.Popen([sys.executable, "-c", WRITER, path, str(round_), marker],
                                stderr=subprocess.PIPE)
        time.sleep(rng.uniform(0.1, 0.6))
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
        assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
        chk = qemu_check(qemu_img, path)
        assert chk["rc"] in (0, 3), chk["stderr"]
        assert "corruptions" not in chk
        if os.path.exists(marker):
            with open_image(path, "qcow2", force_share=True) as drv:
                assert drv.read(0, 65536) == b"\xee" * 65536
        # the next round opens it read-write again (repairing a dirty image)
    if variant == "snapshot":
        out = tmp_path / "snap.raw"
        run(qemu_img, "convert", "-l", "keep", "-O", "raw", path, str(out))
        assert out.read_bytes() == b"\x33" * (8 << 20)
