"""check -r all with a refcount rebuild, over cluster sizes, refcount widths,
a growing refcount table, snapshots and compressed clusters.

Each case is repaired by qemu-img and by qimg: both must print the same and
leave byte-identical files, and ``qemu-img check`` must find the result
clean with the guest data (and the snapshot's) unchanged.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import struct

import pytest
from snap_helpers import guest_bytes, qemu_check, run

from imagetools import cli

pytestmark = pytest.mark.oracle


def _header(path):
    with open(path, "rb") as f:
        data = f.read(72)
    cluster_bits = struct.unpack_from(">I", data, 20)[0]
    l1_offset, rt_offset = struct.unpack_from(">QQ", data, 40)
    return 1 << cluster_bits, l1_offset, rt_offset


def _u64(path, offset):
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(">Q", f.read(8))[0]


def _put(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _zero_refcount(path, cluster, width):
    """Clear the stored refcount of ``cluster`` (in the first refcount block)."""
    _, _, rt = _header(path)
    block = _u64(path, rt)
    if width >= 8:
        _put(path, block + cluster * width // 8, bytes(width // 8))
    else:
        at = block + cluster * width // 8
        with open(path, "rb") as f:
            f.seek(at)
            byte = f.read(1)[0]
        shift = cluster * width % 8
        _put(path, at, bytes([byte & ~(((1 << width) - 1) << shift) & 0xFF]))


def _leak(path, index):
    """Clear entry ``index`` of the first L2 table (its cluster leaks)."""
    _, l1, _ = _header(path)
    l2 = _u64(path, l1) & 0x00FFFFFFFFFFFE00
    _put(path, l2 + 8 * index, bytes(8))


def _qimg(argv):
    """qimg in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def _build(qemu_img, qemu_io, path, size, opts, writes):
    run(qemu_img, "create", "-q", "-f", "qcow2", "-o", opts, str(path), size)
    for k in range(0, len(writes), 100):
        argv = [qemu_io, "-f", "qcow2"]
        for w in writes[k:k + 100]:
            argv += ["-c", w]
        run(*argv, str(path))


SCATTER = [f"write -P {1 + k % 200} {(k * 37) % 256 * 64}k 64k" for k in range(150)]

CASES = {
    # name: (size, create options, qemu-io commands, snapshot, refcount width, breaks)
    "scattered-16bit": ("16M", "cluster_size=64k", SCATTER, False, 16, [(20, 0)]),
    "leaks-too": ("16M", "cluster_size=64k", SCATTER, False, 16, [(9, 0), ("leak", 3),
                                                                  ("leak", 40)]),
    "4k-clusters-many-blocks": ("24M", "cluster_size=4k",
                                [f"write -P 7 {m}M 512k" for m in range(0, 24, 2)], False, 16,
                                [(100, 0)]),
    "512-byte-clusters-table-grows": ("12M", "cluster_size=512",
                                      ["write -P 5 0 2M", "write -P 6 6M 5M"], False, 16,
                                      [(40, 0)]),
    "refcount-bits-1": ("8M", "cluster_size=64k,refcount_bits=1", ["write -P 3 0 3M"], False,
                        1, [(6, 0)]),
    "refcount-bits-64": ("8M", "cluster_size=64k,refcount_bits=64", ["write -P 3 0 3M"], False,
                         64, [(6, 0)]),
    "snapshot-and-compressed": ("8M", "cluster_size=64k",
                                ["write -P 1 0 2M", "write -c -P 2 4M 64k",
                                 "write -c -P 3 4160k 64k"], True, 16, [(7, 0)]),
}


def _rebuilt_by_both(qemu_img, base, tmp_path):
    """Copies of ``base`` repaired with ``check -r all`` by qemu-img (which
    must rebuild the refcount structure) and by qimg: the same output and
    exit code, and byte-identical files. Returns (qemu-img's, qimg's)."""
    ref, ours = tmp_path / "ref.qcow2", tmp_path / "ours.qcow2"
    for copy in (ref, ours):
        shutil.copy(base, copy)
    expected = run(qemu_img, "check", "-r", "all", str(ref), check=False)
    assert b"Rebuilding refcount structure" in expected.stderr, expected.stderr
    got = _qimg(["check", "-r", "all", str(ours)])
    assert got == (expected.returncode, expected.stdout.decode(), expected.stderr.decode())
    assert ours.read_bytes() == ref.read_bytes()
    return ref, ours


