"""Freeze window and copy throughput of ``quiesce backup`` on a real guest.

For each data disk size (256 MiB and 4 GiB by default), boots the test guest
(tests/e2e: Debian kernel, ext4 data disk on qcow2, prefilled with files, a
writer keeping it busy, the agent on its virtio-serial port) and takes N
backups (20 by default) in a row while the writer writes. Reports the median,
min and max freeze window (freeze sent -> thaw answered) and snapshot time,
and the copy throughput of the project's engine against ``qemu-img convert
-O qcow2`` of the same, then stable, base image in the same run (measured
between the engine's copy and the commit back; both copies fsynced, as a
backup must be before it is verified).

Targets (issue 6): median freeze window <= 100 ms under TCG, independent of
disk size; engine throughput >= 0.9x qemu-img's.

    .venv/bin/python bench/freeze_window.py [--runs 20] [--sizes 256M,4G]
        [--agent qga|qemu-ga] [--copier engine|qemu-img] [--fill 0.4]

``--copier qemu-img`` copies with qemu-img instead of the engine (to measure
the freeze window before the engine exists; throughput is then not a
comparison). Results also go to bench/results/freeze_window.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests" / "e2e"), str(REPO / "tests" / "hostclient")]

from guest import DataDisk, GuestSpec, boot_guest, kvm_usable  # noqa: E402
from guest_build import ensure_guest_image  # noqa: E402

import hostclient.backup as backup_mod  # noqa: E402
from hostclient.backup import run_backup  # noqa: E402
from hostclient.config import BackupConfig  # noqa: E402

MiB = 1 << 20


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def prefilled_disk(path: Path, size: int, fill: float) -> Path:
    """An ext4 qcow2 image of ``size`` whose filesystem is ``fill`` full of
    files: half random (incompressible), half repetitive text."""
    with tempfile.TemporaryDirectory(prefix="fw-src-", dir=path.parent) as src:
        remaining = int(size * fill)
        n = 0
        while remaining > 0:
            chunk = min(remaining, 8 * MiB)
            data = os.urandom(chunk) if n % 2 == 0 else (b"quiesce bench %08d\n" % n) * (chunk // 23)
            Path(src, f"prefill-{n:05d}.bin").write_bytes(data)
            remaining -= chunk
            n += 1
        raw = path.with_suffix(".raw")
        subprocess.run(["truncate", "-s", str(size), str(raw)], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", src, str(raw)], check=True)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True)
    raw.unlink()
    return path


class CopyMeter:
    """Wraps the backup's copy: after each engine copy, while the base is
    still stable (before the commit back), time qemu-img on the same base."""

    def __init__(self, copier: str, scratch: Path) -> None:
        self.scratch = scratch
        self.engine_seconds: list[float] = []
        self.bytes: list[int] = []
        self.pairs: list[tuple[int, float, float]] = []   # (bytes, engine s, qemu-img s)
        self.measure_reference = False
        if copier == "qemu-img":
            from hc_engine_double import QemuImgEngine
            self._copy = QemuImgEngine("qemu-img").copy_image
        else:
            self._copy = backup_mod.copy_image

    def __call__(self, source, source_format, target, **kw):
        stats = self._copy(source, source_format, target, **kw)
        self.engine_seconds.append(stats.seconds)
        self.bytes.append(stats.virtual_size)
        if self.measure_reference:
            ref = self.scratch / "reference.qcow2"
            started = time.monotonic()
            subprocess.run(["qemu-img", "convert", "-f", source_format, "-O", "qcow2", source,
                            str(ref)], check=True)
            # the engine's copy is fsynced before it returns (a backup must be
            # on disk before it is verified and recorded); qemu-img convert
            # does not flush, so its copy is fsynced here the same way
            fd = os.open(ref, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            self.pairs.append((stats.virtual_size, stats.seconds, time.monotonic() - started))
            ref.unlink()
        return stats


def bench_size(size: int, args: argparse.Namespace, image, workdir: Path) -> dict:
    disk = prefilled_disk(workdir / f"data-{size}.qcow2", size, args.fill)
    spec = GuestSpec(agent=args.agent, disks=(DataDisk(disk),), writer_dir="/data/w",
                     writer_args=("--pause", "0.005", "--max-size", str(128 * 1024)))
    meter = CopyMeter(args.copier, workdir)
    backup_mod.copy_image = meter
    if args.copier == "qemu-img":
        from hc_engine_double import QemuImgEngine
        double = QemuImgEngine("qemu-img")
        backup_mod.verify_copy = double.verify_copy
        backup_mod.content_sha256 = double.content_sha256
    windows, snapshots, freezes, thaws, totals = [], [], [], [], []
    with boot_guest(spec, image=image) as guest:
        guest.wait_writer(10)
        for run in range(args.runs):
            meter.measure_reference = run % max(1, args.runs // args.reference_runs) == 0
            target = workdir / "backups"
            started = time.monotonic()
            result = run_backup(BackupConfig(target_dir=target, qmp=str(guest.qmp_socket),
                                             agent=str(guest.agent_socket)))
            totals.append(time.monotonic() - started)
            m = result.manifest
            if result.exit_code != 0 or not m.quiesced:
                raise SystemExit(f"backup {run} failed ({result.exit_code}): {m and m.errors}")
            windows.append(m.freeze_window_ms)
            snapshots.append(m.snapshot_ms)
            freezes.append(m.freeze_ms)
            thaws.append(m.thaw_ms)
            subprocess.run(["rm", "-rf", str(result.directory)], check=True)
            print(f"  {size // MiB:>5} MiB run {run + 1:>2}: frozen {m.freeze_window_ms:6.1f} ms "
                  f"(freeze {m.freeze_ms:5.1f}, snapshot {m.snapshot_ms:5.1f}, thaw {m.thaw_ms:5.1f} ms)"
                  f", backup {totals[-1]:.2f} s", flush=True)
        writes = guest.writer_progress()
    engine_rate = sum(meter.bytes) / sum(meter.engine_seconds)
    paired_bytes = sum(b for b, _, _ in meter.pairs)
    eng_rate_same = paired_bytes / sum(e for _, e, _ in meter.pairs) if meter.pairs else 0.0
    ref_rate = paired_bytes / sum(q for _, _, q in meter.pairs) if meter.pairs else 0.0
    return {
        "disk_bytes": size, "runs": args.runs, "agent": args.agent, "copier": args.copier,
        "freeze_ms": {"median": statistics.median(windows), "min": min(windows),
                      "max": max(windows), "all": windows},
        "snapshot_ms_median": statistics.median(snapshots),
        "freeze_cmd_ms_median": statistics.median(freezes),
        "thaw_cmd_ms_median": statistics.median(thaws),
        "backup_seconds_median": statistics.median(totals),
        "copy_MiBps": engine_rate / MiB,
        "copy_vs_qemu_img": {"engine_MiBps": eng_rate_same / MiB, "qemu_img_MiBps": ref_rate / MiB,
                             "ratio": eng_rate_same and ref_rate and (eng_rate_same / ref_rate)},
        "writer_files": writes,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--sizes", default="256M,4G")
    parser.add_argument("--agent", default="qga", choices=("qga", "qemu-ga"))
    parser.add_argument("--copier", default="engine", choices=("engine", "qemu-img"))
    parser.add_argument("--fill", type=float, default=0.25,
                        help="fraction of each disk prefilled with files (default 0.25)")
    parser.add_argument("--reference-runs", type=int, default=3,
                        help="how many runs also time qemu-img convert (default 3)")
    args = parser.parse_args()
    image = ensure_guest_image()
    accel = "KVM" if kvm_usable() else "TCG"
    print(f"freeze window bench: {args.runs} backups per disk, agent {args.agent}, "
          f"copier {args.copier}, {accel}")
    results = []
    with tempfile.TemporaryDirectory(prefix="freeze-bench-", dir="/var/tmp") as tmp:
        for text in args.sizes.split(","):
            results.append(bench_size(parse_size(text), args, image, Path(tmp)))
    print()
    print(f"{'disk':>8} {'window median':>14} {'min':>7} {'max':>7} {'freeze':>7} {'snapshot':>9} "
          f"{'thaw':>6} {'engine MiB/s':>13} {'qemu-img MiB/s':>15} {'ratio':>6}")
    for r in results:
        c = r["copy_vs_qemu_img"]
        print(f"{r['disk_bytes'] // MiB:>5} MiB {r['freeze_ms']['median']:>11.1f} ms "
              f"{r['freeze_ms']['min']:>7.1f} {r['freeze_ms']['max']:>7.1f} "
              f"{r['freeze_cmd_ms_median']:>7.1f} {r['snapshot_ms_median']:>6.1f} ms "
              f"{r['thaw_cmd_ms_median']:>6.1f} {c['engine_MiBps']:>13.1f} "
              f"{c['qemu_img_MiBps']:>15.1f} {c['ratio']:>6.2f}")
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "freeze_window.json").write_text(json.dumps({"accel": accel, "results": results},
                                                       indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
