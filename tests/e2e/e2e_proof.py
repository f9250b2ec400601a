"""The real proof of issue 6, shared by the e2e test and ``make demo``.

Boot a real guest whose agent is ``agent`` (qga or qemu-ga), with an ext4
data disk on a qcow2 image and a writer inside that keeps writing files with
checksums; run ``quiesce backup`` (the real command line) against it while it
writes; then prove the backup: ``qemu-img check``, ``e2fsck -fn`` on its
filesystem, every complete file against its checksum, ``quiesce verify``;
and prove the VM: still running and writing, back on its original image,
no overlay node or file left.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from guest import DataDisk, FsReport, GuestError, GuestSpec, boot_guest, make_ext4_qcow2, \
    raw_qmp, verify_ext4_backup
from guest_build import GuestImage


@dataclass
class ProofReport:
    agent: str
    boot_seconds: float
    disk_size: str
    manifest: dict
    backup_dir: Path
    backup_seconds: float
    fs: FsReport
    files_before: int
    files_after: int
    checks: list[str] = field(default_factory=list)


def quiesce(*argv: str, timeout: float = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hostclient", *argv], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)


def run_proof(workdir: Path, *, agent: str = "qga", disk_size: str = "128M",
              image: GuestImage | None = None, qemu: str = "qemu-system-x86_64",
              qemu_img: str = "qemu-img", writer_files: int = 5) -> ProofReport:
    """Boot, back up under write load, prove. Raises GuestError on any failed check."""
    disk = make_ext4_qcow2(workdir / "data.qcow2", disk_size, qemu_img)
    target = workdir / "backups"
    spec = GuestSpec(agent=agent, disks=(DataDisk(disk),), writer_dir="/data/w",
                     writer_args=("--pause", "0.01"))
    checks: list[str] = []
    with boot_guest(spec, qemu=qemu, image=image) as guest:
        guest.wait_writer(writer_files)
        files_before = guest.writer_progress()
        started = time.monotonic()
        out = quiesce("backup", "--qmp", str(guest.qmp_socket), "--agent", str(guest.agent_socket),
                      "--json", "--no-progress", str(target))
        backup_seconds = time.monotonic() - started
        if out.returncode != 0:
            log = guest.run("tail -n 40 /run/guest/agent.log", timeout=10).output
            raise GuestError(f"quiesce backup exited {out.returncode}: {out.stderr.strip()}\n"
                             f"guest agent log (tail):\n{log}")
        manifest = json.loads(out.stdout)
        backup_dir = target / manifest["backup_id"]
        if not (manifest["quiesced"] and manifest["frozen_filesystems"] == 1):
            raise GuestError(f"backup not quiesced as expected: {manifest}")
        checks.append(f"quiesced: froze {manifest['frozen_filesystems']} filesystem for "
                      f"{manifest['freeze_window_ms']:.0f} ms")

        # the VM: still running and writing, on its own image, nothing left over
        files_after = guest.wait_writer(files_before + 3, timeout=60)
        checks.append(f"guest kept running: writer went from {files_before} to {files_after} files")
        blocks, nodes = (r["return"] for r in raw_qmp(guest.qmp_socket, [
            {"execute": "query-block"},
            {"execute": "query-named-block-nodes", "arguments": {"flat": True}}]))
        top = next(b["inserted"] for b in blocks if b.get("inserted"))
        if top["node-name"] != "data0" or top["file"] != str(disk):
            raise GuestError(f"VM not back on its image: runs on {top['node-name']} {top['file']}")
        leftovers = [n["node-name"] for n in nodes if n["node-name"].startswith("quiesce-")]
        leftovers += [p.name for p in disk.parent.iterdir() if ".quiesce-" in p.name]
        if leftovers:
            raise GuestError(f"overlay left behind: {leftovers}")
        checks.append("VM back on its original image, no overlay node or file left")
        boot_seconds = guest.boot_seconds

    # the backup: qemu-img check, e2fsck -fn, every file against its checksum
    image_file = backup_dir / manifest["disks"][0]["file"]
    scratch = workdir / "scratch"
    scratch.mkdir()
    fs = verify_ext4_backup(image_file, "/w", scratch, qemu_img)
    if fs.files_verified < writer_files:
        raise GuestError(f"only {fs.files_verified} complete files in the backup")
    checks.append("qemu-img check: no errors")
    checks.append("e2fsck -fn: filesystem clean")
    checks.append(f"{fs.files_verified} complete files, every one matches its checksum "
                  f"({fs.temp_files} unfinished temporary files)")
    out = quiesce("verify", str(backup_dir))
    if out.returncode != 0:
        raise GuestError(f"quiesce verify failed: {out.stdout}{out.stderr}")
    checks.append("quiesce verify: content sha256 matches the manifest")
    return ProofReport(agent, boot_seconds, disk_size, manifest, backup_dir, backup_seconds, fs,
                       files_before, files_after, checks)
