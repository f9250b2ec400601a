"""QEMU monitor access for backups, through the ``qemu.qmp`` library.

:class:`Monitor` is a synchronous face on ``qemu.qmp.QMPClient``: it owns a
private event loop that runs only while a call is in progress, collects
every event from the moment of connection (so no job event is missed
between calls), and maps the library's exceptions onto the host client's
error tree with per-call timeouts.

On top of it, the three block operations a backup needs:

* :func:`list_disks` — the guest's drives from ``query-block`` (one entry
  per drive), each with the host path of its image: QEMU reports names as
  it was given them, relative ones relative to its own working directory,
  and :mod:`hostclient.qemuhost` finds the file QEMU really has open;
* :func:`snapshot` — one ``transaction`` of ``blockdev-snapshot-sync``
  actions, so all disks are cut at the same instant or none is;
* :func:`commit_back` — live ``block-commit`` of an overlay into its base:
  wait for ``BLOCK_JOB_READY``, ``block-job-complete``, wait for
  ``BLOCK_JOB_COMPLETED``, and check the graph is back where it was.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from hostclient.errors import (
    BackupError,
    BlockJobError,
    QmpCommandError,
    QmpError,
    QmpTimeout,
    QmpUnavailable,
)
from hostclient.qemuhost import QemuProcess, peer_pid

log = logging.getLogger("quiesce.qmp")

#: Formats whose nodes can be snapshotted and committed back as a backup does.
BACKUP_FORMATS = ("qcow2", "raw")
#: Protocol drivers whose data lives in a host file or block device we can read.
HOST_PROTOCOLS = ("file", "host_device")


class Monitor:
    """A QMP connection (unix socket path) with synchronous calls."""

    def __init__(self, path: str, *, timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: Any = None
        self._events: Any = None
        self._backlog: list[dict[str, Any]] = []
        #: pid of the QEMU serving the socket (SO_PEERCRED), None if unknown
        self.peer_pid: int | None = None

    # ------------------------------------------------------- connection

    def connect(self, timeout: float | None = None) -> "Monitor":
        try:
            from qemu.qmp import EventListener, QMPClient
        except ImportError:  # pragma: no cover - the qmp extra is missing
            raise QmpUnavailable("the qemu.qmp library is not installed "
                                 "(pip install 'quiesce[qmp]')") from None
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient("quiesce")
        self._events = EventListener()
        self._client.register_listener(self._events)
        sock = self._open_socket(timeout or self.timeout)
        try:
            self._run(self._client.connect(sock), timeout or self.timeout, "connect")
        except QmpTimeout:
            self.close()
            raise QmpUnavailable(f"QEMU sent no QMP greeting on {self.path} within "
                                 f"{timeout or self.timeout:g} s; a QMP socket serves one client "
                                 "at a time: is another one (libvirt?) connected?") from None
        except QmpError:
            self.close()
            raise
        except Exception as exc:
            self.close()
            sock.close()
            raise QmpUnavailable(f"cannot connect to QMP socket {self.path}: {_reason(exc)}") from None
        return self

    def _open_socket(self, timeout: float) -> socket.socket:
        """Connect the unix socket ourselves, to learn QEMU's pid from it."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            self.close()
            raise QmpUnavailable(f"cannot connect to QMP socket {self.path}: "
                                 f"{exc.strerror or exc}") from None
        sock.setblocking(False)
        self.peer_pid = peer_pid(sock)
        return sock

    def process(self) -> QemuProcess:
        """What this host sees of the QEMU behind the socket, as of now."""
        return QemuProcess.inspect(self.peer_pid)

    def close(self) -> None:
        if self._loop is None:
            return
        try:
            if self._client is not None:
                self._loop.run_until_complete(asyncio.wait_for(self._client.disconnect(), 5))
        except Exception:  # noqa: BLE001 - closing a broken connection is best effort
            pass
        finally:
            self._loop.close()
            self._loop = None
            self._client = None

    def __enter__(self) -> "Monitor":
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, coro: Any, timeout: float, what: str) -> Any:
        if self._loop is None:
            coro.close()
            raise QmpUnavailable("not connected to QMP")
        try:
            return self._loop.run_until_complete(asyncio.wait_for(coro, timeout))
        except asyncio.TimeoutError:
            raise QmpTimeout(f"QEMU did not answer {what} within {timeout:g} s") from None

    # ------------------------------------------------------------ calls

    def execute(self, command: str, arguments: dict[str, Any] | None = None, *,
                timeout: float | None = None) -> Any:
        from qemu.qmp import ExecuteError
        try:
            return self._run(self._client.execute(command, arguments), timeout or self.timeout,
                             command)
        except ExecuteError as exc:
            raise QmpCommandError(command, exc.error_class, str(exc)) from None
        except QmpError:
            raise
        except Exception as exc:  # ExecInterruptedError, StateError, OSError, ...
            raise QmpUnavailable(f"QMP connection lost during {command}: {_reason(exc)}") from None

    def next_event(self, timeout: float) -> dict[str, Any] | None:
        """The next event (as a dict), or None if none came within ``timeout``."""
        if self._backlog:
            return self._backlog.pop(0)
        try:
            event = self._run(self._events.get(), timeout, "event")
        except QmpTimeout:
            return None
        except QmpError:
            raise
        except Exception as exc:
            raise QmpUnavailable(f"QMP connection lost: {_reason(exc)}") from None
        return dict(event)

    def requeue(self, event: dict[str, Any]) -> None:
        """Put an event back: the next ``next_event`` returns it first."""
        self._backlog.insert(0, event)

    def wait_event(self, match: Callable[[dict[str, Any]], bool], timeout: float, *,
                   what: str, poll: Callable[[], None] | None = None,
                   poll_every: float = 1.0) -> dict[str, Any]:
        """Wait for an event ``match`` accepts; events skipped are kept.

        ``poll`` runs every ``poll_every`` seconds while waiting (to notice a
        job that vanished, or to honour an interruption) and may raise.
        """
        deadline = time.monotonic() + timeout
        skipped: list[dict[str, Any]] = []
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise QmpTimeout(f"no {what} within {timeout:g} s")
                event = self.next_event(min(poll_every, remaining))
                if event is None:
                    if poll:
                        poll()
                    continue
                if match(event):
                    return event
                skipped.append(event)
        finally:
            self._backlog = skipped + self._backlog


