"""Fuzzing the other formats' metadata: only ImageError, never a crash, hang or blow-up.

Samples of every format (made by qemu-img / qemu-io, plus the committed
read-only fixtures) get their headers, tables and descriptors mutated with a
fixed seed (vhdx mutants usually get their CRCs fixed up so the mutation
reaches the code behind the checksum). A child process with an
address-space limit (RLIMIT_AS) and a per-image alarm opens each mutant,
reads it, walks its block status, checks it and -- for writable formats --
writes to it; any exception other than ImageError, a timeout or running out
of memory fails the test, naming the mutant and the traceback.
"""

from __future__ import annotations

import random
import shutil
import struct
import subprocess
import sys
import textwrap

import pytest

from of_helpers import DATA, io_run, run

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
    opened = 0
    args = sys.argv[1:]
    for fmt, path in zip(args[::2], args[1::2]):
        signal.alarm(15)
        try:
            try:
                drv = open_image(path, fmt, read_only=True)
                opened += 1
                try:
                    size = drv.size
                    drv.read(0, min(size, 4 << 20))
                    if size > 4096:
                        drv.read(size - 4096, 4096)
                        drv.read(size // 3, min(100000, size - size // 3))
                    for i, _ in enumerate(drv.block_status(0, min(size, 1 << 30))):
                        if i > 2000:
                            break
                    try:
                        drv.check()
                    except ImageError:
                        pass
                    drv.format_specific()
                finally:
                    drv.close()
                if fmt not in ("bochs", "cloop", "dmg"):
                    drv = open_image(path, fmt, read_only=False)
                    try:
                        if drv.size:
                            off = drv.size // 3
                            drv.write(off, b"\x5a" * min(70000, drv.size - off))
                            drv.write_zeroes(0, min(drv.size, 4096))
                            drv.read(0, min(drv.size, 1 << 20))
                    finally:
                        drv.close()
            except ImageError:
                pass
        except Hang:
            print(f"HANG {fmt} {path}", flush=True)
            failures += 1
        except MemoryError:
            print(f"MEMORY {fmt} {path}", flush=True)
            failures += 1
        except BaseException:
            print(f"CRASH {fmt} {path}\n{traceback.format_exc()}", flush=True)
            failures += 1
        finally:
            signal.alarm(0)
    print(f"OPENED {opened} of {len(args) // 2}", flush=True)
    sys.exit(1 if failures else 0)
""")

MiB = 1 << 20
INTERESTING = [0, 1, 2, 3, 8, 0x1FF, 0x200, 0x1000, 0x10000, 0x100000, 0x7FFFFFFF, 1 << 31,
               0xFFFFFFFF, 0xFFFFFFFE, 1 << 40, 1 << 62, 0x8000000000000000,
               0xFFFFFFFFFFFFFFFF, 0x4000000000000006, 0x100006, 0x200000]


def _le(data: bytes, off: int, fmt: str) -> int:
    return struct.unpack_from(fmt, data, off)[0]


def regions(fmt: str, data: bytes) -> list[tuple[int, int]]:
    """Byte ranges that hold the format's metadata."""
    n = len(data)
    if fmt == "vdi":
        return [(0, 512), (512, 64)]
    if fmt == "vpc":
        return [(0, 512), (512, 1024), (1536, 64), (n - 512, 512)]
    if fmt == "qed":
        cs = _le(data, 4, "<I")
        out = [(0, 64), (cs, 64)]
        l2 = _le(data, cs, "<Q")
        if 0 < l2 < n:
            out.append((l2, 512))
        return out
    if fmt == "qcow":
        l1 = _le(data, 40, ">Q")
        out = [(0, 48), (l1, 32)]
        l2 = _le(data, l1, ">Q")
        if 0 < l2 < n:
            out.append((l2, 256))
        return out
    if fmt == "vhdx":
        return [(0x10000, 80), (0x20000, 80), (0x30000, 80), (2 * MiB, 64), (3 * MiB, 200),
                (3 * MiB + 0x10000, 48), (MiB, 256)]
    if fmt == "vmdk":
        if data[:4] != b"KDMV":
            return [(0, n)]                     # a descriptor file
        gd = _le(data, 4 + 52, "<Q") * 512
        rgd = _le(data, 4 + 44, "<Q") * 512
        out = [(0, 80), (512, 400), (gd, 16), (rgd, 16)]
        gt = _le(data, gd, "<I") * 512 if gd < n else 0
        if 0 < gt < n:
            out.append((gt, 64))
        return [(s, k) for s, k in out if s < n]
    if fmt == "parallels":
        return [(0, 64), (64, 64)]
    if fmt == "bochs":
        return [(0, 96), (512, 64)]
    if fmt == "cloop":
        return [(128, 64)]
    if fmt == "dmg":
        return [(n - 512, 512), (max(0, n - 2000), 1400)]
    raise AssertionError(fmt)


def fix_vhdx_crcs(data: bytearray) -> None:
    from imagetools.formats.vhdx.structs import with_checksum
    for off, size in ((0x10000, 4096), (0x20000, 4096), (0x30000, 0x10000),
                      (0x40000, 0x10000)):
        if off + size <= len(data):
            data[off:off + size] = with_checksum(bytes(data[off:off + size]))


def mutate(fmt: str, data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    spots = regions(fmt, data)
    for _ in range(rng.choice((1, 1, 2, 3, 6))):
        start, length = rng.choice(spots)
        pos = start + rng.randrange(max(1, length))
        if pos >= len(out):
            continue
        kind = rng.random()
        if kind < 0.35:
            out[pos] ^= 1 << rng.randrange(8)
        elif kind < 0.65 and pos + 8 <= len(out):
            struct.pack_into("<Q" if rng.random() < 0.5 else ">Q", out, pos & ~7,
                             rng.choice(INTERESTING))
        elif pos + 4 <= len(out):
            struct.pack_into("<I" if rng.random() < 0.5 else ">I", out, pos & ~3,
                             rng.choice(INTERESTING) & 0xFFFFFFFF)
    if fmt == "vhdx" and rng.random() < 0.8:
        fix_vhdx_crcs(out)
    if rng.random() < 0.1:
        out = out[:rng.randrange(len(out))]
    return bytes(out)


@pytest.fixture(scope="module")
def fuzz_samples(qemu_img, qemu_io, tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz-other")
    made = []
    for fmt, opts in (("vdi", ""), ("vpc", ""), ("vpc", "subformat=fixed"), ("qed", ""),
                      ("qcow", ""), ("vhdx", "block_size=1M"), ("vmdk", ""),
                      ("vmdk", "subformat=monolithicFlat"), ("vmdk", "zeroed_grain=on"),
                      ("parallels", "cluster_size=64k")):
        path = d / f"s{len(made)}.{fmt}"
        args = ["-o", opts] if opts else []
        run("qemu-img", "create", "-q", "-f", fmt, *args, str(path), "2M")
        io_run(str(path), fmt, "write -P 0xab 1234 20000", "write -P 0x11 1m 64k")
        made.append((fmt, path))
    stream = d / "stream.vmdk"
    raw = d / "r.raw"
    raw.write_bytes(b"\x01" * MiB + bytes(MiB))
    run("qemu-img", "convert", "-q", "-f", "raw", "-O", "vmdk", "-o",
        "subformat=streamOptimized", str(raw), str(stream))
    made.append(("vmdk", stream))
    for name, fmt in (("bochs-growing.img", "bochs"), ("cloop.cloop", "cloop"),
                      ("udif.dmg", "dmg")):
        shutil.copy(DATA / name, d / name)
        made.append((fmt, d / name))
    return made


def test_mutated_images_only_raise_image_error(fuzz_samples, tmp_path):
    rng = random.Random(20261127)
    args = []
    for i in range(900):
        fmt, src = fuzz_samples[i % len(fuzz_samples)]
        data = src.read_bytes()
        if fmt == "vmdk" and data[:4] != b"KDMV":
            # a descriptor: mutate it in a copy next to its extent file
            folder = tmp_path / f"d{i}"
            folder.mkdir()
            for sibling in src.parent.glob(src.stem + "*"):
                shutil.copy(sibling, folder / sibling.name)
            path = folder / src.name
        else:
            path = tmp_path / f"m{i:03d}{src.suffix}"
        path.write_bytes(mutate(fmt, data, rng))
        args += [fmt, str(path)]
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True,
                          text=True, timeout=280)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    # the mutations must mostly leave images that open, or the deeper code goes untested
    opened, total = map(int, proc.stdout.split("OPENED ")[1].split(" of "))
    assert opened >= total // 3, proc.stdout[-2000:]
