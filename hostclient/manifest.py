"""The backup directory layout and its ``manifest.json``.

A target directory holds one directory per backup, named by its backup id
(UTC time, sortable: ``20250101T120000Z``, with ``-N`` appended on a
collision)::

    TARGET_DIR/
        20250101T120000Z/
            manifest.json      what was backed up, how, and whether it worked
            vda.qcow2          one image per disk: the guest-visible content
            vdb.qcow2

The manifest is written last (atomically: temporary file, fsync, rename), so
a directory without one is an unfinished backup. Its layout is versioned:

* ``format`` is always ``"quiesce-backup"``; ``format_version`` is 1. Readers
  ignore members they do not know; a change that old readers would
  misunderstand bumps the version, and a reader refuses versions newer than
  it knows.
* ``kind`` is ``"full"`` today; ``parent`` is null. Incremental backups (dirty
  bitmaps, restore points kept as qcow2 snapshots in a per-disk repository)
  will add ``kind: "incremental"`` with ``parent`` naming the backup they
  build on, and per disk a ``bitmap`` and a ``repository`` entry; a full
  backup stays readable as it is.
* ``status`` is ``complete``, ``failed`` or ``interrupted``; only a
  complete backup has images. ``errors`` lists every agent, QMP and engine
  failure met (empty when none); ``recovery`` says what to do when the VM was
  left on an overlay or the guest may still be frozen.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hostclient import __version__
from hostclient.durable import sync_dir
from hostclient.errors import BackupError

FORMAT = "quiesce-backup"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class DiskRecord:
    name: str                    # file-name safe disk name (qdev id, drive or node name)
    node: str | None             # QMP node name (running VM), else None
    device: str | None           # drive (BlockBackend) name or qdev id
    source: str                  # the image the copy was made from
    source_format: str
    file: str                    # image file in the backup directory
    format: str                  # format of that file (qcow2)
    virtual_size: int
    sha256: str | None = None    # of the guest-visible content (virtual_size bytes)
    size: int | None = None      # bytes the image file takes
    compressed: bool = False
    verified: bool = False       # engine compare with the source + qcow2 check passed
    copy_seconds: float | None = None
    bitmap: str | None = None    # incremental backups: the dirty bitmap used


@dataclass
class ErrorRecord:
    step: str                    # connect, freeze, snapshot, thaw, copy, verify, commit, ...
    source: str                  # agent, qmp, engine, host
    message: str
    error_class: str | None = None
    disk: str | None = None


@dataclass
class Manifest:
    backup_id: str
    mode: str                    # "running" or "stopped"
    started: str
    finished: str | None = None
    status: str = "failed"
    quiesced: bool = False
    consistency: str = "crash"   # application, crash or offline (stopped VM)
    frozen_filesystems: int | None = None
    freeze_window_ms: float | None = None
    freeze_ms: float | None = None     # the freeze command alone (agent round trip)
    snapshot_ms: float | None = None   # the QMP transaction alone
    thaw_ms: float | None = None       # the thaw command alone
    disks: list[DiskRecord] = field(default_factory=list)
    errors: list[ErrorRecord] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    recovery: list[str] = field(default_factory=list)
    kind: str = "full"
    parent: str | None = None
    source: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        for e in body["errors"]:
            e["class"] = e.pop("error_class")
        order = ("backup_id", "kind", "parent", "mode", "status", "started", "finished",
                 "quiesced", "consistency", "frozen_filesystems", "freeze_window_ms", "freeze_ms",
                 "snapshot_ms", "thaw_ms", "disks", "errors", "warnings", "recovery", "source")
        return {"format": FORMAT, "format_version": FORMAT_VERSION,
                "tool": {"name": "quiesce", "version": __version__},
                **{k: body[k] for k in order}}

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "manifest") -> "Manifest":
        if data.get("format") != FORMAT:
            raise BackupError(f"{where}: not a quiesce backup manifest")
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise BackupError(f"{where}: manifest format version {version!r} is newer than "
                              f"this quiesce understands ({FORMAT_VERSION}); upgrade quiesce")
        known = set(cls.__dataclass_fields__)
        body = {k: v for k, v in data.items() if k in known}
        try:
            body["disks"] = [DiskRecord(**{k: v for k, v in d.items()
                                           if k in DiskRecord.__dataclass_fields__})
                             for d in data.get("disks", [])]
            body["errors"] = [ErrorRecord(step=e.get("step", ""), source=e.get("source", ""),
                                          message=e.get("message", ""),
                                          error_class=e.get("class"), disk=e.get("disk"))
                              for e in data.get("errors", [])]
            return cls(**body)
        except TypeError as exc:
            raise BackupError(f"{where}: malformed manifest ({exc})") from None


def new_backup_dir(target: Path) -> tuple[str, Path]:
    """Create the directory of a new backup; its id and path."""
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BackupError(f"cannot create target directory {target}: {exc.strerror}") from None
    base = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for n in range(1000):
        backup_id = base if n == 0 else f"{base}-{n}"
        path = target / backup_id
        try:
            path.mkdir()
            return backup_id, path
        except FileExistsError:
            continue
        except OSError as exc:
            raise BackupError(f"cannot create {path}: {exc.strerror}") from None
    raise BackupError(f"cannot find a free backup directory name in {target}")


def write_manifest(directory: Path, manifest: Manifest) -> Path:
    """Write manifest.json atomically (temporary file, fsync, rename), then
    flush the backup directory and the target directory's entry for it."""
    path = directory / MANIFEST
    tmp = directory / f".{MANIFEST}.tmp"
    data = json.dumps(manifest.to_json(), indent=2) + "\n"
    try:
        with open(tmp, "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise BackupError(f"cannot write {path}: {exc.strerror}") from None
    sync_dir(directory)
    sync_dir(directory.parent)
    return path


def read_manifest(directory: Path) -> Manifest:
    path = directory / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BackupError(f"{directory}: no {MANIFEST} (not a backup, or an unfinished one)") from None
    except (OSError, ValueError) as exc:
        raise BackupError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise BackupError(f"{path}: not a JSON object")
    return Manifest.from_json(data, str(path))
