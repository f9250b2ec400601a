"""A real Linux guest for end-to-end tests, booted with QEMU.

``boot_guest(spec)`` boots the kernel and initramfs of :mod:`guest_build`
with the host's root shared read-only over virtio-9p, one or more ext4 data
disks on qcow2 images, a guest agent on the ``org.qemu.guest_agent.0`` port
(the real qemu-ga, the project's qga, or none), QMP on a unix socket, an
optional writer workload, and a control port running a busybox shell loop so
tests can run commands in the guest independently of the agent under test.
Teardown is guaranteed: QMP ``quit``, then SIGKILL by pid, then the sockets
and the work directory are removed.

The host-side checks of a backup of such a disk (``qemu-img check``,
``e2fsck -fn``, every writer file against its checksum) live here too, so
the test and ``make demo`` prove the same things.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from guest_build import REPO, GuestImage, GuestUnavailable, ensure_guest_image

HERE = Path(__file__).resolve().parent
AGENT_PORT = "org.qemu.guest_agent.0"

#: the agents a real-guest test runs: the reference qemu-ga and the project's qga
AGENTS = ("qemu-ga", "qga")
CTL_PORT = "org.quiesce.ctl"
GUEST_PYTHON = "/usr/bin/python3"


class GuestError(Exception):
    """The guest misbehaved: did not boot, a command failed, a check failed."""


# ------------------------------------------------------------------ spec


def agent_command(name: str, extra: tuple[str, ...] = ()) -> str:
    """The guest command line that runs agent ``name`` on the agent port."""
    port = f"/dev/virtio-ports/{AGENT_PORT}"
    state = "/run/qga-state"
    more = "".join(f" {shlex.quote(a)}" for a in extra)
    if name == "qemu-ga":
        return f"mkdir -p {state}\nexec /usr/sbin/qemu-ga -m virtio-serial -p {port} -t {state}{more}"
    if name == "qga":
        return (f"mkdir -p {state}\ncd {REPO}\nPYTHONDONTWRITEBYTECODE=1 exec {REPO}/.venv/bin/python"
                f" -m agent -m virtio-serial -p {port} -t {state}{more}")
    raise ValueError(f"unknown agent {name!r} (qemu-ga, qga)")


@dataclass(frozen=True)
class DataDisk:
    """A qcow2 data disk: host image, the guest's serial, QMP node name, mount."""

    image: Path
    serial: str = "data"
    node: str = "data0"
    mountpoint: str | None = "/data"


@dataclass(frozen=True)
class GuestSpec:
    agent: str | None = "qemu-ga"
    agent_args: tuple[str, ...] = ()       # e.g. ("-F/path/to/hook",)
    disks: tuple[DataDisk, ...] = ()
    writer_dir: str | None = None          # e.g. "/data/w": run the writer there
    writer_args: tuple[str, ...] = ()
    memory_mb: int = 512
    smp: int = 1
    ninep_cache: str = "loose"
    qemu_cwd: Path | None = None           # QEMU's working directory (relative disk images)


