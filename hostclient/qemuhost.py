"""Where the image names QEMU reports point on this host.

QEMU reports a ``-drive file=disk0.qcow2`` exactly as given: relative to the
working directory QEMU had when it opened the image. The backup reads those
images itself, so it must find the very file QEMU has open, not a file of
the same name in its own working directory.

:class:`QemuProcess` is what this host can see of the QEMU behind a QMP
socket (its pid comes from ``SO_PEERCRED`` on that socket): its working
directory (``/proc/PID/cwd``) and the files it has open (``/proc/PID/fd``).
:meth:`QemuProcess.resolve` turns a name into a host path and vouches for it
by identity: the path must be a file QEMU has open (same device and inode).
When that cannot be shown — QEMU moved to ``/`` with ``-daemonize``, the
file was renamed or replaced, QEMU runs in another PID or mount namespace,
or its ``/proc`` entries are not readable — it raises
:class:`~hostclient.errors.BackupError` with the one line to act on. An
absolute name is used as it is only when QEMU's open files cannot be read at
all (as before; nothing better is known).
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass

from hostclient.errors import BackupError

_UCRED = struct.Struct("iII")       # struct ucred: pid, uid, gid
ABSOLUTE_HINT = "start QEMU with absolute image paths"


def peer_pid(sock: socket.socket) -> int | None:
    """The pid of the process at the other end of a unix socket (None if it
    is not visible from here, e.g. in another PID namespace)."""
    try:
        data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    pid = _UCRED.unpack(data)[0]
    return pid if pid > 0 else None


FileId = tuple[int, int]            # (st_dev, st_ino)


@dataclass(frozen=True)
class QemuProcess:
    """What this host can see of one QEMU process."""

    pid: int | None
    cwd: str | None                     # None: unknown, see problem
    open_files: frozenset[FileId] | None
    problem: str | None = None          # why cwd or open_files is unknown

    @classmethod
    def inspect(cls, pid: int | None) -> "QemuProcess":
        if pid is None:
            return cls(None, None, None, "the process serving the QMP socket cannot be "
                                         "identified from here (another PID namespace?)")
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
            opened = frozenset(_open_file_ids(pid))
        except OSError as exc:
            return cls(pid, None, None, f"cannot look into QEMU's process {pid} "
                                        f"({exc.filename}: {exc.strerror}); run quiesce as root "
                                        "or as QEMU's user")
        if cwd.endswith(" (deleted)"):
            return cls(pid, None, opened, f"QEMU's working directory was deleted ({cwd})")
        return cls(pid, cwd, opened)

    def resolve(self, name: str, what: str) -> str:
        """The host path of the image QEMU calls ``name``; ``what`` names it in
        errors ("disk vda", "disk vda's backing file")."""
        if os.path.isabs(name):
            if self.open_files is not None and _file_id(name) not in self.open_files:
                raise BackupError(
                    f"{what}: {name} is not the file QEMU has open (renamed or replaced "
                    "since QEMU opened it, or QEMU runs in another mount namespace); "
                    "refusing to back up a different file")
            return name
        head = (f"{what}: QEMU names the image by the relative path {name!r}, relative to "
                "the directory QEMU was started in")
        if self.cwd is None or self.open_files is None:
            raise BackupError(f"{head}, and {self.problem}; {ABSOLUTE_HINT}")
        path = os.path.join(self.cwd, name)
        if _file_id(path) not in self.open_files:
            raise BackupError(
                f"{head}, which is not its working directory now ({self.cwd}): QEMU changes it "
                f"with -daemonize or -chroot, or the file was renamed since; cannot tell which "
                f"file it is; {ABSOLUTE_HINT}")
        return path


def _file_id(path: str) -> FileId | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _open_file_ids(pid: int) -> list[FileId]:
    """(device, inode) of every file the process has open."""
    fd_dir = f"/proc/{pid}/fd"
    ids = []
    for fd in os.listdir(fd_dir):
        found = _file_id(os.path.join(fd_dir, fd))      # follows the link to the open file
        if found is not None:
            ids.append(found)
    return ids


def same_file(a: str, b: str) -> bool:
    """Whether two paths name one file (False if either is missing)."""
    first = _file_id(a)
    return first is not None and first == _file_id(b)
