"""``quiesce recover``: put a VM left on backup overlays back on its own disks.

When a backup's commit fails, the VM keeps running on the overlay (nothing
is lost; the guest does not notice). Once the cause is fixed (disk space,
say), ``quiesce recover --qmp SOCKET`` finds every drive whose top node is a
quiesce overlay (node names ``quiesce-*``), commits it into the node below,
and deletes the overlay file.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from typing import Callable

from hostclient.errors import BackupError, QmpError
from hostclient.qmp import BACKUP_FORMATS, BlockDisk, Monitor, Overlay, commit_back, host_path, \
    list_disks, nodes_using


@dataclass(frozen=True)
class RecoverConfig:
    qmp: str
    commit_timeout: float = 3600.0


def stranded_overlays(mon: Monitor) -> list[Overlay]:
    """Drives running on a quiesce overlay, with the base node under each."""
    nodes = mon.execute("query-named-block-nodes", {"flat": True})
    qemu = mon.process()
    found = []
    for top in list_disks(mon):
        if not top.node.startswith("quiesce-"):
            continue
        backing = top.backing_file
        base = next((n for n in nodes if n.get("file") == backing and n.get("drv") in BACKUP_FORMATS
                     and n.get("node-name") != top.node), None)
        if base is None:
            raise BackupError(f"drive {top.name} runs on overlay {top.filename} but its base "
                              f"{backing!r} is not an open qcow2/raw node; commit it by hand")
        filename = base.get("file", "")
        path, problem = host_path(qemu, filename, f"disk {top.name}'s base image")
        disk = BlockDisk(name=top.name, device=top.device, qdev=top.qdev, node=base["node-name"],
                         format=base.get("drv", ""), filename=filename,
                         virtual_size=top.virtual_size, read_only=False, backing_file=None,
                         path=path, path_problem=problem)
        # the overlay file is found as QEMU's other images are; if it cannot
        # be (path ""), it is committed back but left for the user to delete
        found.append(Overlay(disk, top.path, top.node, qemu_file=top.filename))
    return found


def recover(cfg: RecoverConfig, info: Callable[[str], None] = lambda m: None) -> int:
    """Commit back every stranded overlay; the number recovered."""
    with Monitor(cfg.qmp) as mon:
        overlays = stranded_overlays(mon)
        if not overlays:
            info("no drive runs on a quiesce overlay: nothing to do")
            return 0
        token = secrets.token_hex(3)
        for i, o in enumerate(overlays):
            commit_back(mon, o, job_id=f"quiesce-recover-{token}-{i}", timeout=cfg.commit_timeout)
            base = o.disk.path or o.disk.filename
            if not o.path:
                info(f"{o.disk.name}: committed {o.file_in_qemu} back into {base}; remove that "
                     f"overlay file by hand (where it lies is not certain: "
                     f"{o.disk.path_problem or 'see above'})")
                continue
            try:
                if not nodes_using(mon, o.file_in_qemu):
                    os.unlink(o.path)
            except (QmpError, OSError) as exc:
                info(f"committed {o.disk.name}, but could not remove {o.path}: {exc}")
                continue
            info(f"{o.disk.name}: committed {o.path} back into {base} and removed it")
        return len(overlays)