def make_ext4_qcow2(path: Path, size: str = "256M", qemu_img: str = "qemu-img") -> Path:
    """A qcow2 image holding an empty ext4 filesystem (test fixture only)."""
    raw = path.with_suffix(".raw.tmp")
    try:
        subprocess.run(["truncate", "-s", size, str(raw)], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "data", str(raw)], check=True)
        subprocess.run([qemu_img, "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)],
                       check=True)
    finally:
        raw.unlink(missing_ok=True)
    return path


def kvm_usable() -> bool:
    """Real hardware KVM (not the paravirtual kvm_pvm a stock kernel hangs on)."""
    return (os.path.exists("/sys/module/kvm_intel") or os.path.exists("/sys/module/kvm_amd")) \
        and os.access("/dev/kvm", os.R_OK | os.W_OK)


# ----------------------------------------------------------------- guest


@dataclass
class CommandResult:
    rc: int
    output: str


@dataclass
class Guest:
    """A running guest; build it with :func:`boot_guest`."""

    spec: GuestSpec
    image: GuestImage
    workdir: Path
    qemu: str
    process: subprocess.Popen | None = None
    boot_seconds: float = 0.0
    _ctl: socket.socket | None = field(default=None, repr=False)
    _ctl_buf: bytes = b""

    @property
    def qmp_socket(self) -> Path:
        return self.workdir / "qmp.sock"

    @property
    def agent_socket(self) -> Path:
        return self.workdir / "qga.sock"

    @property
    def ctl_socket(self) -> Path:
        return self.workdir / "ctl.sock"

    @property
    def serial_log(self) -> Path:
        return self.workdir / "serial.log"

    # -------------------------------------------------------------- boot

    def command_line(self) -> list[str]:
        accel = ["-accel", "kvm", "-cpu", "host"] if kvm_usable() else ["-accel", "tcg,tb-size=64"]
        args = [
            self.qemu, *accel, "-machine", "q35", "-m", str(self.spec.memory_mb),
            "-smp", str(self.spec.smp), "-nodefaults", "-display", "none", "-no-reboot",
            "-bios", "/usr/share/qemu/qboot.rom",
            "-kernel", str(self.image.vmlinux), "-initrd", str(self.image.initramfs),
            "-append", (f"console=ttyS0 panic=-1 quiet quiesce.run={self.workdir}/run.sh"
                        f" quiesce.9pcache={self.spec.ninep_cache}"),
            "-serial", f"file:{self.serial_log}",
            "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
            "-device", "virtio-rng-pci",
            "-device", "virtio-serial-pci,id=vser0",
            "-chardev", f"socket,path={self.agent_socket},server=on,wait=off,id=qga0",
            "-device", f"virtserialport,chardev=qga0,name={AGENT_PORT}",
            "-chardev", f"socket,path={self.ctl_socket},server=on,wait=off,id=ctl0",
            "-device", f"virtserialport,chardev=ctl0,name={CTL_PORT}",
            "-qmp", f"unix:{self.qmp_socket},server=on,wait=off",
        ]
        for disk in self.spec.disks:
            args += [
                "-blockdev", f"driver=file,filename={disk.image},node-name={disk.node}-file",
                "-blockdev", f"driver=qcow2,file={disk.node}-file,node-name={disk.node}",
                "-device", f"virtio-blk-pci,drive={disk.node},serial={disk.serial},id={disk.node}-dev",
            ]
        return args

    def run_script(self) -> str:
        """The per-boot script stage 2 sources (see guest_stage2.sh)."""
        lines = ["B=/bin/busybox"]
        for disk in self.spec.disks:
            if disk.mountpoint:
                mp = shlex.quote(disk.mountpoint)
                lines += [f"$B mkdir -p {mp}",
                          f"$B mount -t ext4 /dev/disk/by-serial/{disk.serial} {mp}"
                          f" || echo 'guest: cannot mount {disk.serial}'"]
        if self.spec.agent:
            (self.workdir / "agent.sh").write_text(
                agent_command(self.spec.agent, self.spec.agent_args) + "\n")
            lines += [f"$B cp {self.workdir}/agent.sh /run/guest/agent.sh",
                      "$B sh /run/guest/agent.sh > /run/guest/agent.log 2>&1 &",
                      "echo $! > /run/guest/agent.pid"]
        if self.spec.writer_dir:
            argv = [GUEST_PYTHON, str(HERE / "guest_writer.py"), self.spec.writer_dir,
                    *self.spec.writer_args]
            lines += [f"{shlex.join(argv)} > /run/guest/writer.log 2>&1 &",
                      "echo $! > /run/guest/writer.pid"]
        lines += [(HERE / "guest_ctl.sh").read_text()]
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 90.0) -> None:
        (self.workdir / "run.sh").write_text(self.run_script())
        started = time.monotonic()
        self.process = subprocess.Popen(self.command_line(), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        cwd=self.spec.qemu_cwd)
        self.run("true", timeout=timeout)
        if self.spec.agent:
            self.wait_agent(timeout=max(5.0, timeout - (time.monotonic() - started)))
        self.boot_seconds = time.monotonic() - started

    def _check_alive(self) -> None:
        if self.process is None or self.process.poll() is not None:
            out = self.process.stdout.read().decode(errors="replace") if self.process else ""
            raise GuestError(f"QEMU exited ({self.process and self.process.returncode}): "
                             f"{out.strip()[-500:]}\nserial log:\n{self.console()[-2000:]}")

    def console(self) -> str:
        try:
            return self.serial_log.read_text(errors="replace")
        except OSError:
            return ""

    # ----------------------------------------------------- control port

    def _ctl_connect(self, deadline: float) -> socket.socket:
        while self._ctl is None:
            self._check_alive()
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(str(self.ctl_socket))
                self._ctl = sock
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise GuestError("QEMU never opened the control socket") from None
                time.sleep(0.05)
        return self._ctl

    def run(self, command: str, timeout: float = 30.0, check: bool = False) -> CommandResult:
        """Run a shell command in the guest (busybox sh) and return rc + output.

        Answers are matched by a random token, so a late answer to an
        earlier, timed-out command is skipped.
        """
        deadline = time.monotonic() + timeout
        sock = self._ctl_connect(deadline)
        token = secrets.token_hex(6)
        # Sent once: QEMU queues bytes until the guest's loop opens the port.
        sock.sendall(f"{token} {base64.b64encode(command.encode()).decode()}\n".encode())
        while True:
            now = time.monotonic()
            if now > deadline:
                raise GuestError(f"guest did not answer {command!r} within {timeout} s\n"
                                 f"serial log:\n{self.console()[-2000:]}")
            self._check_alive()
            line = self._ctl_line(sock, min(0.2, max(0.01, deadline - now)))
            if line is None:
                continue
            parts = line.split(" ", 2)
            if len(parts) >= 2 and parts[0] == token:
                output = base64.b64decode(parts[2]).decode(errors="replace") if len(parts) == 3 else ""
                result = CommandResult(int(parts[1]), output)
                if check and result.rc != 0:
                    raise GuestError(f"guest command {command!r} failed ({result.rc}): {output}")
                return result

    def _ctl_line(self, sock: socket.socket, wait: float) -> str | None:
        if b"\n" not in self._ctl_buf:
            sock.settimeout(wait)
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                return None
            if not chunk:
                self._ctl = None
                sock.close()
                raise GuestError("control socket closed by QEMU")
            self._ctl_buf += chunk
            if b"\n" not in self._ctl_buf:
                return None
        line, self._ctl_buf = self._ctl_buf.split(b"\n", 1)
        return line.decode(errors="replace").strip()

    # ------------------------------------------------------------- agent

    def wait_agent(self, timeout: float = 30.0) -> None:
        """Wait until the agent answers guest-sync-delimited on its socket."""
        deadline = time.monotonic() + timeout
        next_look = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            self._check_alive()
            if raw_agent_sync(self.agent_socket, 1.0):
                return
            if time.monotonic() > next_look:
                if self.run("kill -0 $(cat /run/guest/agent.pid)", timeout=10).rc != 0:
                    break
                next_look = time.monotonic() + 3.0
        log = self.run("cat /run/guest/agent.log; ps", timeout=10).output
        raise GuestError(f"agent {self.spec.agent} did not answer within {timeout} s:\n{log}")

    def writer_progress(self) -> int:
        """How many files the writer has completed (0 before the first)."""
        out = self.run("cat /run/guest/writer.status 2>/dev/null || echo 0", timeout=30).output
        return int(out.split()[0]) if out.split() else 0

    def wait_writer(self, files: int, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while True:
            done = self.writer_progress()
            if done >= files:
                return done
            if time.monotonic() > deadline:
                log = self.run("cat /run/guest/writer.log", timeout=10).output
                raise GuestError(f"writer wrote {done} of {files} files in {timeout} s: {log}")
            time.sleep(0.3)

    # -------------------------------------------------------------- stop

    def stop(self, timeout: float = 10.0) -> None:
        """Quit QEMU (QMP quit, then SIGKILL) and forget the control socket."""
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None
        proc = self.process
        if proc is None:
            return
        try:
            if proc.poll() is None:
                raw_qmp_quit(self.qmp_socket, 2.0)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(10)
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
            if proc.stdout:
                proc.stdout.close()


@contextlib.contextmanager
def boot_guest(spec: GuestSpec, qemu: str = "qemu-system-x86_64",
               image: GuestImage | None = None, timeout: float = 90.0) -> Iterator[Guest]:
    """Boot a guest, yield it, and always tear it down (process, sockets, dir)."""
    image = image or ensure_guest_image()
    # Unix socket paths are limited to 108 bytes: keep the directory short.
    workdir = Path(tempfile.mkdtemp(prefix="qg-", dir="/tmp"))
    os.chmod(workdir, 0o755)  # the guest reads run.sh through 9p
    guest = Guest(spec, image, workdir, qemu)
    try:
        guest.start(timeout)
        yield guest
    finally:
        try:
            guest.stop()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


# ------------------------------------------------- minimal raw protocols
# Deliberately independent of hostclient: the fixture must not trust the
# code it tests.


def raw_agent_sync(path: Path, timeout: float) -> bool:
    """One guest-sync-delimited round trip on an agent socket."""
    token = secrets.randbelow(1 << 31)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(b"\xff" + json.dumps({"execute": "guest-sync-delimited",
                                               "arguments": {"id": token}}).encode() + b"\n")
            buf = b""
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                chunk = sock.recv(4096)
                if not chunk:
                    return False
                buf += chunk
                if b"\xff" in buf:
                    tail = buf.rsplit(b"\xff", 1)[1]
                    if b"\n" in tail:
                        return json.loads(tail.split(b"\n", 1)[0]).get("return") == token
    except (OSError, ValueError):
        return False
    return False


def raw_qmp(path: Path, commands: list[dict], timeout: float = 5.0) -> list[dict]:
    """Send QMP commands after negotiation; return their replies (events skipped)."""
    replies = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        reader = sock.makefile("rb")
        json.loads(reader.readline())  # greeting
        for cmd in [{"execute": "qmp_capabilities"}, *commands]:
            sock.sendall(json.dumps(cmd).encode() + b"\n")
            while True:
                line = reader.readline()
                if not line:
                    return replies
                msg = json.loads(line)
                if "event" not in msg:
                    break
            replies.append(msg)
    return replies[1:]


def raw_qmp_quit(path: Path, timeout: float) -> None:
    with contextlib.suppress(OSError, ValueError):
        raw_qmp(path, [{"execute": "quit"}], timeout)


# ------------------------------------------------- checking a backup copy


@dataclass
class FsReport:
    """What the host-side checks of a backed-up ext4 image found."""

    qemu_img_check: str
    e2fsck: str
    files_verified: int
    temp_files: int
    bad_files: list[str]


def verify_ext4_backup(image: Path, fs_dir: str, scratch: Path,
                       qemu_img: str = "qemu-img") -> FsReport:
    """qemu-img check, e2fsck -fn and every writer file against its checksum.

    ``fs_dir`` is the writer's directory inside the filesystem (e.g. ``/w``
    for a writer in ``/data/w`` with the disk mounted on ``/data``). Raises
    :class:`GuestError` naming the first check that fails.
    """
    check = subprocess.run([qemu_img, "check", str(image)], capture_output=True, text=True)
    if check.returncode != 0:
        raise GuestError(f"qemu-img check {image} failed ({check.returncode}): "
                         f"{check.stdout}{check.stderr}")
    raw = scratch / "fs.raw"
    subprocess.run([qemu_img, "convert", "-U", "-O", "raw", str(image), str(raw)], check=True)
    try:
        fsck = subprocess.run(["e2fsck", "-fn", str(raw)], capture_output=True, text=True)
        if fsck.returncode != 0:
            raise GuestError(f"e2fsck -fn found problems ({fsck.returncode}): "
                             f"{fsck.stdout}{fsck.stderr}")
        dump = scratch / "dump"
        dump.mkdir(exist_ok=True)
        rd = subprocess.run(["debugfs", "-R", f"rdump {fs_dir} {dump}", str(raw)],
                            capture_output=True, text=True)
        target = dump / Path(fs_dir).name
        if rd.returncode != 0 or not target.is_dir():
            raise GuestError(f"debugfs rdump {fs_dir} failed: {rd.stderr.strip()}")
        return _check_writer_files(target, check.stdout.strip(), fsck.stdout.strip())
    finally:
        raw.unlink(missing_ok=True)


_FINAL = re.compile(r"^f-(\d{8})-([0-9a-f]{64})\.bin$")


def _check_writer_files(directory: Path, check_out: str, fsck_out: str) -> FsReport:
    verified = temp = 0
    bad = []
    for path in sorted(directory.iterdir()):
        match = _FINAL.match(path.name)
        if match is None:
            temp += path.name.startswith(".tmp-")
            continue
        if hashlib.sha256(path.read_bytes()).hexdigest() != match.group(2):
            bad.append(path.name)
        else:
            verified += 1
    if bad:
        raise GuestError(f"{len(bad)} files do not match their checksum: {bad[:5]}")
    return FsReport(check_out, fsck_out, verified, temp, bad)


__all__ = ["Guest", "GuestSpec", "DataDisk", "GuestError", "GuestUnavailable", "boot_guest",
           "make_ext4_qcow2", "verify_ext4_backup", "raw_qmp", "raw_agent_sync", "kvm_usable",
           "ensure_guest_image", "agent_command"]
