"""``quiesce restore``, ``quiesce verify`` and ``quiesce list``: using backups.

All three read a backup through its manifest (hostclient/manifest.py) and
check image content against the manifest's sha256 of the guest-visible
bytes, so a restored disk is proved to be the disk that was backed up.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from hostclient.config import ListConfig, RestoreConfig, VerifyConfig
from hostclient.durable import sync_dir
from hostclient.engine import check_image, content_sha256, copy_image, image_chain, virtual_size
from hostclient.errors import BackupError, HostClientError, Interrupted, VerifyError
from hostclient.interrupt import CancelToken
from hostclient.manifest import MANIFEST, DiskRecord, Manifest, read_manifest
from hostclient.progress import ProgressBar, human_bytes
from hostclient.qemuhost import same_file


def _complete(directory: Path) -> Manifest:
    manifest = read_manifest(directory)
    if manifest.status != "complete":
        raise BackupError(f"{directory}: backup {manifest.backup_id} is {manifest.status}; "
                          "it holds no images")
    return manifest


def _select(manifest: Manifest, wanted: tuple[str, ...]) -> list[DiskRecord]:
    if not wanted:
        return manifest.disks
    by_name = {d.name: d for d in manifest.disks}
    missing = [w for w in wanted if w not in by_name]
    if missing:
        raise BackupError(f"no disk {missing[0]!r} in backup {manifest.backup_id} "
                          f"(disks: {', '.join(by_name) or 'none'})")
    return [by_name[w] for w in wanted]


# --------------------------------------------------------------- restore


def restore(cfg: RestoreConfig, cancel: CancelToken | None = None,
            info: Callable[[str], None] = lambda m: None) -> list[Path]:
    """Write the backup's disks to DEST_DIR; each is checked against its sha256.

    Every disk is first written to a temporary file next to its target,
    flushed and checked; only when all are good are they renamed over the
    targets, so a failed or interrupted restore leaves existing files as
    they were.
    """
    cancel = cancel or CancelToken()
    manifest = _complete(cfg.backup_dir)
    disks = _select(manifest, cfg.disks)
    try:
        cfg.dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BackupError(f"cannot create {cfg.dest_dir}: {exc.strerror}") from None
    plan = [(disk, _target(cfg, manifest, disk)) for disk in disks]
    token = secrets.token_hex(4)
    staged: list[tuple[Path, Path]] = []
    try:
        for disk, dest in plan:
            temp = dest.with_name(f".{dest.name}.quiesce-restore-{token}.tmp")
            staged.append((temp, dest))
            _write_checked(cfg, disk, temp, cancel)
        for temp, dest in staged:
            os.replace(temp, dest)
        sync_dir(cfg.dest_dir)
    except OSError as exc:
        raise BackupError(f"cannot put the restored disk in place: {exc.strerror or exc}") from None
    finally:
        for temp, _ in staged:
            temp.unlink(missing_ok=True)
    for disk, dest in plan:
        info(f"restored {disk.name} to {dest} (sha256 verified)")
    return [dest for _, dest in plan]


def _target(cfg: RestoreConfig, manifest: Manifest, disk: DiskRecord) -> Path:
    """Where ``disk`` goes; refuses to overwrite without --force, and ever to
    overwrite the backup itself."""
    dest = cfg.dest_dir / f"{disk.name}.{cfg.out_format}"
    if not (dest.exists() or dest.is_symlink()):
        return dest
    own = [cfg.backup_dir / MANIFEST, *(cfg.backup_dir / d.file for d in manifest.disks)]
    if any(same_file(str(dest), str(path)) for path in own):
        raise BackupError(f"{dest} is a file of the backup itself; restore to another directory")
    if dest.is_dir():
        raise BackupError(f"{dest} is a directory")
    if not cfg.force:
        raise BackupError(f"{dest} exists; pass --force to overwrite it")
    return dest


def _write_checked(cfg: RestoreConfig, disk: DiskRecord, temp: Path, cancel: CancelToken) -> None:
    """Convert one disk of the backup to ``temp`` (synced), and prove its
    content is the one the manifest describes."""
    source = cfg.backup_dir / disk.file
    standalone(source, disk.format)
    bar = ProgressBar(f"restoring {disk.name}", enabled=cfg.progress)

    def progress(done: int, total: int) -> None:
        cancel.check()
        bar.update(done, total)

    try:
        copy_image(str(source), disk.format, temp, out_format=cfg.out_format, progress=progress)
    finally:
        bar.finish()
    cancel.check()
    digest = content_sha256(str(temp), cfg.out_format, cancel.check)
    if disk.sha256 and digest != disk.sha256:
        raise VerifyError(f"restored {disk.name} does not match the backup's checksum "
                          f"({digest} != {disk.sha256})")


def standalone(path: Path, fmt: str) -> None:
    """A backup image is one self-contained file: one naming a backing or
    data file was not written by quiesce, and is not followed."""
    if not path.exists():
        raise BackupError(f"{path} is missing")
    top = image_chain(str(path), fmt).top
    if top.backing or top.data_file:
        other = top.backing or top.data_file
        raise VerifyError(f"{path} names another file ({other!r}); a quiesce backup image "
                          "stands alone, refusing to read it")


# ---------------------------------------------------------------- verify


@dataclass
class DiskVerdict:
    name: str
    ok: bool
    problem: str | None = None


def verify(cfg: VerifyConfig, cancel: CancelToken | None = None) -> tuple[Manifest, list[DiskVerdict]]:
    """Re-check every image of a backup against its manifest."""
    cancel = cancel or CancelToken()
    manifest = _complete(cfg.backup_dir)
    verdicts = []
    for disk in manifest.disks:
        verdicts.append(_verify_disk(cfg.backup_dir, disk, cancel))
    return manifest, verdicts


def _verify_disk(directory: Path, disk: DiskRecord, cancel: CancelToken) -> DiskVerdict:
    path = directory / disk.file
    if not path.exists():
        return DiskVerdict(disk.name, False, f"{disk.file} is missing")
    try:
        standalone(path, disk.format)
        check_image(path)
        size = virtual_size(str(path), disk.format)
        if size != disk.virtual_size:
            return DiskVerdict(disk.name, False,
                               f"virtual size {size} differs from the manifest's {disk.virtual_size}")
        if disk.sha256 is None:
            return DiskVerdict(disk.name, False, "the manifest has no checksum for it")
        digest = content_sha256(str(path), disk.format, cancel.check)
    except Interrupted:
        raise
    except HostClientError as exc:
        return DiskVerdict(disk.name, False, str(exc))
    if digest != disk.sha256:
        return DiskVerdict(disk.name, False, f"content sha256 {digest} differs from the manifest's")
    return DiskVerdict(disk.name, True)


# ------------------------------------------------------------------ list


@dataclass
class Listing:
    backup_id: str
    status: str
    started: str | None
    consistency: str | None
    disks: int
    size: int
    freeze_window_ms: float | None


def list_backups(cfg: ListConfig) -> list[Listing]:
    if not cfg.target_dir.is_dir():
        raise BackupError(f"{cfg.target_dir}: not a directory")
    found = []
    for entry in sorted(cfg.target_dir.iterdir()):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        if not (entry / MANIFEST).exists():
            found.append(Listing(entry.name, "unfinished", None, None, 0, 0, None))
            continue
        try:
            m = read_manifest(entry)
        except BackupError:
            found.append(Listing(entry.name, "unreadable", None, None, 0, 0, None))
            continue
        size = sum((entry / d.file).stat().st_size for d in m.disks if (entry / d.file).exists())
        found.append(Listing(m.backup_id, m.status, m.started, m.consistency, len(m.disks), size,
                             m.freeze_window_ms))
    return found


def format_listing(rows: list[Listing]) -> str:
    header = f"{'BACKUP':<22} {'STATUS':<11} {'CONSISTENCY':<12} {'DISKS':>5} {'SIZE':>10} {'FROZEN':>9}  STARTED"
    lines = [header]
    for r in rows:
        frozen = f"{r.freeze_window_ms:.0f} ms" if r.freeze_window_ms is not None else "-"
        lines.append(f"{r.backup_id:<22} {r.status:<11} {r.consistency or '-':<12} {r.disks:>5} "
                     f"{human_bytes(r.size):>10} {frozen:>9}  {r.started or '-'}")
    return "\n".join(lines)


def listing_json(rows: list[Listing]) -> str:
    return json.dumps([r.__dict__ for r in rows], indent=2)
