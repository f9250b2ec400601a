"""qimg against qemu-img, measured in the same run on the same images.

    python bench/qimg_bench.py [--size 1G] [--repeat 3] [--workdir DIR] [--keep]

Builds (with the real qemu-img and qemu-io, so neither tool makes its own
input):

* ``mix.raw``: SIZE bytes of mixed content per MiB: 40 % random, 40 %
  compressible text, 10 % mostly zero, 10 % holes; ``mix.qcow2`` its
  qemu-img conversion;
* ``frag.qcow2``: 64 KiB clusters, at least 20,000 of them allocated in
  random order (so the host layout is fragmented).

Then times each case with both tools (best of ``--repeat`` runs, after a
``sync`` so that writeback of the previous run does not land on the next)
and prints a Markdown table with the ratio qimg/qemu-img. Outputs of the
two tools are checked to agree (``qemu-img compare``) so a fast wrong
answer does not count. ``info`` start-up is compared with a bare
``python -c pass`` of the same interpreter (median of many runs).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def qimg_command() -> list[str]:
    script = Path(sys.executable).parent / "qimg"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "imagetools"]


def run(argv: list[str], cwd: Path, check: bool = True, stdin=None) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, stdin=stdin, timeout=3600,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if check and proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(argv)}\n{proc.stderr.decode(errors='replace')}")
    return proc


def timed(argv: list[str], cwd: Path, before=None, ok_codes=(0,)) -> float:
    if before is not None:
        before()
    os.sync()
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          timeout=3600, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    elapsed = time.perf_counter() - start
    if proc.returncode not in ok_codes:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(argv)}\n"
                         f"{proc.stderr.decode(errors='replace')}")
    return elapsed


def make_mix(path: Path, size: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz ") for _ in range(rng.randint(2, 9)))
             for _ in range(2000)]

    def text(n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            out += b" ".join(rng.choices(words, k=300)) + b"\n"
        return bytes(out[:n])

    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(size // MiB):
            kind = i % 10
            f.seek(i * MiB)
            if kind < 4:
                f.write(rng.randbytes(MiB))
            elif kind < 8:
                f.write(text(MiB))
            elif kind == 8:
                f.write(bytes(MiB // 2) + rng.randbytes(4096))


def make_frag(qemu_img: str, qemu_io: str, work: Path, clusters: int = 20480,
              seed: int = 7) -> None:
    total = clusters * 4 // 3
    run([qemu_img, "create", "-q", "-f", "qcow2", "frag.qcow2", str(total * 65536)], work)
    rng = random.Random(seed)
    order = list(range(total))
    rng.shuffle(order)
    script = "\n".join(f"write -P {n % 250 + 1} {c * 65536} 64k"
                       for n, c in enumerate(order[:clusters])) + "\n"
    (work / "frag.cmds").write_text(script)
    with open(work / "frag.cmds", "rb") as commands:
        run([qemu_io, "-t", "unsafe", "-f", "qcow2", "frag.qcow2"], work, stdin=commands)


def best(times: list[float]) -> float:
    return min(times)


def startup(qimg: list[str], work: Path, rounds: int = 30) -> tuple[float, float, float]:
    """Median seconds of ``python -c pass``, ``qimg info`` (qcow2) and ``qemu-img info``."""
    def median(argv: list[str]) -> float:
        samples = []
        for _ in range(rounds):
            start = time.perf_counter()
            subprocess.run(argv, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)
    bare = median([sys.executable, "-c", "pass"])
    ours = median(qimg + ["info", "small.qcow2"])
    ref = median(["qemu-img", "info", "small.qcow2"])
    return bare, ours, ref


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1G", help="mixed image size (default 1G)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--only", help="comma-separated case names")
    args = parser.parse_args()
    from imagetools.sizes import parse_size
    size = parse_size(args.size) // MiB * MiB
    qemu_img = shutil.which("qemu-img")
    qemu_io = shutil.which("qemu-io")
    if not qemu_img or not qemu_io:
        print("qemu-img and qemu-io are needed (Debian package qemu-utils)", file=sys.stderr)
        return 2
    qimg = qimg_command()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="qimg-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if not (work / "mix.raw").exists() or (work / "mix.raw").stat().st_size != size:
            print(f"building mix.raw ({size // MiB} MiB) ...", file=sys.stderr)
            make_mix(work / "mix.raw", size)
            run([qemu_img, "convert", "-f", "raw", "-O", "qcow2", "mix.raw", "mix.qcow2"], work)
        if not (work / "frag.qcow2").exists():
            print("building frag.qcow2 (20480 clusters in random order) ...", file=sys.stderr)
            make_frag(qemu_img, qemu_io, work)
        run([qemu_img, "create", "-q", "-f", "qcow2", "small.qcow2", "64M"], work)

        def rm(*names: str):
            return lambda: [(work / n).unlink(missing_ok=True) for n in names]

        cases = [
            ("convert qcow2->raw", ["convert", "-O", "raw", "mix.qcow2", "{out}.raw"], "{out}.raw",
             (0,)),
            ("convert raw->qcow2", ["convert", "-f", "raw", "-O", "qcow2", "mix.raw",
                                    "{out}.qcow2"], "{out}.qcow2", (0,)),
            ("convert raw->qcow2 -c", ["convert", "-c", "-f", "raw", "-O", "qcow2", "mix.raw",
                                       "{out}.qcow2"], "{out}.qcow2", (0,)),
            ("compare qcow2 raw", ["compare", "mix.qcow2", "mix.raw"], None, (0,)),
            ("check (fragmented)", ["check", "frag.qcow2"], None, (0,)),
            ("map --output=json (fragmented)", ["map", "--output=json", "frag.qcow2"], None, (0,)),
            ("convert fragmented->raw", ["convert", "-O", "raw", "frag.qcow2", "{out}.raw"],
             "{out}.raw", (0,)),
            ("convert fragmented->qcow2", ["convert", "-O", "qcow2", "frag.qcow2",
                                           "{out}.qcow2"], "{out}.qcow2", (0,)),
        ]
        if args.only:
            wanted = set(args.only.split(","))
            cases = [c for c in cases if c[0] in wanted]
        rows = []
        for name, template, output, ok in cases:
            times = {"qemu-img": [], "qimg": []}
            tools = [("qemu-img", [qemu_img]), ("qimg", qimg)]
            for round_ in range(args.repeat):
                # alternate who goes first: page-cache state favours neither
                for tool, prefix in (tools if round_ % 2 == 0 else tools[::-1]):
                    tag = "ref" if tool == "qemu-img" else "ours"
                    argv = prefix + [a.format(out=tag) for a in template]
                    cleanup = rm(output.format(out=tag)) if output else None
                    times[tool].append(timed(argv, work, cleanup, ok))
            if output:
                same = run([qemu_img, "compare", output.format(out="ref"),
                            output.format(out="ours")], work, check=False).returncode == 0
                rm(output.format(out="ref"), output.format(out="ours"))()
            else:
                a = run([qemu_img] + template, work, check=False).stdout
                b = run(qimg + template, work, check=False).stdout
                same = a == b
            ref, ours = best(times["qemu-img"]), best(times["qimg"])
            rows.append((name, ref, ours, ours / ref, same))
            print(f"{name}: qemu-img {ref:.3f}s qimg {ours:.3f}s ratio {ours / ref:.2f} "
                  f"{'same result' if same else 'RESULTS DIFFER'}", file=sys.stderr)
        bare, ours, ref = startup(qimg, work)
        print(f"\n{size // MiB} MiB mixed image; best of {args.repeat}; "
              f"{os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d')}\n")
        print("| case | qemu-img (s) | qimg (s) | qimg / qemu-img | same result |")
        print("|---|---:|---:|---:|---|")
        for name, ref_t, ours_t, ratio, same in rows:
            print(f"| {name} | {ref_t:.3f} | {ours_t:.3f} | {ratio:.2f} | "
                  f"{'yes' if same else 'NO'} |")
        print("\n| start-up | seconds (median) | vs `python -c pass` |")
        print("|---|---:|---:|")
        print(f"| `{Path(sys.executable).name} -c pass` | {bare:.4f} | 1.00 |")
        print(f"| `qimg info` (qcow2) | {ours:.4f} | {ours / bare:.2f} |")
        print(f"| `qemu-img info` (qcow2) | {ref:.4f} | {ref / bare:.2f} |")
        return 0
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