@pytest.mark.parametrize("case", sorted(CASES))
def test_rebuild_matches_qemu_img(qemu_img, qemu_io, tmp_path, case):
    size, opts, writes, snapshot, width, breaks = CASES[case]
    base = tmp_path / "base.qcow2"
    _build(qemu_img, qemu_io, base, size, opts, writes)
    if snapshot:
        run(qemu_img, "snapshot", "-c", "s1", str(base))
        run(qemu_io, "-f", "qcow2", "-c", "write -P 9 1M 256k", str(base))
    for what, arg in breaks:
        if what == "leak":
            _leak(str(base), arg)
        else:
            _zero_refcount(str(base), what, width)
    ref, fast = _rebuilt_by_both(qemu_img, base, tmp_path)
    qemu_check(qemu_img, fast)
    assert guest_bytes(qemu_img, fast, tmp_path) == guest_bytes(qemu_img, base, tmp_path)
    if snapshot:
        assert guest_bytes(qemu_img, fast, tmp_path, snapshot="s1") == \
            guest_bytes(qemu_img, ref, tmp_path, snapshot="s1")


def test_rebuild_of_a_data_cluster_on_the_refcount_block(qemu_img, qemu_io, tmp_path):
    """A data cluster on top of the refcount block: the walk reports the
    block's refcount of 2 and the structure is rebuilt, as by qemu-img."""
    base = tmp_path / "base.qcow2"
    _build(qemu_img, qemu_io, base, "8M", "cluster_size=64k", ["write -P 1 0 1M"])
    _, l1, rt = _header(str(base))
    l2 = _u64(str(base), l1) & 0x00FFFFFFFFFFFE00
    _put(str(base), l2 + 8, struct.pack(">Q", (1 << 63) | _u64(str(base), rt)))
    _rebuilt_by_both(qemu_img, base, tmp_path)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["rebuild", "leaks"])
def test_a_repair_killed_at_every_change_loses_nothing(qemu_img, qemu_io, tmp_path, kind):
    """check -r all (with a rebuild, or fixing leaks only), SIGKILLed after
    its 1st, 2nd, ... change to the file: qemu-img finds at most the
    corruption that was there before (the old structure still in force) and
    the guest data unchanged; a second repair then leaves the image clean."""
    import os
    import subprocess
    import sys
    base = tmp_path / "base.qcow2"
    size, opts, writes, _, width, breaks = CASES["leaks-too"]
    _build(qemu_img, qemu_io, base, size, opts, writes)
    for what, arg in breaks:
        if what == "leak":
            _leak(str(base), arg)
        elif kind == "rebuild":
            _zero_refcount(str(base), what, width)
    before = json_check(qemu_img, base)
    assert before["leaks"] == 2
    assert bool(before.get("corruptions")) == (kind == "rebuild")
    before = before.get("corruptions", 0)
    content = guest_bytes(qemu_img, base, tmp_path)
    count_file = tmp_path / "count"
    env = dict(os.environ, QIMG_FAULT_COUNT=str(count_file), LC_ALL="C")
    full = tmp_path / "full.qcow2"
    shutil.copy(base, full)
    subprocess.run([sys.executable, "-m", "imagetools", "check", "-r", "all", str(full)],
                   env=env, capture_output=True, check=True, timeout=60)
    changes = int(count_file.read_text())
    assert changes >= 2, changes
    for n in range(1, changes):
        victim = tmp_path / f"kill{n}.qcow2"
        shutil.copy(base, victim)
        proc = subprocess.run([sys.executable, "-m", "imagetools", "check", "-r", "all",
                               str(victim)], env=dict(env, QIMG_FAULT_AFTER=str(n)),
                              capture_output=True, timeout=60)
        assert proc.returncode == -9, (n, proc.stderr)
        after = json_check(qemu_img, victim)
        assert after.get("corruptions", 0) <= before, (n, after)
        assert guest_bytes(qemu_img, victim, tmp_path) == content, n
        subprocess.run([sys.executable, "-m", "imagetools", "check", "-r", "all", str(victim)],
                       env=dict(os.environ, LC_ALL="C"), capture_output=True, timeout=60)
        qemu_check(qemu_img, victim)
        victim.unlink()


def json_check(qemu_img, path) -> dict:
    import json
    proc = run(qemu_img, "check", "--output=json", str(path), check=False)
    assert proc.returncode in (0, 2, 3), proc.stderr
    return json.loads(proc.stdout)
