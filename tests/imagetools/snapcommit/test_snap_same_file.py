"""One qimg process naming the same file twice, against qemu-img 7.2.

QEMU's image locks are OFD locks, held per open file description, so they
also stop a single qemu-img from opening a file for writing that it already
has open (convert -n x x, a target that is the source's backing file, a
rebase onto the image itself, through a symlink or a hard link). qimg must
refuse the same command lines with the same lines, never deadlock, and
leave every image as it was; where qemu-img allows it (compare x x, commit
through a symlink) both must give the same result.
"""

from __future__ import annotations

import os

import pytest
from snap_helpers import qemu_check

pytestmark = [pytest.mark.oracle, pytest.mark.timeout(120)]

NAMES = ("base.qcow2", "top.qcow2", "r.raw")


def _setup(side) -> None:
    side.image("base.qcow2", "qcow2", "4M", "write -P 1 0 1M")
    side.image("top.qcow2", "qcow2", "4M", "write -P 2 512k 64k",
               backing=("base.qcow2", "qcow2"))
    side.image("r.raw", "raw", "4M", "write -P 3 0 64k")
    os.link(side.path("base.qcow2"), side.path("hard.qcow2"))
    os.symlink("top.qcow2", side.path("sym.qcow2"))


@pytest.mark.parametrize("args", [
    "convert -n -O qcow2 top.qcow2 top.qcow2", "convert -O qcow2 top.qcow2 top.qcow2",
    "convert -n -O qcow2 top.qcow2 base.qcow2", "convert -n -O qcow2 top.qcow2 sym.qcow2",
    "convert -n -O qcow2 base.qcow2 hard.qcow2", "convert -n -O qcow2 top.qcow2 hard.qcow2",
    "convert -n -O raw r.raw r.raw", "convert -O qcow2 top.qcow2 base.qcow2",
    "convert -O qcow2 top.qcow2 top.qcow2 out.qcow2",
    "dd if=top.qcow2 of=top.qcow2 -O qcow2", "dd if=top.qcow2 of=base.qcow2 -O qcow2",
    "commit -b hard.qcow2 top.qcow2", "commit -b top.qcow2 top.qcow2", "commit sym.qcow2",
    "rebase -b top.qcow2 -F qcow2 top.qcow2", "rebase -b sym.qcow2 -F qcow2 top.qcow2",
    "rebase -b hard.qcow2 -F qcow2 top.qcow2", "rebase -b top.qcow2 -F qcow2 base.qcow2",
    "compare top.qcow2 top.qcow2", "compare top.qcow2 sym.qcow2",
])
def test_same_file_twice(pair, args):
    _setup(pair.ref)
    _setup(pair.ours)
    pair.same(*args.split())
    for name in NAMES:
        ref, ours = pair.ref.path(name).read_bytes(), pair.ours.path(name).read_bytes()
        if name.endswith(".qcow2"):
            qemu_check(pair.ours.qemu_img, pair.ours.path(name))
            pair.judged_same("map", "--output=json", name)
        else:
            assert ref == ours


def test_create_onto_its_own_backing_file_through_a_hard_link(pair):
    """qemu-img compares the names only: it truncates base.qcow2 (and with it
    hard.qcow2) and writes an image that is its own backing file. qimg
    compares the files and refuses, leaving the data."""
    _setup(pair.ref)
    _setup(pair.ours)
    before = pair.ours.path("base.qcow2").read_bytes()
    run = pair.ours.ours("create", "-f", "qcow2", "-b", "hard.qcow2", "-F", "qcow2",
                         "base.qcow2", "4M")
    assert run.rc == 1
    assert run.err.decode().endswith("base.qcow2: Error: Trying to create an image with the "
                                     "same filename as the backing file\n")
    assert pair.ours.path("base.qcow2").read_bytes() == before
    ref = pair.ref.ref("create", "-f", "qcow2", "-b", "hard.qcow2", "-F", "qcow2",
                       "base.qcow2", "4M")
    assert ref.rc == 0 and pair.ref.path("base.qcow2").read_bytes() != before
