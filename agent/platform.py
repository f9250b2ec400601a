"""Everything the agent reads from or does to the operating system.

Handlers never touch /proc, /sys, /etc, ioctls or subprocesses directly:
they call ``ctx.platform``. Unit tests give the handlers a ``Platform``
whose ``root`` is a temporary directory holding a fake /proc, /sys and /etc
tree (or a subclass overriding the side-effecting methods), so they run
without root; the real behaviour is tested for real on loop devices and in
a QEMU guest.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pwd
import re
import socket
import stat as stat_module
import struct
import subprocess
import time
from dataclasses import dataclass, field
from typing import Sequence

from agent.hookproc import HookProcess


@dataclass
class Platform:
    root: str = "/"
    env: dict[str, str] = field(default_factory=dict)

    def path(self, path: str) -> str:
        """``path`` (absolute, as in the guest) under this platform's root."""
        if self.root == "/":
            return path
        return os.path.join(self.root, path.lstrip("/"))

    def read_text(self, path: str) -> str:
        with open(self.path(path), encoding="utf-8", errors="replace") as f:
            return f.read()

    def read_bytes(self, path: str) -> bytes:
        with open(self.path(path), "rb") as f:
            return f.read()

    def exists(self, path: str) -> bool:
        return os.path.exists(self.path(path))

    def listdir(self, path: str) -> list[str]:
        return sorted(os.listdir(self.path(path)))

    def readlink(self, path: str) -> str:
        return os.readlink(self.path(path))

    def realpath(self, path: str) -> str:
        """Resolve symlinks inside the platform root; the result is a guest path."""
        resolved = os.path.realpath(self.path(path))
        if self.root == "/":
            return resolved
        root = os.path.realpath(self.root)
        return "/" + os.path.relpath(resolved, root).lstrip("./") if resolved != root else "/"

    def run(self, argv: Sequence[str], *, input: bytes | None = None,
            timeout: float | None = None) -> subprocess.CompletedProcess:
        """Run a helper program (hwclock, shutdown, chpasswd...) and capture its output."""
        return subprocess.run(list(argv), input=input, capture_output=True,
                              timeout=timeout, check=False)

    # -- used by the command catalogue (agent/commands/*) ------------------
    # Everything below reaches the OS for one handler family; each method is
    # small so a test can override it with a recording fake.

    def getenv(self, name: str) -> str | None:
        """An environment variable: ``env`` first, then the process environment."""
        if name in self.env:
            return self.env[name]
        return os.environ.get(name)

    def scandir(self, path: str) -> list[os.DirEntry]:
        """Directory entries in the kernel's order (qemu-ga reports sysfs unsorted)."""
        with os.scandir(self.path(path)) as it:
            return list(it)

    def stat(self, path: str) -> os.stat_result:
        return os.stat(self.path(path))

    def statvfs(self, path: str) -> os.statvfs_result:
        return os.statvfs(self.path(path))

    def is_executable(self, path: str) -> bool:
        return os.access(self.path(path), os.X_OK)

    def find_program(self, name: str, search_path: str | None = None) -> str | None:
        """``name`` looked up in PATH (``search_path`` or this process's PATH), as glib does."""
        if "/" in name:
            return name if self.is_executable(name) else None
        dirs = (search_path if search_path is not None
                else self.getenv("PATH") or "/bin:/usr/bin").split(":")
        for d in dirs:
            candidate = os.path.join(d or ".", name)
            full = self.path(candidate) if candidate.startswith("/") else candidate
            if os.path.isfile(full) and os.access(full, os.X_OK):
                return candidate
        return None

    def read_prefix(self, path: str, size: int) -> bytes:
        """The first ``size`` bytes of a (sysfs) file, as one pread at offset 0."""
        fd = os.open(self.path(path), os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.pread(fd, size, 0)
        finally:
            os.close(fd)

    def write_file(self, path: str, data: bytes) -> None:
        """Write ``data`` at offset 0 of an existing file, no truncation (sysfs attributes)."""
        fd = os.open(self.path(path), os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.pwrite(fd, data, 0)
        finally:
            os.close(fd)

    def open_file(self, path: str, flags: int, mode: int = 0o666) -> int:
        """``open(2)``; a relative path is relative to the agent's working directory."""
        real = self.path(path) if path.startswith("/") else path
        return os.open(real, flags | os.O_CLOEXEC, mode)

    def mount_list(self) -> list[Mount]:
        """Local filesystems, as qemu-ga 7.2 lists them for fsfreeze, fstrim and fsinfo.

        /proc/self/mountinfo in mount order; pseudo and network filesystems
        (major number 0) are left out except btrfs, whose source device gives
        the real numbers. Not de-duplicated: a bind mount appears twice.
        Falls back to /proc/self/mounts when mountinfo cannot be opened.
        """
        try:
            raw = self.read_bytes("/proc/self/mountinfo")
        except OSError:
            return self._mount_list_from_mtab()
        mounts = []
        for line in raw.split(b"\n"):
            entry = _parse_mountinfo_line(line)
            if entry is None:
                continue
            dirname, devtype, source, major, minor = entry
            if major == 0:
                if devtype != "btrfs":
                    continue
                numbers = self._block_device_numbers(source)
                if not isinstance(numbers, tuple):
                    continue
                major, minor = numbers
            mounts.append(Mount(dirname, devtype, major, minor))
        return mounts

    def _mount_list_from_mtab(self) -> list[Mount]:
        mounts = []
        for line in self.read_bytes("/proc/self/mounts").split(b"\n"):
            fields = line.split()
            if len(fields) < 3:
                continue
            source, dirname, devtype = (os.fsdecode(_unescape_mount(f)) for f in fields[:3])
            if not source.startswith("/") or devtype in ("smbfs", "cifs"):
                continue
            numbers = self._block_device_numbers(source)
            if numbers == "directory":
                continue
            major, minor = numbers if isinstance(numbers, tuple) else (0, 0)
            mounts.append(Mount(dirname, devtype, major, minor))
        return mounts

    def _block_device_numbers(self, device: str) -> tuple[int, int] | str | None:
        """(major, minor) of a block device node, "directory" for a bind mount, else None."""
        try:
            st = self.stat(device)
        except OSError:
            return None
        if stat_module.S_ISDIR(st.st_mode):
            return "directory"
        if stat_module.S_ISBLK(st.st_mode):
            return os.major(st.st_rdev), os.minor(st.st_rdev)
        return None

    def fitrim(self, fd: int, minimum: int) -> tuple[int, int]:
        """FITRIM on an open directory of the filesystem: (minimum used, bytes trimmed)."""
        request = struct.pack("=QQQ", 0, 0xFFFFFFFFFFFFFFFF, minimum & 0xFFFFFFFFFFFFFFFF)
        result = fcntl.ioctl(fd, _FITRIM, request)
        _start, length, minlen = struct.unpack("=QQQ", result)
        return minlen, length

    def hostname(self) -> str:
        return socket.gethostname()

    def uname(self) -> os.uname_result:
        return os.uname()

    def time_ns(self) -> int:
        """Wall-clock time in ns at microsecond resolution (gettimeofday)."""
        return time.time_ns() // 1000 * 1000

    def settimeofday(self, seconds: int, microseconds: int) -> None:
        """Set the system clock. Raises OSError."""
        from agent import libc
        libc.settimeofday(seconds, microseconds)

    def local_year(self, seconds: int) -> int:
        """The calendar year of ``seconds`` since the epoch in local time."""
        return time.localtime(seconds).tm_year

    def local_timezone(self) -> tuple[str | None, int]:
        """(abbreviation, seconds east of UTC) of the local zone now.

        A TZ that names no zone file and is no POSIX zone rule means UTC, as
        in GLib (the C library would make up a zone from its first letters).
        """
        tz = self.getenv("TZ")
        if tz and not _known_zone(tz.lstrip(":")):
            return "UTC", 0
        now = time.localtime()
        return now.tm_zone, now.tm_gmtoff

    def clock_ticks(self) -> int:
        return os.sysconf("SC_CLK_TCK")

    def getifaddrs(self) -> list[IfAddr]:
        """Every entry of getifaddrs(3), in its order."""
        from agent import libc
        return [IfAddr(*entry) for entry in libc.getifaddrs()]

    def hardware_address(self, ifname: str) -> bytes:
        """The 6-byte MAC of an interface (SIOCGIFHWADDR). Raises OSError."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            request = struct.pack("16s16x", os.fsencode(ifname)[:15])
            result = fcntl.ioctl(sock.fileno(), _SIOCGIFHWADDR, request)
        return result[18:24]

    def getpwnam(self, name: str) -> Passwd | None:
        """The passwd entry of a user; with a root prefix, read from its /etc/passwd."""
        if self.root == "/":
            try:
                pw = pwd.getpwnam(name)
            except KeyError:
                return None
            return Passwd(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir)
        for line in self.read_text("/etc/passwd").splitlines():
            fields = line.split(":")
            if len(fields) >= 6 and fields[0] == name:
                return Passwd(name, int(fields[2]), int(fields[3]), fields[5])
        return None

    def mkdir(self, path: str, mode: int) -> None:
        os.mkdir(self.path(path), mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        os.chown(self.path(path), uid, gid)

    def chmod(self, path: str, mode: int) -> None:
        os.chmod(self.path(path), mode)

    def is_dir(self, path: str) -> bool:
        return os.path.isdir(self.path(path))

    def replace_file(self, path: str, data: bytes) -> None:
        """Write ``path`` atomically, as g_file_set_contents does: a temporary
        ``PATH.XXXXXX`` beside it, written, fsynced and renamed over it.
        Raises ReplaceError, which tells the failing step and temporary name."""
        real = self.path(path)
        try:
            fd, suffix = create_temporary(real, 0o666)
        except OSError as err:
            raise ReplaceError(err.errno, "create", f"{path}.{err.filename}") from None
        guest_tmp, tmp = f"{path}.{suffix}", f"{real}.{suffix}"
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError as err:
            os.close(fd)
            os.unlink(tmp)
            raise ReplaceError(err.errno, "write", guest_tmp) from None
        os.close(fd)
        try:
            os.rename(tmp, real)
        except OSError as err:
            os.unlink(tmp)
            raise ReplaceError(err.errno, "rename", guest_tmp) from None

    def run_helper(self, argv: Sequence[str], *, input: bytes | None = None,
                   setsid: bool = True) -> int:
        """Run a system helper the way qemu-ga forks one: stdio on /dev/null
        (or ``input`` on stdin), in a new session, waiting for it.

        ``argv[0]`` is the program's path (inside the platform root). Returns
        the exit status, or -N when killed by signal N; a program that
        cannot be executed counts as exit status 1, like qemu-ga's child
        that fails its exec and calls ``_exit(EXIT_FAILURE)``.
        """
        program = self.path(argv[0]) if argv[0].startswith("/") else argv[0]
        try:
            proc = subprocess.Popen([os.path.basename(argv[0]), *argv[1:]],
                                    executable=program,
                                    stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=setsid)
        except OSError:
            return 1
        try:
            proc.communicate(input)
        except BrokenPipeError:
            proc.wait()
        return proc.returncode

    def spawn(self, argv: Sequence[bytes], *, executable: str,
              env: Sequence[tuple[bytes, bytes]] | None,
              stdin: bool, capture: bool) -> subprocess.Popen:
        """Start a guest-exec child: pipes for stdin (when ``stdin``) and for
        stdout/stderr (when ``capture``), /dev/null otherwise. ``env`` is the
        whole environment as (name, value) pairs, duplicates kept in order as
        execve(2) takes them. Raises OSError."""
        real = self.path(executable) if executable.startswith("/") else executable
        pipe_or_null = subprocess.PIPE if capture else subprocess.DEVNULL
        return subprocess.Popen(list(argv), executable=real,
                                env=_PairEnvironment(env) if env is not None else None,
                                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                stdout=pipe_or_null, stderr=pipe_or_null,
                                close_fds=True, restore_signals=True)

    def nvme_smart_log(self, devnode: str) -> bytes | None:
        """The 512-byte SMART / health log page of an NVMe device, or None."""
        from agent import libc
        buf, address = libc.buffer(512)
        cmd = struct.pack("=BBHIIIQQIIIIIIIIII",
                          0x02, 0, 0, 0xFFFFFFFF, 0, 0, 0, address,
                          0, 512, 0x02 | (1 << 15) | ((512 // 4 - 1) << 16),
                          0, 0, 0, 0, 0, 0, 0)
        try:
            fd = os.open(self.path(devnode), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            fcntl.ioctl(fd, _NVME_IOCTL_ADMIN_CMD, cmd)
        except OSError:
            return None
        finally:
            os.close(fd)
        return buf.raw

    # -- fsfreeze (agent core): FIFREEZE/FITHAW and the freeze hook ----------

    def open_mountpoint(self, dirname: str) -> int:
        """Open a mount point read-only for FIFREEZE/FITHAW; raises OSError."""
        return os.open(self.path(dirname), os.O_RDONLY | os.O_CLOEXEC)

    def fifreeze(self, fd: int) -> None:
        fcntl.ioctl(fd, _FIFREEZE, 0)

    def fithaw(self, fd: int) -> None:
        fcntl.ioctl(fd, _FITHAW, 0)

    def close_fd(self, fd: int) -> None:
        os.close(fd)

    def run_hook(self, path: str, arg: str, *, timeout: float | None = None,
                 capture: bool = False) -> HookRun:
        """Run the fsfreeze hook as qemu-ga does: ``path arg``, stdin on
        /dev/null, a new session, the agent's environment and directory,
        waiting for the hook process itself (not for children it leaves
        running, see agent.hookproc).

        qemu-ga sends the hook's output to /dev/null and waits forever;
        ``capture`` collects stdout+stderr instead, and ``timeout`` kills the
        hook's whole session (TERM, then KILL) when it runs too long. A hook
        that cannot be executed counts as exit status 1, as in qemu-ga.
        """
        read_fd, write_fd = os.pipe() if capture else (None, subprocess.DEVNULL)
        try:
            proc = subprocess.Popen([path, arg], executable=self.path(path),
                                    stdin=subprocess.DEVNULL, stdout=write_fd, stderr=write_fd,
                                    start_new_session=True, close_fds=True)
        except OSError:
            if read_fd is not None:
                os.close(read_fd)
            return HookRun(1, b"", False)
        finally:
            if read_fd is not None:
                os.close(write_fd)
        hook = HookProcess(proc, read_fd)
        status, output, timed_out = hook.finish(timeout)
        return HookRun(status, output, timed_out, hook.output_dropped)


# -- values and helpers of the catalogue methods above ----------------------

_TMP_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def create_temporary(path: str, mode: int) -> tuple[int, str]:
    """Create ``PATH.XXXXXX`` (six random letters or digits) exclusively, as
    g_mkstemp does: (write-only fd, the suffix). An OSError carries the
    suffix of the name it failed on as its ``filename``."""
    suffix = ""
    for _ in range(100):
        suffix = "".join(_TMP_LETTERS[b % len(_TMP_LETTERS)] for b in os.urandom(6))
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            return os.open(f"{path}.{suffix}", flags, mode), suffix
        except FileExistsError:
            continue
        except OSError as err:
            raise OSError(err.errno, err.strerror, suffix) from None
    raise OSError(errno.EEXIST, os.strerror(errno.EEXIST), suffix)

_FITRIM = 0xC0185879            # _IOWR('X', 121, struct fstrim_range)
_SIOCGIFHWADDR = 0x8927
_NVME_IOCTL_ADMIN_CMD = 0xC0484E41  # _IOWR('N', 0x41, struct nvme_passthru_cmd)


@dataclass(frozen=True)
class Mount:
    dirname: str
    devtype: str
    devmajor: int
    devminor: int


@dataclass(frozen=True)
class IfAddr:
    name: str
    family: int | None
    address: bytes | None
    netmask: bytes | None


@dataclass(frozen=True)
class Passwd:
    name: str
    uid: int
    gid: int
    home: str


def _unescape_mount(field: bytes) -> bytes:
    r"""Decode the octal escapes (``\040``) the kernel puts in mount tables."""
    return re.sub(rb"\\([0-3][0-7][0-7])", lambda m: bytes([int(m.group(1), 8)]),
                  field.replace(b"\\\\", b"\\134"))


def _parse_mountinfo_line(line: bytes) -> tuple[str, str, str, int, int] | None:
    """(mount point, fs type, source, major, minor) of one mountinfo line, or None."""
    m = re.match(rb"\s*\d+\s+\d+\s+(\d+):(\d+)\s+\S+\s+(\S+)\s", line)
    if not m:
        return None
    rest = line[m.end(3):]
    dash = rest.find(b" - ")
    if dash < 0:
        return None
    tail = re.match(rb" - (\S+)\s+(\S+)\s", rest[dash:])
    if not tail:
        return None
    return (os.fsdecode(_unescape_mount(m.group(3))), os.fsdecode(tail.group(1)),
            os.fsdecode(_unescape_mount(tail.group(2))),
            int(m.group(1)) & 0xFFFFFFFF, int(m.group(2)) & 0xFFFFFFFF)


_POSIX_TZ = re.compile(r"(?:[A-Za-z]{3,}|<[A-Za-z0-9+-]{3,}>)[+-]?\d{1,2}(?::\d{1,2}){0,2}")


def _known_zone(name: str) -> bool:
    """A zone file (absolute, or under TZDIR or /usr/share/zoneinfo) or a POSIX rule."""
    if name.startswith("/"):
        return os.path.isfile(name)
    zonedir = os.environ.get("TZDIR") or "/usr/share/zoneinfo"
    if name and ".." not in name.split("/") and os.path.isfile(os.path.join(zonedir, name)):
        return True
    return bool(_POSIX_TZ.match(name))


class ReplaceError(OSError):
    """A failed :meth:`Platform.replace_file`: ``step`` is "create", "write" or
    "rename", ``tmp`` the temporary file's (guest) path."""

    def __init__(self, errno_: int, step: str, tmp: str) -> None:
        super().__init__(errno_, os.strerror(errno_))
        self.step = step
        self.tmp = tmp


class _PairEnvironment(dict):
    """An environment subprocess passes on entry by entry, duplicates included
    (it only iterates ``items()`` to build the child's environ)."""

    def __init__(self, pairs: Sequence[tuple[bytes, bytes]]) -> None:
        super().__init__(pairs)
        self.pairs = list(pairs)

    def items(self):
        return list(self.pairs)


@dataclass(frozen=True)
class HookRun:
    """How an fsfreeze hook ended: exit status (-N: killed by signal N), the
    output it wrote before it exited (when captured), whether it timed out."""
    status: int
    output: bytes
    timed_out: bool
    dropped: int = 0            # bytes of output past agent.hookproc.OUTPUT_LIMIT


_FIFREEZE = 0xC0045877          # _IOWR('X', 119, int)
_FITHAW = 0xC0045878            # _IOWR('X', 120, int)
