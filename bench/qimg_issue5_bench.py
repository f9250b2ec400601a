"""qimg against qemu-img for the commands that change images (issue 5).

    python bench/qimg_issue5_bench.py [--repeat 5] [--workdir DIR] [--keep] [--qimg PROGRAM]

Builds every input with the real qemu-img and qemu-io, then times both
tools on fresh copies of the same images (best of ``--repeat`` runs, a
``sync`` and the copy before each run are not timed) and prints a Markdown
table with the ratio qimg/qemu-img:

* commit: a 256 MiB overlay (64 KiB clusters, data scattered over 1 GiB)
  into a 1 GiB base full of data;
* safe rebase: a 1 GiB overlay with 64 MiB of its own data from one 1 GiB
  base onto another that differs in a quarter of its clusters;
* snapshot -c and -a on a 1 GiB image full of data (-a: after 128 MiB
  were rewritten);
* check -r all on a fragmented 1 GiB image (20,000 clusters written in
  random order) with leaked clusters, once where refcounts can be fixed in
  place and once where a refcount of 0 needs the refcount structure rebuilt.

After each timed run the result is judged with qemu-img (check clean,
content equal to what the other tool produced), so a fast wrong answer
does not count. qimg runs with its bytecode cached (PYTHONDONTWRITEBYTECODE
dropped; the first of the runs writes it). With ``--workdir`` the built
images are kept there and reused by the next run.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
GiB = 1 << 30


QIMG: list[str] = []


def qimg_command() -> list[str]:
    if QIMG:
        return QIMG
    script = Path(sys.executable).parent / "qimg"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "imagetools"]


def run(argv: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, timeout=3600,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), LC_ALL="C"))
    if check and proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(argv)}\n{proc.stderr.decode(errors='replace')}")
    return proc


def qemu_io(cwd: Path, image: str, commands: list[str]) -> None:
    for k in range(0, len(commands), 200):
        argv = ["qemu-io", "-f", "qcow2"]
        for c in commands[k:k + 200]:
            argv += ["-c", c]
        run(argv + [image], cwd)


class Case:
    def __init__(self, name: str, files: list[str], argv: list[str], judge: list[str]) -> None:
        self.name = name
        self.files = files          # copied fresh from the template before every run
        self.argv = argv            # after the program name
        self.judge = judge          # the image whose content both tools must agree on


def build(work: Path) -> list[Case]:
    t = work / "template"
    if not (t / "done").exists():
        if t.exists():
            shutil.rmtree(t)
        t.mkdir()
        make_images(t)
        (t / "done").write_text("ok\n")
    return CASES


def make_images(t: Path) -> None:
    rng = random.Random(7)
    # commit: base full of data, top with 256 MiB in 1 MiB pieces spread over 1 GiB
    run(["qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "1G"], t)
    qemu_io(t, "base.qcow2", [f"write -P 0x11 {i}M 16M" for i in range(0, 1024, 16)])
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
         "top.qcow2"], t)
    pieces = rng.sample(range(1024), 256)
    qemu_io(t, "top.qcow2", [f"write -P {1 + p % 250} {p}M 1M" for p in pieces])
    # rebase: other base differs in a quarter of its clusters
    run(["qemu-img", "create", "-q", "-f", "qcow2", "other.qcow2", "1G"], t)
    qemu_io(t, "other.qcow2", [f"write -P 0x11 {i}M 16M" for i in range(0, 1024, 16)] +
            [f"write -P 0x22 {i}M 64k" for i in range(0, 1024, 4)] +
            [f"write -P 0x23 {i * 256 + 64}k 64k" for i in range(0, 4096, 3)])
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
         "ovl.qcow2"], t)
    qemu_io(t, "ovl.qcow2", [f"write -P 0x33 {p}M 1M" for p in rng.sample(range(1024), 64)])
    # snapshots: a full 1 GiB image, and one with a snapshot and 128 MiB rewritten
    shutil.copy(t / "base.qcow2", t / "full.qcow2")
    shutil.copy(t / "base.qcow2", t / "snapped.qcow2")
    run(["qemu-img", "snapshot", "-c", "s1", "snapped.qcow2"], t)
    qemu_io(t, "snapped.qcow2", [f"write -P 0x44 {p}M 1M" for p in rng.sample(range(1024), 128)])
    # check -r all: a fragmented image with leaks, and a copy needing a rebuild
    run(["qemu-img", "create", "-q", "-f", "qcow2", "frag.qcow2", "1G"], t)
    clusters = rng.sample(range(16384), 20000 // 2) + rng.sample(range(16384), 20000 // 2)
    qemu_io(t, "frag.qcow2", [f"write -P {1 + c % 200} {c * 64}k 64k" for c in clusters])
    _break(t / "frag.qcow2", leaks=300, zero_refcount=False)
    shutil.copy(t / "frag.qcow2", t / "fragz.qcow2")
    _break(t / "fragz.qcow2", leaks=0, zero_refcount=True)


CASES = [
    Case("commit 256 MiB overlay into 1 GiB base", ["base.qcow2", "top.qcow2"],
         ["commit", "top.qcow2"], "base.qcow2"),
    Case("safe rebase, 1 GiB overlay onto another 1 GiB base",
         ["base.qcow2", "other.qcow2", "ovl.qcow2"],
         ["rebase", "-b", "other.qcow2", "-F", "qcow2", "ovl.qcow2"], "ovl.qcow2"),
    Case("snapshot -c, 1 GiB of data", ["full.qcow2"], ["snapshot", "-c", "s", "full.qcow2"],
         "full.qcow2"),
    Case("snapshot -a, 1 GiB, 128 MiB changed", ["snapped.qcow2"],
         ["snapshot", "-a", "s1", "snapped.qcow2"], "snapped.qcow2"),
    Case("check -r all, fragmented 1 GiB, 300 leaks", ["frag.qcow2"],
         ["check", "-r", "all", "frag.qcow2"], "frag.qcow2"),
    Case("check -r all, fragmented 1 GiB, refcount rebuild", ["fragz.qcow2"],
         ["check", "-r", "all", "fragz.qcow2"], "fragz.qcow2"),
]


def _break(path: Path, *, leaks: int, zero_refcount: bool) -> None:
    """Leak clusters (clear L2 entries) or zero a used cluster's refcount."""
    with open(path, "r+b") as f:
        head = f.read(72)
        l1_offset = struct.unpack_from(">Q", head, 40)[0]
        rt_offset = struct.unpack_from(">Q", head, 48)[0]
        f.seek(l1_offset)
        l2 = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        if leaks:
            f.seek(l2)
            entries = list(struct.unpack(">8192Q", f.read(65536)))
            done = 0
            for i, e in enumerate(entries):
                if e and done < leaks:
                    entries[i] = 0
                    done += 1
            f.seek(l2)
            f.write(struct.pack(">8192Q", *entries))
        if zero_refcount:
            f.seek(rt_offset)
            block = struct.unpack(">Q", f.read(8))[0]
            f.seek(block + 2 * 10)
            f.write(b"\0\0")