def _reason(exc: BaseException) -> str:
    while exc.__cause__ is not None or getattr(exc, "exc", None) is not None:
        exc = getattr(exc, "exc", None) or exc.__cause__
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return text


# ----------------------------------------------------------------- disks


@dataclass(frozen=True)
class BlockDisk:
    """One drive of the guest, as the backup sees it."""

    name: str             # stable, file-name safe: qdev id, else drive name, else node
    device: str           # BlockBackend name ("" for -blockdev drives)
    qdev: str             # the guest device's QOM path
    node: str             # the top (format) node's name
    format: str           # qcow2 | raw | ...
    filename: str         # the image file (or block device) behind the top node, as QEMU names it
    virtual_size: int
    read_only: bool
    backing_file: str | None
    path: str = ""        # that file's host path ("" when unknown: see path_problem)
    path_problem: str | None = None
    #: the images below the top one as QEMU reads them: (QEMU's name, format)
    backing_chain: tuple[tuple[str, str], ...] = ()

    @property
    def target(self) -> dict[str, str]:
        """How QMP commands name this drive: by backend name if it has one."""
        return {"device": self.device} if self.device else {"node-name": self.node}


def _qdev_id(qdev: str) -> str:
    match = re.match(r"^/machine/peripheral/([^/]+)", qdev)
    return match.group(1) if match else ""


