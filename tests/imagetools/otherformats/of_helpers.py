"""Helpers for the other-format tests: QEMU oracles, samples, comparisons.

The fixtures using them are in conftest.py.

Samples are made in the test session by the real qemu-img / qemu-io (the
recipe of /work/shared/spec/format-samples.md, 4 MiB images with the same
three writes), plus the committed bochs / cloop / dmg fixtures in data/.
"""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest

from image_oracle import our_map, run  # noqa: F401  (shared, re-exported)

DATA = Path(__file__).parent / "data"
MiB = 1 << 20

#: the formats this directory's drivers implement
FORMATS = ("qcow", "qed", "vdi", "vpc", "vhdx", "vmdk", "parallels", "bochs", "cloop", "dmg")

#: the sample pattern: (offset, length, byte)
PATTERN = ((0, 64 * 1024, 0xAA), (1049088, 4096, 0xBB), (4 * MiB - 4096, 4096, 0xCC))


def io_run(path: str, fmt: str, *commands: str) -> None:
    args = ["qemu-io", "-f", fmt]
    for c in commands:
        args += ["-c", c]
    run(*args, path)


def pattern_cmds(size: int = 4 * MiB) -> list[str]:
    return [f"write -P {b:#x} {o} {n}" for o, n, b in PATTERN if o + n <= size]


def qemu_map(path: str, fmt: str) -> list[dict]:
    proc = run("qemu-img", "map", "--output=json", "-f", fmt, path)
    return json.loads(proc.stdout)


def qemu_info(path: str, fmt: str | None = None) -> dict:
    cmd = ["qemu-img", "info", "--output=json"]
    if fmt:
        cmd += ["-f", fmt]
    return json.loads(run(*cmd, path).stdout)


def qemu_raw(path: str, fmt: str, out: Path) -> bytes:
    run("qemu-img", "convert", "-f", fmt, "-O", "raw", path, str(out))
    return out.read_bytes()


def qemu_check(path: str, fmt: str) -> dict:
    proc = run("qemu-img", "check", "--output=json", "-f", fmt, path, check=False)
    result = json.loads(proc.stdout) if proc.stdout.strip() else {}
    result["rc"] = proc.returncode
    result["stderr"] = proc.stderr
    return result


def qemu_compare(a: str, afmt: str, b: str, bfmt: str) -> subprocess.CompletedProcess:
    return run("qemu-img", "compare", "-f", afmt, "-F", bfmt, a, b, check=False)



def our_check(drv) -> dict:
    """Our check result in qemu-img check's JSON shape (zero counters omitted)."""
    result = drv.check()
    out = {name.replace("_", "-"): getattr(result, name) for name in result.FIELDS
           if getattr(result, name)}
    out["check-errors"] = result.check_errors
    return out


def check_json_counters(qemu: dict) -> dict:
    return {k: v for k, v in qemu.items() if k not in ("filename", "format", "rc", "stderr")}


def random_ops(size: int, seed: int, count: int = 24) -> list[tuple[str, int, int, int]]:
    """A reproducible mix of writes (odd offsets and lengths) and zero writes."""
    rnd = random.Random(seed)
    ops = [("write", 0, 65536, 0xAA), ("write", 1049088, 4096, 0xBB),
           ("write", size - 4096, 4096, 0xCC)]
    for _ in range(count):
        off = rnd.randrange(size)
        n = min(rnd.randrange(1, 300_000), size - off)
        kind = "zero" if rnd.random() < 0.25 else "write"
        ops.append((kind, off, n, rnd.randrange(1, 256)))
    return ops


def apply_ops(drv, ops, ref: bytearray) -> None:
    for kind, off, n, byte in ops:
        if kind == "write":
            drv.write(off, bytes([byte]) * n)
            ref[off:off + n] = bytes([byte]) * n
        else:
            drv.write_zeroes(off, n)
            ref[off:off + n] = bytes(n)


