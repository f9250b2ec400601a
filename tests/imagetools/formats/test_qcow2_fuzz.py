"""Fuzzing qcow2 metadata: only ImageError, never a crash, a hang or a memory blow-up.

Sample images (made by qemu-img / qemu-io: data, zero clusters, compressed
clusters, a snapshot, a backing file, extended L2) get their header, L1,
L2, refcount and snapshot bytes mutated with a fixed seed. A child process
with an address-space limit (RLIMIT_AS) and a per-image alarm opens each
mutant, reads it, walks its block status, checks it, and writes to it; any
exception other than ImageError, a timeout or an out-of-memory fails the
test with the seed and the traceback.
"""

from __future__ import annotations

import random
import struct
import subprocess
import sys
import textwrap

import pytest
from fmt_helpers import io_cmds, run

pytestmark = [pytest.mark.oracle, pytest.mark.slow, pytest.mark.timeout(300)]

CHILD = textwrap.dedent(r"""
    import resource, signal, sys, traceback
    resource.setrlimit(resource.RLIMIT_AS, (1536 << 20, 1536 << 20))
    from imagetools.errors import ImageError
    from imagetools.image import open_image

    class Hang(Exception):
        pass

    def alarm(signum, frame):
        raise Hang()

    signal.signal(signal.SIGALRM, alarm)
    failures = 0
    for path in sys.argv[1:]:
        signal.alarm(20)
        try:
            try:
                drv = open_image(path, "qcow2", read_only=True)
                try:
                    n = min(drv.size, 8 << 20)
                    drv.read(0, n)
                    for _ in drv.block_status(0, min(drv.size, 1 << 30)):
                        pass
                    drv.check()
                    for snap in drv.snapshots()[:2]:
                        view = drv.open_snapshot(snap.id)
                        view.read(0, min(view.size, 1 << 20))
                finally:
                    drv.close()
                drv = open_image(path, "qcow2", read_only=False)
                try:
                    if drv.size:
                        off = drv.size // 3
                        drv.write(off, b"\x5a" * min(70000, drv.size - off))
                        drv.write_zeroes(0, min(drv.size, 4096))
                        drv.discard(0, min(drv.size, 1 << 20))
                finally:
                    drv.close()
            except ImageError:
                pass
        except Hang:
            print(f"HANG {path}", flush=True)
            failures += 1
        except MemoryError:
            print(f"MEMORY {path}", flush=True)
            failures += 1
        except BaseException:
            print(f"CRASH {path}\n{traceback.format_exc()}", flush=True)
            failures += 1
        finally:
            signal.alarm(0)
    sys.exit(1 if failures else 0)
""")


def regions(data: bytes) -> list[tuple[int, int]]:
    """Byte ranges worth mutating: header, L1, refcount table/block, L2s, snapshots."""
    cs = 1 << struct.unpack_from(">I", data, 20)[0]
    l1_off = struct.unpack_from(">Q", data, 40)[0]
    l1_size = struct.unpack_from(">I", data, 36)[0]
    rt_off = struct.unpack_from(">Q", data, 48)[0]
    snap_off = struct.unpack_from(">Q", data, 64)[0]
    out = [(0, min(cs, 1024)), (l1_off, 8 * l1_size), (rt_off, 64)]
    rb = struct.unpack_from(">Q", data, rt_off)[0]
    if rb:
        out.append((rb, 256))
    for i in range(l1_size):
        l2 = struct.unpack_from(">Q", data, l1_off + 8 * i)[0] & 0x00FFFFFFFFFFFE00
        if l2 and l2 < len(data):
            out.append((l2, 512))
    if snap_off and snap_off < len(data):
        out.append((snap_off, 128))
    return [(s, n) for s, n in out if s + n <= len(data)]


INTERESTING = [0, 1, 0xFFFFFFFF, 0x7FFFFFFF, 1 << 31, 1 << 62, 0xFFFFFFFFFFFFFFFF,
               0x8000000000000000, 0x10000, 0x200, 0x1FF, 64, 22, 8, 3, 0x400000, 0x100000,
               0xC000000000000000, 0x4000000000010000, 0x8000000000001000, 0x1000, 0x3000,
               0x00FFFFFFFFFFFE00, 65536, 4096, 2, 0x20]


def mutate(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    spots = regions(data)
    for _ in range(rng.choice((1, 1, 2, 3, 6, 12))):
        start, length = rng.choice(spots)
        pos = start + rng.randrange(max(1, length))
        kind = rng.random()
        if kind < 0.4:
            out[pos] ^= 1 << rng.randrange(8)
        elif kind < 0.7 and pos + 8 <= len(out):
            struct.pack_into(">Q", out, pos & ~7, rng.choice(INTERESTING))
        elif pos + 4 <= len(out):
            struct.pack_into(">I", out, pos & ~3, rng.choice(INTERESTING) & 0xFFFFFFFF)
    if rng.random() < 0.1:
        out = out[:rng.randrange(len(out))]
    return bytes(out)


@pytest.fixture(scope="module")
def samples(qemu_img, qemu_io, tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz-samples")
    base = str(d / "base.qcow2")
    run(qemu_img, "create", "-q", "-f", "qcow2", base, "2M")
    io_cmds(qemu_io, base, "write -P 0x11 0 2m")
    made = []
    for name, opts, extra in (
            ("plain", "cluster_size=4096", ()),
            ("v2", "compat=0.10,cluster_size=512", ()),
            ("extl2", "extended_l2=on,cluster_size=16k", ()),
            ("rc1", "refcount_bits=1,cluster_size=4096", ()),
            ("backed", "cluster_size=4096", ("-b", base, "-F", "qcow2"))):
        path = str(d / f"{name}.qcow2")
        run(qemu_img, "create", "-q", "-f", "qcow2", "-o", opts, *extra, path, "2M")
        io_cmds(qemu_io, path, "write -P 0xab 1234 20000", "write -z 64k 8k",
                "write -c -P 0x33 1m 64k" if name in ("plain", "rc1") else "write 1m 4k",
                "discard 512k 64k")
        if name == "plain":
            run(qemu_img, "snapshot", "-c", "s1", path)
            io_cmds(qemu_io, path, "write -P 0xcd 0 8k")
        made.append(path)
    return made


def test_mutated_images_only_raise_image_error(samples, tmp_path):
    rng = random.Random(20261126)
    mutants = []
    for i in range(240):
        src = samples[i % len(samples)]
        data = open(src, "rb").read()
        path = tmp_path / f"m{i:03d}.qcow2"
        path.write_bytes(mutate(data, rng))
        mutants.append(str(path))
    proc = subprocess.run([sys.executable, "-c", CHILD, *mutants], capture_output=True,
                          text=True, timeout=280)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
