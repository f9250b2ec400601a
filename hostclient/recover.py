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
from hostclient.qmp import BACKUP_FORMATS, BlockDisk, Monitor, Overlay, commit_back, list_disks, \
    nodes_using


@dataclass(frozen=True)
class RecoverConfig:
    qmp: str
    commit_timeout: float = 3600.0


def stranded_overlays(mon: Monitor) -> list[Overlay]:
    """Drives running on a quiesce overlay, with the base node under each."""
    nodes = mon.execute("query-named-block-nodes", {"flat": True})
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
        disk = BlockDisk(name=top.name, device=top.device, qdev=top.qdev, node=base["node-name"],
                         format=base.get("drv", ""), filename=base.get("file", ""),
                         virtual_size=top.virtual_size, read_only=False, backing_file=None)
        found.append(Overlay(disk, top.filename, top.node))
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
            try:
                if not nodes_using(mon, o.path):
                    os.unlink(o.path)
            except (QmpError, OSError) as exc:
                info(f"committed {o.disk.name}, but could not remove {o.path}: {exc}")
                continue
            info(f"{o.disk.name}: committed {o.path} back into {o.disk.filename} and removed it")
        return len(overlays)