def _env() -> dict[str, str]:
    """Bytecode caching on (the first run of a case compiles, best-of-N drops it)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), LC_ALL="C")
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def timed(argv: list[str], cwd: Path) -> tuple[float, int]:
    """Wall time of one run. (A blocking wait: subprocess.run(timeout=...)
    polls with growing sleeps, which rounds short runs up to 8, 16, 32 ms.)"""
    os.sync()
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=_env())
    code = proc.wait()
    return time.perf_counter() - start, code


def measure(case: Case, work: Path, repeat: int) -> tuple[float, float]:
    """Best times of both tools; they take turns (the order alternates each
    round) so that a change of machine load hits both alike."""
    tools = [("qemu-img", ["qemu-img"]), ("qimg", qimg_command())]
    times: dict[str, list[float]] = {"qemu-img": [], "qimg": []}
    for round_ in range(repeat):
        for tool, prog in (tools if round_ % 2 == 0 else tools[::-1]):
            d = work / f"run-{tool}"
            if d.exists():
                shutil.rmtree(d)
            d.mkdir()
            for name in case.files:
                shutil.copy(work / "template" / name, d / name)
            elapsed, rc = timed(prog + case.argv, d)
            if rc != 0:
                raise SystemExit(f"{tool} {' '.join(case.argv)} exited {rc}")
            times[tool].append(elapsed)
    outputs = {}
    for tool, _ in tools:
        d = work / f"run-{tool}"
        check = run(["qemu-img", "check", case.judge], d, check=False)
        if check.returncode != 0:
            raise SystemExit(f"{tool}: qemu-img check {case.judge} after {case.name}: "
                             f"{check.stdout.decode()}{check.stderr.decode()}")
        out = d / "content.raw"
        run(["qemu-img", "convert", "-O", "raw", case.judge, str(out)], d)
        outputs[tool] = out
    if subprocess.run(["cmp", "-s", str(outputs["qemu-img"]), str(outputs["qimg"])]).returncode:
        raise SystemExit(f"{case.name}: the two tools left different content")
    for out in outputs.values():
        out.unlink()
    return min(times["qemu-img"]), min(times["qimg"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--workdir")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--qimg", help="the qimg program to time (default: the venv's qimg)")
    parser.add_argument("--only", help="comma-separated beginnings of case names "
                        "(e.g. 'safe rebase,commit')")
    args = parser.parse_args()
    if args.qimg:
        QIMG.append(args.qimg)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="qimg-issue5-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        cases = build(work)
        if args.only:
            cases = [c for c in cases if c.name.startswith(tuple(args.only.split(",")))]
        version = run(["qemu-img", "--version"], work).stdout.decode().splitlines()[0]
        start = timed(qimg_command() + ["--version"], work)[0]
        start = min(start, *(timed(qimg_command() + ["--version"], work)[0] for _ in range(5)))
        print(f"{version}; qimg via {' '.join(qimg_command())}; best of {args.repeat}; "
              f"qimg start-up (--version) {start * 1000:.0f} ms; {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f}; {time.strftime('%Y-%m-%d %H:%M')}\n")
        print("| case | qemu-img | qimg | qimg / qemu-img |")
        print("|---|---|---|---|")
        for case in cases:
            ref, ours = measure(case, work, args.repeat)
            print(f"| {case.name} | {ref:.3f} s | {ours:.3f} s | {ours / ref:.2f} |", flush=True)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
