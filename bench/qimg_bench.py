"""qimg against qemu-img, measured in the same run on the same images.

    python bench/qimg_bench.py [--size 1G] [--repeat 5] [--workdir DIR] [--keep]
                               [--only CASE,...] [--qimg PROGRAM] [--no-large]

Builds (with the real qemu-img and qemu-io, so neither tool makes its own
input):

* ``mix.raw``: SIZE bytes of mixed content per MiB: 40 % random, 40 %
  compressible text, 10 % mostly zero, 10 % holes; ``mix.qcow2`` its
  qemu-img conversion;
* ``frag.qcow2``: the issue's fragmented image: 64 KiB clusters, 20,480 of
  them allocated in random order over 1.25 GiB;
* ``bigfrag.qcow2`` (unless ``--no-large``): 204,800 16 KiB clusters
  (3.1 GiB) written in random order, so that the per-cluster speed of
  check, map and convert shows and is not hidden by process start-up
  (qemu-img needs a few milliseconds for ``frag.qcow2``, the interpreter
  alone more). 16 KiB rather than 64 KiB clusters keep it to 3 GiB of disk;
  both tools open it with ``--image-opts`` and caches that hold all its
  tables (qemu-img's defaults do not, see ``cases``).

Then times each case with both tools, taking turns (best of ``--repeat``
runs each, after ``os.sync()`` so that writeback of the previous run does
not land on the next; the inputs are in the page cache, outputs are written
without fsync as both tools' convert does by default). Outputs of the two
tools are checked to agree (``qemu-img compare`` or identical stdout) so a
fast wrong answer does not count. qimg runs with its bytecode cached, as an
installed package has it (PYTHONDONTWRITEBYTECODE is dropped and one
untimed run per case comes first). ``info`` start-up is compared with a
bare ``python -c pass`` of the same interpreter (median and minimum of many
runs, interleaved).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def qimg_command(given: str | None = None) -> list[str]:
    if given:
        return [given]
    script = Path(sys.executable).parent / "qimg"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "imagetools"]


def interpreter_of(qimg: list[str]) -> str:
    """The Python that runs ``qimg`` (its ``#!`` line), for the start-up baseline."""
    try:
        first = Path(qimg[0]).read_bytes()[:200].split(b"\n", 1)[0]
    except OSError:
        return sys.executable
    if first.startswith(b"#!") and b"python" in first:
        return first[2:].decode().strip().split()[0]
    return sys.executable


def env() -> dict[str, str]:
    """Bytecode caching on, C locale."""
    out = dict(os.environ, PYTHONPATH=str(ROOT), LC_ALL="C")
    out.pop("PYTHONDONTWRITEBYTECODE", None)
    return out


def run(argv: list[str], cwd: Path, check: bool = True, stdin=None) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, stdin=stdin, timeout=3600,
                          env=env())
    if check and proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(argv)}\n{proc.stderr.decode(errors='replace')}")
    return proc


def timed(argv: list[str], cwd: Path, before=None, ok_codes=(0,)) -> float:
    """Wall time of one run (a blocking wait: subprocess.run's timeout polling
    would round short runs up)."""
    if before is not None:
        before()
    os.sync()
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=env())
    _, err = proc.communicate()
    elapsed = time.perf_counter() - start
    if proc.returncode not in ok_codes:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(argv)}\n"
                         f"{err.decode(errors='replace')}")
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


def make_frag(qemu_img: str, qemu_io: str, work: Path, name: str, clusters: int,
              cluster_size: int, seed: int = 7) -> None:
    """``clusters`` clusters written in random order over 4/3 as many."""
    total = clusters * 4 // 3
    run([qemu_img, "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}", name,
         str(total * cluster_size)], work)
    rng = random.Random(seed)
    order = list(range(total))
    rng.shuffle(order)
    script = "\n".join(f"write -P {n % 250 + 1} {c * cluster_size} {cluster_size}"
                       for n, c in enumerate(order[:clusters])) + "\n"
    (work / f"{name}.cmds").write_text(script)
    with open(work / f"{name}.cmds", "rb") as commands:
        run([qemu_io, "-t", "unsafe", "-f", "qcow2", name], work, stdin=commands)
    (work / f"{name}.cmds").unlink()


