"""``make demo``: the main job end to end, with a short human report.

Boots a real Linux guest (the same one the e2e tests use: Debian kernel,
host root over 9p, an ext4 data disk on qcow2, a writer keeping it busy, the
project's qga on its virtio-serial port), runs ``quiesce backup`` against it
and proves the result, then prints: disks, sizes, freeze window, copy
throughput and every verification. The guest machinery lives in the source
checkout's tests/e2e; the demo runs from a checkout.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def main() -> int:
    e2e = REPO / "tests" / "e2e"
    if not (e2e / "e2e_proof.py").exists():
        print("quiesce demo: needs a source checkout (tests/e2e holds the guest builder)")
        return 1
    sys.path.insert(0, str(e2e))
    from guest import GuestError, GuestUnavailable, kvm_usable
    from guest_build import ensure_guest_image
    from e2e_proof import run_proof

    print("quiesce demo: back up a running guest while it writes, then prove the backup")
    agent, agent_text = "qga", "qga (the project's agent)"
    try:
        image = ensure_guest_image()
    except GuestUnavailable as exc:
        print(f"  cannot build the guest: {exc}")
        return 1
    with tempfile.TemporaryDirectory(prefix="quiesce-demo-") as tmp:
        try:
            report = run_proof(Path(tmp), agent=agent, disk_size="256M", image=image)
        except (GuestError, GuestUnavailable) as exc:
            print(f"  FAILED: {exc}")
            return 1
        m = report.manifest
        accel = "KVM" if kvm_usable() else "TCG"
        print(f"  guest    Linux {image.kernel_release} under {accel}, booted in "
              f"{report.boot_seconds:.1f} s; agent {agent_text}")
        for d in m["disks"]:
            size = (report.backup_dir / d["file"]).stat().st_size
            rate = d["virtual_size"] / d["copy_seconds"] if d["copy_seconds"] else 0
            print(f"  disk     {d['name']} ({d['source_format']}, node {d['node']}): "
                  f"{_human(d['virtual_size'])} virtual -> {d['file']} {_human(size)}")
            print(f"  copy     {_human(d['virtual_size'])} in {d['copy_seconds']:.2f} s "
                  f"({_human(rate)}/s of guest-visible bytes), sha256 {d['sha256'][:16]}...")
        print(f"  freeze   guest frozen {m['freeze_window_ms']:.0f} ms "
              f"(snapshot {m['snapshot_ms']:.1f} ms), {m['frozen_filesystems']} filesystem; "
              f"whole backup {report.backup_seconds:.1f} s")
        for line in report.checks:
            print(f"  ok       {line}")
        print(f"  backup   {report.backup_dir} (removed at exit)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
