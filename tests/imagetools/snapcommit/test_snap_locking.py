"""Every command that changes an image takes QEMU's write lock and refuses
an image another process writes (a qemu-io holding it open stands in for a
running VM); read-only commands work next to it with -U. The same command
lines run against qemu-img, with the same holder, must print the same.
"""

from __future__ import annotations

import subprocess
import time

import pytest

pytestmark = pytest.mark.oracle


@pytest.fixture
def held(pair, qemu_io):
    """s.qcow2 (with a snapshot) and its overlay top.qcow2, base.qcow2 held
    open read-write by qemu-io in both directories."""
    pair.setup("image", "base.qcow2", "qcow2", "4M", "write -P 1 0 1M")
    pair.setup("image", "top.qcow2", "qcow2", "4M", "write -P 2 0 64k",
               backing=("base.qcow2", "qcow2"))
    pair.setup("image", "s.qcow2", "qcow2", "4M", "write -P 3 0 64k")
    pair.setup("ok", "snapshot", "-c", "one", "s.qcow2")
    holders = []
    for side in (pair.ref, pair.ours):
        for name in ("s.qcow2", "base.qcow2"):
            holders.append(subprocess.Popen([qemu_io, "-f", "qcow2", str(side.path(name))],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE))
    time.sleep(0.2)
    try:
        yield pair
    finally:
        for holder in holders:
            holder.communicate(b"quit\n", timeout=30)


WRITERS = [
    ("snapshot", "-c", "x", "s.qcow2"), ("snapshot", "-a", "one", "s.qcow2"),
    ("snapshot", "-d", "one", "s.qcow2"), ("resize", "s.qcow2", "8M"),
    ("amend", "-o", "compat=0.10", "s.qcow2"), ("check", "-r", "all", "s.qcow2"),
    ("commit", "top.qcow2"), ("commit", "-d", "top.qcow2"),
    ("rebase", "-b", "", "top.qcow2"), ("rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", "s.qcow2"),
    ("convert", "-n", "-O", "qcow2", "top.qcow2", "s.qcow2"),
]

READERS = [
    ("snapshot", "-U", "-l", "s.qcow2"), ("check", "-U", "s.qcow2"),
    ("info", "-U", "s.qcow2"), ("snapshot", "-l", "s.qcow2"), ("check", "s.qcow2"),
    ("rebase", "-U", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"),
]


@pytest.mark.parametrize("argv", WRITERS + READERS, ids=" ".join)
def test_locks_like_qemu_img(held, argv):
    run = held.same(*argv)
    if argv in WRITERS and argv[:2] != ("rebase", "-u"):
        assert run.rc == 1 and b"lock" in run.err, run.text()