def startup(qimg: list[str], python: str, work: Path, rounds: int = 40) -> dict[str, list[float]]:
    """Seconds of ``python -c pass``, ``qimg info`` and ``qemu-img info`` (a small
    qcow2), the three interleaved so that load changes hit all of them."""
    cmds = {"pass": [python, "-c", "pass"], "qimg": qimg + ["info", "small.qcow2"],
            "qemu-img": ["qemu-img", "info", "small.qcow2"]}
    samples: dict[str, list[float]] = {k: [] for k in cmds}
    for argv in cmds.values():            # warm: bytecode written, files cached
        subprocess.run(argv, cwd=work, stdout=subprocess.DEVNULL, env=env())
    for _ in range(rounds):
        for key, argv in cmds.items():
            start = time.perf_counter()
            subprocess.Popen(argv, cwd=work, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=env()).wait()
            samples[key].append(time.perf_counter() - start)
    return samples


def cases(large: bool) -> list[tuple]:
    """(name, argv template, output template or None, accepted exit codes)."""
    out = [
        ("convert qcow2->raw", ["convert", "-O", "raw", "mix.qcow2", "{out}.raw"], "{out}.raw"),
        ("convert raw->qcow2", ["convert", "-f", "raw", "-O", "qcow2", "mix.raw",
                                "{out}.qcow2"], "{out}.qcow2"),
        ("convert raw->qcow2 -c", ["convert", "-c", "-f", "raw", "-O", "qcow2", "mix.raw",
                                   "{out}.qcow2"], "{out}.qcow2"),
        ("compare qcow2 raw", ["compare", "mix.qcow2", "mix.raw"], None),
        ("check (fragmented)", ["check", "frag.qcow2"], None),
        ("map --output=json (fragmented)", ["map", "--output=json", "frag.qcow2"], None),
        ("convert fragmented->raw", ["convert", "-O", "raw", "frag.qcow2", "{out}.raw"],
         "{out}.raw"),
        ("convert fragmented->qcow2", ["convert", "-O", "qcow2", "frag.qcow2", "{out}.qcow2"],
         "{out}.qcow2"),
    ]
    if large:
        # qemu-img's default L2 and refcount caches are too small for this
        # image and it then reads tables again and again (170,000 preads for a
        # check): the large cases give it caches that hold every table, so
        # that per-cluster speed is compared; one check keeps the defaults
        big = ["--image-opts", "driver=qcow2,file.filename=bigfrag.qcow2,"
               "l2-cache-size=64M,refcount-cache-size=16M"]
        out += [
            ("check (200k clusters, default caches)", ["check", "bigfrag.qcow2"], None),
            ("check (200k clusters)", ["check", *big], None),
            ("map --output=json (200k clusters)", ["map", "--output=json", *big], None),
            ("map human (200k clusters)", ["map", *big], None),
            ("convert 200k clusters->raw", ["convert", "-O", "raw", *big, "{out}.raw"],
             "{out}.raw"),
            ("convert 200k clusters->qcow2", ["convert", "-O", "qcow2", *big, "{out}.qcow2"],
             "{out}.qcow2"),
        ]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1G", help="mixed image size (default 1G)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--workdir", help="keep the built images here (reused when present)")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--only", help="comma-separated case names (or 'startup'); "
                        "a comma followed by a space is part of a name")
    parser.add_argument("--qimg", help="the qimg program to time (default: the venv's qimg)")
    parser.add_argument("--no-large", action="store_true", help="skip the 200k-cluster image")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from imagetools.sizes import parse_size
    size = parse_size(args.size) // MiB * MiB
    qemu_img = shutil.which("qemu-img")
    qemu_io = shutil.which("qemu-io")
    if not qemu_img or not qemu_io:
        print("qemu-img and qemu-io are needed (Debian package qemu-utils)", file=sys.stderr)
        return 2
    qimg = qimg_command(args.qimg)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="qimg-bench-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if not (work / "mix.raw").exists() or (work / "mix.raw").stat().st_size != size:
            print(f"building mix.raw ({size // MiB} MiB) ...", file=sys.stderr)
            make_mix(work / "mix.raw", size)
            run([qemu_img, "convert", "-f", "raw", "-O", "qcow2", "mix.raw", "mix.qcow2"], work)
        if not (work / "frag.qcow2").exists():
            print("building frag.qcow2 (20,480 64 KiB clusters in random order) ...",
                  file=sys.stderr)
            make_frag(qemu_img, qemu_io, work, "frag.qcow2", 20480, 65536)
        if not args.no_large and not (work / "bigfrag.qcow2").exists():
            print("building bigfrag.qcow2 (204,800 16 KiB clusters in random order) ...",
                  file=sys.stderr)
            make_frag(qemu_img, qemu_io, work, "bigfrag.qcow2", 204800, 16384)
        run([qemu_img, "create", "-q", "-f", "qcow2", "small.qcow2", "64M"], work)

        def rm(*names: str):
            return lambda: [(work / n).unlink(missing_ok=True) for n in names]

        todo = cases(not args.no_large)
        # names are split at commas not followed by a space: case names
        # such as "check (200k clusters, default caches)" hold ", "
        wanted = set(re.split(r",(?! )", args.only)) if args.only else None
        if wanted is not None:
            todo = [c for c in todo if c[0] in wanted]
        rows = []
        tools = [("qemu-img", [qemu_img]), ("qimg", qimg)]
        for name, template, output in todo:
            times: dict[str, list[float]] = {"qemu-img": [], "qimg": []}
            for tool, prefix in tools:            # untimed: caches, bytecode
                tag = "ref" if tool == "qemu-img" else "ours"
                timed(prefix + [a.format(out=tag) for a in template], work,
                      rm(output.format(out=tag)) if output else None)
            for round_ in range(args.repeat):
                # alternate who goes first: page-cache state favours neither
                for tool, prefix in (tools if round_ % 2 == 0 else tools[::-1]):
                    tag = "ref" if tool == "qemu-img" else "ours"
                    argv = prefix + [a.format(out=tag) for a in template]
                    cleanup = rm(output.format(out=tag)) if output else None
                    times[tool].append(timed(argv, work, cleanup))
            if output:
                same = run([qemu_img, "compare", output.format(out="ref"),
                            output.format(out="ours")], work, check=False).returncode == 0
                rm(output.format(out="ref"), output.format(out="ours"))()
            else:
                a = run([qemu_img] + template, work, check=False).stdout
                b = run(qimg + template, work, check=False).stdout
                same = a == b
            ref, ours = min(times["qemu-img"]), min(times["qimg"])
            rows.append((name, ref, ours, ours / ref, same))
            print(f"{name}: qemu-img {ref:.3f}s qimg {ours:.3f}s ratio {ours / ref:.2f} "
                  f"{'same result' if same else 'RESULTS DIFFER'}", file=sys.stderr)
        python = interpreter_of(qimg)
        starts = startup(qimg, python, work) if wanted is None or "startup" in wanted else None
        load = os.getloadavg()[0]
        print(f"\n{size // MiB} MiB mixed image; best of {args.repeat} (after one untimed run); "
              f"{os.cpu_count()} CPUs, load average {load:.1f}; qimg: {' '.join(qimg)}; "
              f"{time.strftime('%Y-%m-%d %H:%M')}\n")
        if rows:
            print("| case | qemu-img (s) | qimg (s) | qimg / qemu-img | same result |")
            print("|---|---:|---:|---:|---|")
            for name, ref_t, ours_t, ratio, same in rows:
                print(f"| {name} | {ref_t:.3f} | {ours_t:.3f} | {ratio:.2f} | "
                      f"{'yes' if same else 'NO'} |")
        if starts is not None:
            base_med, base_min = statistics.median(starts["pass"]), min(starts["pass"])
            print("\n| start-up | median (s) | vs `python -c pass` | minimum (s) | vs `python -c pass` |")
            print("|---|---:|---:|---:|---:|")
            for key, label in (("pass", f"`{python} -c pass`"), ("qimg", "`qimg info` (qcow2)"),
                               ("qemu-img", "`qemu-img info` (qcow2)")):
                med, low = statistics.median(starts[key]), min(starts[key])
                print(f"| {label} | {med:.4f} | {med / base_med:.2f} | {low:.4f} | "
                      f"{low / base_min:.2f} |")
        return 0
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
