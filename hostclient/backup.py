"""``quiesce backup``: a consistent copy of a running or a stopped VM's disks.

Running VM, in order::

    connect QMP, choose disks, connect the agent
    ┌ freeze (agent)                         critical section: no interruption,
    │ snapshot all disks (one transaction)   bounded by the freeze, snapshot
    └ thaw (agent, in a finally)             and thaw timeouts
    copy each now-stable base image          interruptible (Ctrl-C)
    verify each copy (compare, check, sha256)
    commit each overlay back, delete it      cleanup: always runs, to the end

The freeze window covers only the snapshot. Every failure is recorded in the
manifest's ``errors``; the exit code says what state the VM was left in:

    0    complete
    1    failed; the VM runs as before (no overlay, thawed)
    3    the VM still runs on an overlay (commit failed): see ``recovery``
    4    the guest may still be frozen (thaw failed): see ``recovery``
    130  interrupted; the VM runs as before

Stopped VM: no freeze and no overlay; each image is copied and verified
directly, and an image some QEMU holds locked is refused.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from hostclient.agentclient import AgentClient, AgentTimeouts
from hostclient.config import BackupConfig
from hostclient.engine import (
    content_sha256,
    copy_image,
    held_by_qemu,
    image_chain,
    openable_formats,
    verify_copy,
)
from hostclient.errors import (
    AgentCommandError,
    BackupError,
    EngineError,
    GuestAgentError,
    HostClientError,
    Interrupted,
    QmpError,
    VerifyError,
)
from hostclient.interrupt import CancelToken
from hostclient.manifest import (
    DiskRecord,
    ErrorRecord,
    Manifest,
    new_backup_dir,
    now_iso,
    write_manifest,
)
from hostclient.progress import ProgressBar
from hostclient.qemuhost import same_file
from hostclient.qmp import (
    BlockDisk,
    Monitor,
    Overlay,
    choose_disks,
    commit_back,
    host_path,
    nodes_using,
    safe_name,
    snapshot,
    top_node,
)

log = logging.getLogger("quiesce.backup")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_ON_OVERLAY = 3
EXIT_MAYBE_FROZEN = 4
EXIT_INTERRUPTED = 130


@dataclass
class Ui:
    """Where the backup tells the user what it does (stderr by default)."""

    info: Callable[[str], None] = lambda message: None
    progress: bool = False

    def bar(self, label: str) -> ProgressBar:
        return ProgressBar(label, enabled=self.progress)


@dataclass
class BackupResult:
    manifest: Manifest | None
    directory: Path | None
    exit_code: int


def run_backup(cfg: BackupConfig, *, cancel: CancelToken | None = None,
               ui: Ui | None = None) -> BackupResult:
    cancel = cancel or CancelToken()
    ui = ui or Ui()
    if cfg.running:
        return RunningBackup(cfg, cancel, ui).run()
    return StoppedBackup(cfg, cancel, ui).run()


# ---------------------------------------------------------------- shared


@dataclass
class _Job:
    """State shared by both forms: the manifest being filled and the outcome."""

    cfg: BackupConfig
    cancel: CancelToken
    ui: Ui
    manifest: Manifest | None = None
    directory: Path | None = None
    errors: list[ErrorRecord] = field(default_factory=list)
    copies: list[Path] = field(default_factory=list)
    interrupted: bool = False

    def error(self, step: str, source: str, exc: BaseException | str, disk: str | None = None) -> None:
        message = str(exc)
        cls = getattr(exc, "error_class", None)
        self.errors.append(ErrorRecord(step, source, message, cls, disk))
        log.warning("%s failed (%s): %s", step, source, message)
        self.ui.info(f"{step} failed: {message}")

    def start(self, mode: str, source: dict) -> None:
        backup_id, self.directory = new_backup_dir(self.cfg.target_dir)
        self.manifest = Manifest(backup_id=backup_id, mode=mode, started=now_iso(), source=source)

    def discard(self) -> None:
        """Undo start() when nothing else was done: no directory, no manifest."""
        if self.directory is not None:
            try:
                self.directory.rmdir()
            except OSError as exc:
                log.warning("cannot remove the empty backup directory %s: %s", self.directory, exc)
        self.directory = None
        self.manifest = None

    def copy_and_verify(self, disk_name: str, source: str, source_format: str, node: str | None,
                        device: str | None, index: int, count: int) -> DiskRecord:
        assert self.directory is not None
        target = self.directory / f"{disk_name}.qcow2"
        self.copies.append(target)
        bar = self.ui.bar(f"{disk_name} ({index}/{count})")

        def progress(done: int, total: int) -> None:
            self.cancel.check()
            bar.update(done, total)

        try:
            stats = copy_image(source, source_format, target, compress=self.cfg.compress,
                               progress=progress)
        finally:
            bar.finish()
        self.ui.info(f"copied {disk_name}: {stats.virtual_size} bytes in {stats.seconds:.2f} s")
        self.cancel.check()
        verify_copy(source, source_format, target)
        digest = content_sha256(str(target), "qcow2", self.cancel.check)
        self.cancel.check()
        return DiskRecord(name=disk_name, node=node, device=device, source=source,
                          source_format=source_format, file=target.name, format="qcow2",
                          virtual_size=stats.virtual_size, sha256=digest,
                          size=target.stat().st_size, compressed=self.cfg.compress,
                          verified=True, copy_seconds=round(stats.seconds, 3))

    def finish(self, complete: bool) -> None:
        """Write the manifest; a backup that is not complete keeps no images."""
        if self.manifest is None or self.directory is None:
            return
        m = self.manifest
        m.errors = self.errors
        m.finished = now_iso()
        m.status = "complete" if complete else ("interrupted" if self.interrupted else "failed")
        if not complete:
            for path in self.copies:
                path.unlink(missing_ok=True)
            m.disks = []
        write_manifest(self.directory, m)


def _unique_names(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        n = seen.get(name, 0)
        seen[name] = n + 1
        out.append(name if n == 0 else f"{name}-{n}")
    return out


# --------------------------------------------------------------- running


class RunningBackup(_Job):
    """Backup of a running VM through QMP and the guest agent."""

    monitor_factory: Callable[..., Monitor] = Monitor
    agent_factory: Callable[..., AgentClient] = AgentClient

    def __init__(self, cfg: BackupConfig, cancel: CancelToken, ui: Ui) -> None:
        super().__init__(cfg, cancel, ui)
        self.mon: Monitor | None = None
        self.agent: AgentClient | None = None
        self.overlays: list[Overlay] = []
        self.attached: list[Overlay] = []      # overlays the VM currently runs on
        self.thaw_failed = False
        self.quiesced = False
        self.frozen_count: int | None = None
        self.freeze_window_ms: float | None = None
        self.snapshot_ms: float | None = None
        self.freeze_ms: float | None = None
        self.thaw_ms: float | None = None
        self.vm_status = "unknown"

    # -------------------------------------------------------------- run

    def run(self) -> BackupResult:
        t = self.cfg.timeouts
        try:
            self.cancel.check()
            self.mon = self.monitor_factory(self.cfg.qmp, timeout=t.qmp).connect(t.connect)
            disks, skipped = choose_disks(self.mon, self.cfg.disks)
            for reason in skipped:
                self.ui.info(f"skipping disk {reason}")
            if not disks:
                raise BackupError("no disk to back up" + (f" ({'; '.join(skipped)})" if skipped else ""))
            self._check_chains(disks)
            self.vm_status = self.mon.execute("query-status").get("status", "unknown")
            self._connect_agent()
            self.cancel.check()
            self.start("running", {"qmp": self.cfg.qmp, "agent": self.cfg.agent})
            self.manifest.warnings += [f"skipped disk {s}" for s in skipped]
            try:
                self.overlays = self._plan_overlays(disks)
            except BaseException:
                self.discard()          # nothing was done yet: leave no trace
                raise
            return self._backup()
        except Interrupted:
            self.interrupted = True
            return self._result(False)
        finally:
            if self.agent is not None:
                self.agent.close()
            if self.mon is not None:
                self.mon.close()

    def _backup(self) -> BackupResult:
        complete = False
        try:
            self._freeze_snapshot_thaw()
            try:
                self.cancel.check()
                names = _unique_names([o.disk.name for o in self.overlays])
                for i, (o, name) in enumerate(zip(self.overlays, names), 1):
                    self.manifest.disks.append(self.copy_and_verify(
                        name, o.disk.path, o.disk.format, o.disk.node,
                        o.disk.device or o.disk.qdev, i, len(self.overlays)))
                complete = True
            except Interrupted:
                self.interrupted = True
                self.ui.info("interrupted: committing the overlays back before exiting")
            except (EngineError, VerifyError) as exc:
                self.error("copy", "engine", exc)
            except HostClientError as exc:
                self.error("copy", "host", exc)
            finally:
                self._commit_all()
        except Interrupted:
            self.interrupted = True
        except HostClientError as exc:
            if not any(e.message == str(exc) for e in self.errors):
                self.error("backup", "host", exc)
        except Exception as exc:  # a bug: still write the manifest, say what broke
            log.debug("unexpected error", exc_info=True)
            self.error("backup", "host", f"internal error: {type(exc).__name__}: {exc}")
        # The copies stand on their own once verified: a failed commit or
        # thaw is reported by the exit code and ``recovery``, not by
        # throwing a good backup away.
        return self._result(complete and not self.interrupted)

    def _result(self, complete: bool) -> BackupResult:
        m = self.manifest
        if m is not None:
            m.quiesced = self.quiesced
            m.consistency = "application" if self.quiesced else "crash"
            m.frozen_filesystems = self.frozen_count
            m.freeze_window_ms = self.freeze_window_ms
            m.snapshot_ms = self.snapshot_ms
            m.freeze_ms = self.freeze_ms
            m.thaw_ms = self.thaw_ms
            self.finish(complete)
        if self.thaw_failed:
            code = EXIT_MAYBE_FROZEN
        elif self.attached:
            code = EXIT_ON_OVERLAY
        elif complete:
            code = EXIT_OK
        elif self.interrupted:
            code = EXIT_INTERRUPTED
        else:
            code = EXIT_FAILED
        return BackupResult(m, self.directory, code)

    def _check_chains(self, disks: list[BlockDisk]) -> None:
        """The engine must read each disk as the guest sees it: the backing
        chain it follows from the image headers has to be the one QEMU has
        open (a -blockdev graph may differ from the headers, and a format
        QEMU was given may differ from a recorded or guessed one)."""
        qemu = self.mon.process()
        for disk in disks:
            chain = image_chain(disk.path, disk.format, follow_guesses=True)
            ours = [(lv.filename, lv.format) for lv in chain.levels[1:]]
            theirs = []
            for name, fmt in disk.backing_chain:
                path, problem = host_path(qemu, name, f"disk {disk.name}'s backing file")
                if problem:
                    raise BackupError(problem)
                theirs.append((path, fmt))
            same = len(ours) == len(theirs) and all(
                a_fmt == b_fmt and same_file(a, b) for (a, a_fmt), (b, b_fmt) in zip(ours, theirs))
            if not same:
                raise BackupError(
                    f"disk {disk.name}: QEMU reads it through the backing chain "
                    f"{_describe(theirs)}, but the image headers lead to {_describe(ours)}; a copy "
                    "made from the files would not be what the guest sees, refusing")

    # ------------------------------------------------------------ agent

    def _connect_agent(self) -> None:
        if not self.cfg.agent:
            self._agent_failed("connect", "no --agent socket given")
            return
        t = self.cfg.timeouts
        timeouts = AgentTimeouts(connect=t.connect, sync=t.ping, ping=t.ping, freeze=t.freeze,
                                 thaw=t.thaw, status=t.thaw)
        try:
            self.agent = self.agent_factory(self.cfg.agent, timeouts).connect()
            status = self.agent.fsfreeze_status()
        except GuestAgentError as exc:
            if self.agent is not None:
                self.agent.close()
                self.agent = None
            self._agent_failed("connect", exc)
            return
        if status != "thawed":
            # Somebody else froze the guest: neither freeze again nor thaw it.
            self.agent.close()
            self.agent = None
            self._agent_failed("connect", f"the guest's filesystems are already {status} "
                                          "(by someone else); not touching them")

    def _agent_failed(self, step: str, exc: BaseException | str) -> None:
        if self.vm_status not in ("running", "unknown") and self.cfg.agent:
            exc = f"{exc} (the VM is {self.vm_status}: its guest agent cannot answer until it runs)"
        self.error(step, "agent", exc)
        if self.cfg.on_agent_failure == "fail":
            raise BackupError(f"guest agent unusable ({exc}); no backup taken "
                              "(--on-agent-failure crash-consistent would take a crash-consistent one)")
        self.ui.info("going on without the agent: the backup will be crash-consistent")

    # ------------------------------------------- freeze, snapshot, thaw

    def _plan_overlays(self, disks: list[BlockDisk]) -> list[Overlay]:
        """Where QEMU creates each overlay: always an absolute path, since
        QEMU would resolve a relative one against its own working directory."""
        token = secrets.token_hex(3)
        overlays = []
        for i, disk in enumerate(disks):
            where = self.cfg.overlay_dir
            if where is None:
                where = Path(disk.path).parent if _is_regular(disk.path) else self.directory
            name = f"{Path(disk.path).name}.quiesce-{self.manifest.backup_id}-{i}.qcow2"
            path = Path(os.path.abspath(where)) / name
            if os.path.lexists(path):
                raise BackupError(f"overlay {path} already exists; remove it if no VM uses it")
            overlays.append(Overlay(disk, str(path), f"quiesce-{token}-{i}"))
        return overlays

    def _freeze_snapshot_thaw(self) -> None:
        """The critical section: never interrupted, always thawed."""
        t = self.cfg.timeouts
        froze = False
        started = time.monotonic()
        try:
            if self.agent is not None:
                froze = True
                self._freeze()
            if not self.quiesced and self.cfg.on_agent_failure == "fail":
                raise BackupError("the guest could not be frozen; no backup taken "
                                  "(--on-agent-failure crash-consistent would take a crash-consistent one)")
            snap_started = time.monotonic()
            try:
                snapshot(self.mon, self.overlays, t.snapshot)
            except QmpError as exc:
                self.error("snapshot", "qmp", exc)
                raise
            finally:
                self.snapshot_ms = round((time.monotonic() - snap_started) * 1000, 3)
            self.attached = list(self.overlays)
        finally:
            if froze:
                thaw_started = time.monotonic()
                self._thaw()
                self.thaw_ms = round((time.monotonic() - thaw_started) * 1000, 3)
                self.freeze_window_ms = round((time.monotonic() - started) * 1000, 3)
                self.ui.info(f"guest frozen for {self.freeze_window_ms:.1f} ms (freeze "
                             f"{self.freeze_ms or 0:.1f} ms, snapshot {self.snapshot_ms or 0:.1f} ms, "
                             f"thaw {self.thaw_ms:.1f} ms)")
            if not self.attached:
                self._snapshot_cleanup()

    def _freeze(self) -> None:
        assert self.agent is not None
        mountpoints = list(self.cfg.mountpoints) or None
        started = time.monotonic()
        try:
            count = self.agent.fsfreeze_freeze(mountpoints, timeout=self.cfg.timeouts.freeze)
        except AgentCommandError as exc:
            # qemu-ga thaws what it froze when a freeze fails part-way
            self._agent_failed_soft("freeze", exc)
            return
        except GuestAgentError as exc:
            status = self.agent.status_after_timeout(self.cfg.timeouts.thaw)
            detail = f"{exc}; the agent then reported {status!r}" if status else \
                f"{exc}; the agent did not answer a status poll either"
            self._agent_failed_soft("freeze", detail)
            return
        finally:
            self.freeze_ms = round((time.monotonic() - started) * 1000, 3)
        self.frozen_count = count
        if count == 0:
            self.manifest.warnings.append("the agent froze no filesystem"
                                          + (f" among {mountpoints}" if mountpoints else ""))
            return
        self.quiesced = True

    def _agent_failed_soft(self, step: str, exc: BaseException | str) -> None:
        self.error(step, "agent", exc)

    def _thaw(self) -> None:
        agent = self.agent
        assert agent is not None
        try:
            agent.fsfreeze_thaw(timeout=self.cfg.timeouts.thaw)
            return
        except GuestAgentError as exc:
            self.error("thaw", "agent", exc)
        # Second chance: ask, thaw again if still frozen, else queue one blind.
        status = agent.status_after_timeout(self.cfg.timeouts.thaw)
        if status == "thawed":
            return
        if status == "frozen":
            try:
                agent.fsfreeze_thaw(timeout=self.cfg.timeouts.thaw)
                return
            except GuestAgentError as exc:
                self.error("thaw", "agent", exc)
        try:
            agent.send_thaw_blind()
        except GuestAgentError:
            pass
        self.thaw_failed = True
        self.manifest.recovery.append(
            f"the guest may still be frozen: thaw it with "
            f"`quiesce agent {self.cfg.agent} guest-fsfreeze-thaw` (check with guest-fsfreeze-status)")

    def _snapshot_cleanup(self) -> None:
        """After a failed snapshot: commit back any overlay that got attached
        anyway (a transaction that timed out may still have run), remove the
        files of the others."""
        for o in self.overlays:
            try:
                if top_node(self.mon, o.disk) == o.node:
                    self.attached.append(o)
                elif os.path.exists(o.path) and not nodes_using(self.mon, o.file_in_qemu):
                    os.unlink(o.path)
            except (QmpError, OSError) as exc:
                self.error("snapshot-cleanup", "qmp", exc, o.disk.name)
        if self.attached:
            self._commit_all()

    # ------------------------------------------------------------ commit

    def _commit_all(self) -> None:
        token = secrets.token_hex(3)
        for i, o in enumerate(list(self.attached)):
            try:
                commit_back(self.mon, o, job_id=f"quiesce-commit-{token}-{i}",
                            timeout=self.cfg.timeouts.commit)
            except QmpError as exc:
                self.error("commit", "qmp", exc, o.disk.name)
                self._recovery_for(o)
                continue
            self.attached.remove(o)
            try:
                if not nodes_using(self.mon, o.file_in_qemu):
                    os.unlink(o.path)
            except (QmpError, OSError) as exc:
                self.error("delete-overlay", "host", exc, o.disk.name)
                self.manifest.recovery.append(f"remove the unused overlay {o.path}")
        if not self.attached:
            self.ui.info("all overlays committed back and removed")

    def _recovery_for(self, o: Overlay) -> None:
        self.manifest.recovery.append(
            f"disk {o.disk.name} still runs on overlay {o.path} (node {o.node}); the guest is "
            f"fine, but fix the cause above and then run `quiesce recover --qmp {self.cfg.qmp}` "
            f"to commit it back into {o.disk.path} and remove the overlay")


def _describe(chain: list[tuple[str, str]]) -> str:
    return " <- ".join(f"{path} ({fmt})" for path, fmt in chain) if chain else "(none)"


def _is_regular(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


# --------------------------------------------------------------- stopped


class StoppedBackup(_Job):
    """Backup of a stopped VM's images: copy and verify, nothing else."""

    def run(self) -> BackupResult:
        complete = False
        try:
            plan = self._inspect()
            self.cancel.check()
            self.start("stopped", {"images": [str(i.path) for i in self.cfg.images]})
            self.manifest.consistency = "offline"
            self.manifest.warnings += self.guess_warnings
            names = _unique_names([safe_name(p.name.split(".")[0] or p.name) for p, _ in plan])
            for i, ((path, fmt), name) in enumerate(zip(plan, names), 1):
                self._recheck_unlocked(path)
                self.manifest.disks.append(self.copy_and_verify(
                    name, str(path), fmt, None, None, i, len(plan)))
            complete = True
        except Interrupted:
            self.interrupted = True
        except HostClientError as exc:
            if self.manifest is None:
                raise
            self.error("copy", "engine", exc)
        except Exception as exc:  # a bug: still write the manifest, say what broke
            if self.manifest is None:
                raise
            log.debug("unexpected error", exc_info=True)
            self.error("copy", "host", f"internal error: {type(exc).__name__}: {exc}")
        self.finish(complete)
        code = EXIT_OK if complete else (EXIT_INTERRUPTED if self.interrupted else EXIT_FAILED)
        return BackupResult(self.manifest, self.directory, code)

    def _inspect(self) -> list[tuple[Path, str]]:
        """(image, format) of each image, refusing what is unsafe to read.

        A format guessed from the content is trusted only as far as it
        cannot make the engine read other host files (engine.image_chain);
        a guess other than raw is reported.
        """
        plan = []
        self.guess_warnings: list[str] = []
        for spec in self.cfg.images:
            path = spec.path
            if not path.exists():
                raise BackupError(f"{path}: no such image")
            if spec.format is not None and spec.format not in openable_formats():
                raise BackupError(f"--format {spec.format}: not a format the image engine reads "
                                  f"({', '.join(openable_formats())})")
            self._recheck_unlocked(path)
            chain = image_chain(str(path), spec.format)
            if chain.refused:
                raise BackupError(chain.refused)
            for warning in chain.warnings():
                self.ui.info(f"warning: {warning}")
                self.guess_warnings.append(warning)
            plan.append((path, chain.top.format))
        return plan

    @staticmethod
    def _recheck_unlocked(path: Path) -> None:
        if held_by_qemu(str(path)):
            raise BackupError(f"{path} is in use by a running QEMU (it holds the image locked); "
                              "back up a running VM with --qmp and --agent, or stop it first")


def remove_backup_dir(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
