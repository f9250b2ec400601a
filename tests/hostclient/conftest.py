"""Fixtures for the host client tests: fake and real agents on unix sockets."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from hc_fake_agent import FakeAgent

#: Commands the host's real qemu-ga must never run here: it would act on
#: this machine (freeze its filesystems, shut it down, change its clock...).
DANGEROUS = ",".join([
    "guest-fsfreeze-freeze", "guest-fsfreeze-freeze-list", "guest-fsfreeze-thaw",
    "guest-fstrim", "guest-shutdown", "guest-suspend-disk", "guest-suspend-ram",
    "guest-suspend-hybrid", "guest-set-time", "guest-set-user-password", "guest-set-vcpus",
    "guest-set-memory-blocks", "guest-exec", "guest-file-open", "guest-file-write",
    "guest-ssh-add-authorized-keys", "guest-ssh-remove-authorized-keys",
])


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for unix sockets (paths are limited to 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="qhc-", dir="/tmp"))
    try:
        yield path
    finally:
        for child in path.iterdir():
            child.unlink()
        path.rmdir()


@pytest.fixture
def fake_agent(sockdir: Path) -> Iterator[FakeAgent]:
    with FakeAgent(str(sockdir / "agent.sock")) as agent:
        yield agent


@pytest.fixture
def host_qemu_ga(qemu_ga: str, sockdir: Path) -> Iterator[str]:
    """The real qemu-ga on a unix socket, with every command that would touch
    this host blocked. Yields the socket path."""
    path = sockdir / "qga.sock"
    state = Path(tempfile.mkdtemp(prefix="qga-state-"))
    proc = subprocess.Popen([qemu_ga, "-m", "unix-listen", "-p", str(path), "-t", str(state),
                             "-b", DANGEROUS], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not path.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"qemu-ga did not start: {proc.stderr.read().decode()}")
            time.sleep(0.02)
        yield str(path)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)
        proc.stderr.close()
        for child in state.iterdir():
            child.unlink()
        state.rmdir()


class PausedVM:
    """A real QEMU with disks attached and no guest code running (-S).

    Block jobs, snapshots and commits work on it exactly as on a running
    VM; it starts in a fraction of a second and needs no kernel.
    """

    def __init__(self, qemu: str, qemu_img: str, workdir: Path, sockdir: Path) -> None:
        self.qemu = qemu
        self.qemu_img = qemu_img
        self.workdir = workdir
        self.qmp = str(sockdir / "qmp.sock")
        self.qmp2 = str(sockdir / "qmp2.sock")      # a second monitor for the test itself
        self.proc: subprocess.Popen | None = None
        self.images: dict[str, Path] = {}

    def image(self, name: str, fmt: str, size: str = "8M", data: bytes = b"") -> Path:
        path = self.workdir / f"{name}.{fmt}"
        subprocess.run([self.qemu_img, "create", "-q", "-f", fmt, str(path), size], check=True)
        if data:                          # the pattern lands at 1 MiB
            raw = self.workdir / f"{name}.pattern"
            subprocess.run(["truncate", "-s", size, str(raw)], check=True)
            with open(raw, "r+b") as f:
                f.seek(1 << 20)
                f.write(data)
            subprocess.run([self.qemu_img, "convert", "-q", "-f", "raw", "-O", fmt, str(raw),
                            str(path)], check=True)
            raw.unlink()
        self.images[name] = path
        return path

    def start(self, args: list[str], *, cwd: Path | None = None) -> None:
        """Start QEMU with ``args`` (in ``cwd``: relative image names are
        relative to QEMU's working directory)."""
        cmd = [self.qemu, "-machine", "q35", "-accel", "tcg", "-S", "-nodefaults",
               "-display", "none", "-qmp", f"unix:{self.qmp},server=on,wait=off",
               "-qmp", f"unix:{self.qmp2},server=on,wait=off", *args]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, cwd=cwd)
        deadline = time.monotonic() + 10
        while not (os.path.exists(self.qmp) and os.path.exists(self.qmp2)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"QEMU did not start: {self.proc.stderr.read().decode()}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.proc.stderr.close()

    @staticmethod
    def blockdev(node: str, path: Path, fmt: str, dev_id: str) -> list[str]:
        return ["-blockdev", f"driver=file,filename={path},node-name={node}-file",
                "-blockdev", f"driver={fmt},file={node}-file,node-name={node}",
                "-device", f"virtio-blk-pci,drive={node},id={dev_id}"]


@pytest.fixture
def paused_vm(qemu_system: str, qemu_img: str, tmp_path: Path, sockdir: Path) -> Iterator[PausedVM]:
    vm = PausedVM(qemu_system, qemu_img, tmp_path, sockdir)
    try:
        yield vm
    finally:
        vm.stop()