#: sample name -> (format, how to make it); run in the sample directory
SAMPLES = {
    "qcow1.qcow": ("qcow", [["create", "-f", "qcow", "{f}", "4M"], "pattern"]),
    "qcow1-backed.qcow": ("qcow", [["create", "-f", "qcow", "-b", "ref.raw", "-F", "raw", "{f}"],
                                   ["io", "write -P 0xdd 2m 4k"]]),
    # qemu-img 7.2 exits 1 without a message after this convert, the image is fine
    "qcow1-compressed.qcow": ("qcow", [["convert!", "-c", "-f", "raw", "-O", "qcow", "ref.raw",
                                        "{f}"]]),
    "qed.qed": ("qed", [["create", "-f", "qed", "{f}", "4M"], "pattern",
                        ["io", "write -z 2m 64k"]]),
    "qed-backed.qed": ("qed", [["create", "-f", "qed", "-b", "ref.raw", "-F", "raw", "{f}"],
                               ["io", "write -P 0xdd 2m 4k"]]),
    "vdi-dynamic.vdi": ("vdi", [["create", "-f", "vdi", "{f}", "4M"], "pattern"]),
    "vdi-static.vdi": ("vdi", [["create", "-f", "vdi", "-o", "static=on", "{f}", "4M"],
                               "pattern"]),
    "vpc-dynamic.vhd": ("vpc", [["create", "-f", "vpc", "{f}", "4M"], "pattern"]),
    "vpc-forcesize.vhd": ("vpc", [["create", "-f", "vpc", "-o", "force_size=on", "{f}", "4M"],
                                  "pattern"]),
    "vpc-fixed.vhd": ("vpc", [["create", "-f", "vpc", "-o", "subformat=fixed", "{f}", "4M"],
                              "pattern"]),
    "vhdx-dynamic.vhdx": ("vhdx", [["create", "-f", "vhdx", "{f}", "4M"], "pattern"]),
    "vhdx-nozero.vhdx": ("vhdx", [["create", "-f", "vhdx", "-o", "block_state_zero=off", "{f}",
                                   "4M"], "pattern"]),
    "vhdx-fixed.vhdx": ("vhdx", [["create", "-f", "vhdx", "-o", "subformat=fixed,block_size=1M",
                                  "{f}", "4M"], "pattern"]),
    "vmdk-sparse.vmdk": ("vmdk", [["create", "-f", "vmdk", "{f}", "4M"], "pattern"]),
    "vmdk-zeroed.vmdk": ("vmdk", [["create", "-f", "vmdk", "-o", "zeroed_grain=on", "{f}", "4M"],
                                  "pattern", ["io", "write -z 2m 64k"]]),
    "vmdk-flat.vmdk": ("vmdk", [["create", "-f", "vmdk", "-o", "subformat=monolithicFlat", "{f}",
                                 "4M"], "pattern"]),
    "vmdk-2gsparse.vmdk": ("vmdk", [["create", "-f", "vmdk", "-o",
                                     "subformat=twoGbMaxExtentSparse", "{f}", "4M"], "pattern"]),
    "vmdk-2gflat.vmdk": ("vmdk", [["create", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentFlat",
                                   "{f}", "4M"], "pattern"]),
    "vmdk-stream.vmdk": ("vmdk", [["convert", "-f", "raw", "-O", "vmdk", "-o",
                                   "subformat=streamOptimized", "ref.raw", "{f}"]]),
    "vmdk-lsilogic.vmdk": ("vmdk", [["create", "-f", "vmdk", "-o",
                                     "adapter_type=lsilogic,hwversion=7", "{f}", "4M"]]),
    "vmdk-child.vmdk": ("vmdk", [["create", "-f", "vmdk", "-b", "vmdk-sparse.vmdk", "-F", "vmdk",
                                  "{f}"], ["io", "write -P 0xdd 2m 4k"]]),
    "parallels.hds": ("parallels", [["create", "-f", "parallels", "{f}", "4M"], "pattern"]),
    "bochs-growing.img": ("bochs", [["copy"]]),
    "cloop.cloop": ("cloop", [["copy"]]),
    "udif.dmg": ("dmg", [["copy"]]),
    "parallels-64k.hds": ("parallels", [["create", "-f", "parallels", "-o", "cluster_size=64k",
                                         "{f}", "4M"], "pattern"]),
}


def make_sample(out: Path, name: str) -> tuple[str, str]:
    """Make one sample (and ref.raw, and what it depends on) in ``out``."""
    ref = out / "ref.raw"
    if not ref.exists():
        run("qemu-img", "create", "-q", "-f", "raw", str(ref), "4M")
        io_run(str(ref), "raw", *pattern_cmds())
    fmt, steps = SAMPLES[name]
    path = out / name
    if path.exists():
        return str(path), fmt
    if name == "vmdk-child.vmdk":
        make_sample(out, "vmdk-sparse.vmdk")
    for step in steps:
        if step == "pattern":
            io_run(str(path), fmt, *pattern_cmds())
        elif step[0] == "copy":
            import shutil
            shutil.copy(DATA / name, path)
        elif step[0] == "io":
            io_run(str(path), fmt, *step[1:])
        else:
            args = [a.replace("{f}", name) for a in step]
            tolerant = args[0].endswith("!")
            cmd = ["qemu-img", args[0].rstrip("!"), "-q"] + args[1:]
            proc = run(*cmd, cwd=str(out), check=False)
            if proc.returncode != 0 and not (tolerant and path.exists()):
                pytest.fail(f"{' '.join(cmd)}: {proc.stderr.strip()}")
    return str(path), fmt