def safe_name(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return cleaned or "disk"


def list_disks(mon: Monitor) -> list[BlockDisk]:
    """Every drive with a medium, with its top node and image file."""
    disks = []
    qemu = mon.process()
    for entry in mon.execute("query-block"):
        inserted = entry.get("inserted")
        if not inserted:
            continue
        node = inserted.get("node-name", "")
        image = inserted.get("image", {})
        qdev = entry.get("qdev", "")
        device = entry.get("device", "")
        name = safe_name(_qdev_id(qdev) or device or node)
        filename = inserted.get("file", "")
        path, problem = host_path(qemu, filename, f"disk {name}")
        disks.append(BlockDisk(
            name=name, device=device, qdev=qdev, node=node,
            format=inserted.get("drv", ""), filename=filename,
            virtual_size=int(image.get("virtual-size", 0)), read_only=bool(inserted.get("ro")),
            backing_file=inserted.get("backing_file") or image.get("backing-filename"),
            path=path, path_problem=problem, backing_chain=_backing_chain(image),
        ))
    return disks


def _backing_chain(image: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    chain = []
    below = image.get("backing-image")
    while below:
        chain.append((below.get("filename", ""), below.get("format", "")))
        below = below.get("backing-image")
    return tuple(chain)


def host_path(qemu: QemuProcess, filename: str, what: str) -> tuple[str, str | None]:
    """(host path, None) or ("", why not) for an image name QEMU reports."""
    if not filename or filename.startswith("json:"):
        return "", f"its image is not a plain file ({filename[:60]})"
    try:
        return qemu.resolve(filename, what), None
    except BackupError as exc:
        return "", str(exc)


def file_protocol(mon: Monitor, disk: BlockDisk) -> str | None:
    """The protocol driver under the disk's format node (file, host_device, nbd...)."""
    for node in mon.execute("query-named-block-nodes", {"flat": True}):
        if node.get("drv") in HOST_PROTOCOLS and node.get("file") == disk.filename:
            return node["drv"]
    return None


def choose_disks(mon: Monitor, wanted: Iterable[str] = ()) -> tuple[list[BlockDisk], list[str]]:
    """The disks to back up and, for the others, why they are left out.

    Without ``wanted``: every writable qcow2/raw drive on a host file or
    block device. With it: exactly those drives (by node name, drive name,
    qdev id or our name), and an error for any that cannot be backed up.
    """
    disks = list_disks(mon)
    wanted = list(wanted)
    skipped: list[str] = []
    chosen: list[BlockDisk] = []
    if wanted:
        for want in wanted:
            match = [d for d in disks if want in (d.node, d.device, _qdev_id(d.qdev), d.name)]
            if not match:
                known = ", ".join(d.name for d in disks) or "none"
                raise BackupError(f"no disk named {want!r} in this VM (disks: {known})")
            disk = match[0]
            reason = _unsuitable(mon, disk)
            if reason:
                raise BackupError(f"disk {want!r} cannot be backed up: {reason}")
            if disk not in chosen:
                chosen.append(disk)
    else:
        for disk in disks:
            reason = _unsuitable(mon, disk)
            if reason:
                skipped.append(f"{disk.name}: {reason}")
            else:
                chosen.append(disk)
    _check_paths(chosen)
    return chosen, skipped


def _check_paths(chosen: list[BlockDisk]) -> None:
    """Every chosen disk has a host path we are sure of, each a different file.

    A disk we would back up but cannot locate with certainty stops the
    backup (skipping it would make a partial backup look complete).
    """
    from hostclient.qemuhost import same_file
    for disk in chosen:
        if disk.path_problem:
            raise BackupError(disk.path_problem)
    for i, disk in enumerate(chosen):
        for other in chosen[i + 1:]:
            if same_file(disk.path, other.path):
                raise BackupError(f"disks {disk.name} and {other.name} resolve to the same file "
                                  f"{disk.path}; refusing to guess which is which")


def _unsuitable(mon: Monitor, disk: BlockDisk) -> str | None:
    if disk.read_only:
        return "read-only"
    if disk.filename.startswith("json:"):
        return f"its image is not a plain file ({disk.filename[:60]}...)"
    if disk.format not in BACKUP_FORMATS:
        return f"format {disk.format} (only {', '.join(BACKUP_FORMATS)})"
    if file_protocol(mon, disk) is None:
        return f"not on a host file or block device ({disk.filename})"
    if disk.node.startswith("quiesce-"):
        return ("it is running on an overlay of an unfinished quiesce backup; commit it back "
                "first (see that backup's manifest)")
    return None


# --------------------------------------------------------------- snapshot


@dataclass(frozen=True)
class Overlay:
    """The overlay a snapshot put on top of a disk."""

    disk: BlockDisk
    path: str                       # host path of the overlay file ("" if unknown)
    node: str
    qemu_file: str | None = None    # QEMU's name for it, when not ``path``

    @property
    def file_in_qemu(self) -> str:
        return self.qemu_file if self.qemu_file is not None else self.path


def snapshot(mon: Monitor, overlays: list[Overlay], timeout: float) -> None:
    """Cut all disks at one instant: a single transaction, all or nothing."""
    actions = [{
        "type": "blockdev-snapshot-sync",
        "data": {**o.disk.target, "snapshot-file": o.path, "snapshot-node-name": o.node,
                 "format": "qcow2", "mode": "absolute-paths"},
    } for o in overlays]
    mon.execute("transaction", {"actions": actions}, timeout=timeout)


def nodes_using(mon: Monitor, path: str) -> list[str]:
    """Names of the nodes that have ``path`` open."""
    return [n.get("node-name", "") for n in mon.execute("query-named-block-nodes", {"flat": True})
            if n.get("file") == path]


def top_node(mon: Monitor, disk: BlockDisk) -> str | None:
    for entry in mon.execute("query-block"):
        if entry.get("qdev") == disk.qdev and entry.get("device") == disk.device:
            return (entry.get("inserted") or {}).get("node-name")
    return None


# ----------------------------------------------------------------- commit


def commit_back(mon: Monitor, overlay: Overlay, *, job_id: str, timeout: float,
                poll: Callable[[], None] | None = None) -> None:
    """Live-commit ``overlay`` into the disk's original node and drop it.

    Raises BlockJobError (or another QmpError) when the VM is still on the
    overlay afterwards.
    """
    # ``device`` names the root of the drive: its backend, else the overlay
    mon.execute("block-commit", {"device": overlay.disk.device or overlay.node,
                                 "job-id": job_id, "base-node": overlay.disk.node})

    def vanished() -> None:
        jobs = [j.get("device") for j in mon.execute("query-block-jobs")]
        if job_id not in jobs:
            # the event may have been queued meanwhile: let the wait look again
            event = mon.next_event(0.5)
            if event is not None:
                mon.requeue(event)
                return
            raise BlockJobError(f"block job {job_id} vanished without an event")
        if poll:
            poll()

    def ours(names: tuple[str, ...]) -> Callable[[dict[str, Any]], bool]:
        return lambda e: e.get("event") in names and (e.get("data") or {}).get("device") == job_id

    event = mon.wait_event(ours(("BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")),
                           timeout, what=f"BLOCK_JOB_READY for {job_id}", poll=vanished)
    if event["event"] == "BLOCK_JOB_READY":
        mon.execute("block-job-complete", {"device": job_id})
        event = mon.wait_event(ours(("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")), timeout,
                               what=f"BLOCK_JOB_COMPLETED for {job_id}", poll=vanished)
    data = event.get("data") or {}
    if event["event"] == "BLOCK_JOB_CANCELLED":
        raise BlockJobError(f"commit job {job_id} was cancelled")
    if data.get("error"):
        raise BlockJobError(f"commit job {job_id} failed: {data['error']}")
    now = top_node(mon, overlay.disk)
    if now != overlay.disk.node:
        raise BlockJobError(f"after commit, disk {overlay.disk.name} runs on node {now!r}, "
                            f"not on its original node {overlay.disk.node!r}")
