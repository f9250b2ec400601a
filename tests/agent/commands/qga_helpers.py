"""Helpers for the command catalogue tests (imported by the tests and conftest.py).

* ``make_tree`` builds a fake guest tree (/proc, /sys, /etc...) under
  tmp_path from literal files and symlinks, so handlers run against a
  Platform rooted there.
* ``RecordingPlatform`` records every call that would change the machine
  (clock, helpers such as shutdown/chpasswd, sysfs writes, ownership)
  instead of making it.
* ``agent_call``: call a handler the way the dispatcher does (wire argument
  names, errors as ``{"error": {"class", "desc"}}``).
* ``AgentClient``/``start_agent``: talk to an agent (the real qemu-ga or
  ours) on a unix socket, with every machine-changing command blocked.
* ``shape``: the JSON shape of a value, for answers that describe a
  changing machine.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import agent.commands
from agent.context import Context
from agent.errors import AgentError
from agent.platform import Platform
from agent.registry import COMMANDS

agent.commands.load_all()

#: commands the reference agent must never run on this machine
DANGEROUS = (
    "guest-shutdown", "guest-suspend-disk", "guest-suspend-ram", "guest-suspend-hybrid",
    "guest-set-time", "guest-set-user-password", "guest-set-vcpus",
    "guest-set-memory-blocks", "guest-fsfreeze-freeze", "guest-fsfreeze-freeze-list",
    "guest-fstrim", "guest-ssh-add-authorized-keys", "guest-ssh-remove-authorized-keys",
)


@dataclass(frozen=True)
class Link:
    """A symlink in a fake tree, to an absolute guest path (made relative on disk)."""
    target: str


def make_tree(root: Path, spec: dict[str, Any]) -> Path:
    """Create ``spec`` (guest path -> str/bytes content, Link, or None for a
    directory) under ``root``."""
    for guest_path, content in spec.items():
        path = root / guest_path.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            path.mkdir(parents=True, exist_ok=True)
        elif isinstance(content, Link):
            target = root / content.target.lstrip("/")
            path.symlink_to(os.path.relpath(target, path.parent))
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return root


class RecordingPlatform(Platform):
    """A Platform that records what would change the machine instead of doing it."""

    def __init__(self, root: str = "/", **kwargs: Any) -> None:
        super().__init__(root=root, **kwargs)
        self.calls: list[tuple] = []
        self.helper_status: dict[str, int] = {}

    def settimeofday(self, seconds: int, microseconds: int) -> None:
        self.calls.append(("settimeofday", seconds, microseconds))

    def run_helper(self, argv, *, input=None, setsid=True) -> int:
        self.calls.append(("run_helper", list(argv), input))
        return self.helper_status.get(os.path.basename(argv[0]), 0)

    def write_file(self, path: str, data: bytes) -> None:
        self.calls.append(("write_file", path, data))
        super().write_file(path, data)

    def chown(self, path: str, uid: int, gid: int) -> None:
        self.calls.append(("chown", path, uid, gid))


def make_ctx(platform: Platform, statedir: str | os.PathLike = "/nonexistent") -> Context:
    return Context(platform, statedir=str(statedir))


def agent_call(ctx: Context, name: str, **wire_args: Any) -> dict:
    """Call a handler as the dispatcher does; the result as a response payload."""
    args = {key.replace("-", "_"): value for key, value in wire_args.items()}
    try:
        value = COMMANDS[name].handler(ctx, **args)
    except AgentError as err:
        return {"error": {"class": err.error_class, "desc": err.desc}}
    return {"return": {} if value is None else value}


class AgentClient:
    """A qemu-ga style agent on a unix socket, one request and one line at a time."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self.sock = self._connect()
        self.pending = b""

    def _connect(self) -> socket.socket:
        deadline = time.monotonic() + self.timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.path)
                sock.settimeout(self.timeout)
                return sock
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def request(self, name: str, **wire_args: Any) -> dict:
        message: dict[str, Any] = {"execute": name}
        if wire_args:
            message["arguments"] = wire_args
        self.send(message)
        return self.reply()

    def send(self, message: dict) -> None:
        self.sock.sendall(json.dumps(message).encode())

    def reply(self) -> dict:
        """The next response line."""
        return json.loads(self.reply_line().lstrip(b"\xff"))

    def reply_line(self) -> bytes:
        """The next response line as bytes, its newline included."""
        while b"\n" not in self.pending:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("agent closed the connection")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return line + b"\n"

    def request_maybe_silent(self, message: dict, marker: int) -> dict | None:
        """The reply to ``message``, or None when it answers nothing on success
        (guest-shutdown...): a guest-sync sent behind it then comes back first."""
        self.send(message)
        self.send({"execute": "guest-sync", "arguments": {"id": marker}})
        first = self.reply()
        if first == {"return": marker}:
            return None
        assert self.reply() == {"return": marker}
        return first

    def close(self) -> None:
        self.sock.close()


def start_agent(argv: list[str], workdir: Path, env: dict | None = None,
                blocked: tuple[str, ...] | list[str] = DANGEROUS):
    """Start an agent listening on ``workdir/agent.sock``, the ``blocked``
    commands disabled: (process, client)."""
    sock = workdir / "agent.sock"
    state = workdir / "state"
    state.mkdir(exist_ok=True)
    proc = subprocess.Popen([*argv, "-m", "unix-listen", "-p", str(sock), "-t", str(state),
                             "-b", ",".join(blocked)],
                            cwd=workdir, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        client = AgentClient(str(sock))
    except OSError:
        proc.kill()
        _out, err = proc.communicate()
        pytest.fail(f"agent {argv[0]} did not start: {err.decode(errors='replace')}")
    return proc, client


def stop_agent(proc: subprocess.Popen, client: AgentClient) -> None:
    client.close()
    proc.terminate()
    try:
        proc.wait(timeout=5)  # qemu-ga 7.2 now and then deadlocks in its SIGTERM handler
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def shape(value: Any) -> Any:
    """The JSON shape of a value: member names and types, not the numbers."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in sorted(value.items())}
    if isinstance(value, list):
        return [shape(item) for item in value]
    return type(value).__name__


class FakeSysfs:
    """Builds the spec of a fake /sys (and udev database) for make_tree.

    Devices get what the kernel gives them and qemu-ga looks at: a
    ``uevent`` file, ``size``, a ``subsystem`` link to the block class,
    ``slaves/``, the /sys/block and /sys/dev/block links, and the ``driver``
    link of their PCI function.
    """

    def __init__(self) -> None:
        self.spec: dict[str, Any] = {"/sys/class/block": None, "/sys/bus/pci/drivers": None,
                                     "/sys/block": None, "/sys/dev/block": None}

    def driver(self, function_dir: str, driver: str) -> None:
        self.spec[f"/sys/bus/pci/drivers/{driver}"] = None
        self.spec[f"{function_dir}/driver"] = Link(f"/sys/bus/pci/drivers/{driver}")

    def disk(self, devdir: str, major: int, minor: int, *, size: str = "2097152\n",
             udev: dict[str, str] | None = None, slaves: dict[str, str] | None = None,
             slaves_dir: bool = True) -> str:
        name = devdir.rsplit("/", 1)[1]
        self._device(devdir, name, major, minor, "disk", udev)
        self.spec[f"{devdir}/size"] = size
        self.spec[f"{devdir}/queue"] = None  # a subdirectory that is no partition
        if slaves_dir:
            self.spec[f"{devdir}/slaves"] = None
        for slave_name, slave_dir in (slaves or {}).items():
            self.spec[f"{devdir}/slaves/{slave_name}"] = Link(slave_dir)
        self.spec[f"/sys/block/{name}"] = Link(devdir)
        return devdir

    def partition(self, diskdir: str, name: str, major: int, minor: int,
                  udev: dict[str, str] | None = None) -> str:
        devdir = f"{diskdir}/{name}"
        self._device(devdir, name, major, minor, "partition", udev)
        self.spec[f"{devdir}/size"] = "2048\n"
        return devdir

    def _device(self, devdir, name, major, minor, devtype, udev) -> None:
        self.spec[f"{devdir}/uevent"] = (f"MAJOR={major}\nMINOR={minor}\nDEVNAME={name}\n"
                                         f"DEVTYPE={devtype}\n")
        self.spec[f"{devdir}/subsystem"] = Link("/sys/class/block")
        self.spec[f"/sys/dev/block/{major}:{minor}"] = Link(devdir)
        if udev:
            self.spec[f"/run/udev/data/b{major}:{minor}"] = "".join(
                f"E:{key}={value}\n" for key, value in udev.items())


PCI = "/sys/devices/pci0000:00"
VIRTUAL = "/sys/devices/virtual/block"


def guest_sysfs() -> dict[str, Any]:
    """A guest with one disk of every kind qemu-ga 7.2 can address, and some it cannot.

    vda   virtio-blk at 0000:00:02.0, partitions vda1 and vda2, serial SER-VDA
    vdb   virtio-blk behind a PCI bridge, at 0000:01:03.0
    sda   virtio-scsi at 0000:00:03.0, LUN 2
    sdb   SATA (ahci) at 0000:00:1f.2, second port of two
    sdc   IDE (ata_piix) at 0000:00:01.1, secondary channel, unit 1
    sdd   LSI SCSI (sym53c8xx) at 0000:00:05.0, target 4
    sde   USB storage (xhci_hcd: unknown to qemu-ga 7.2)
    nvme0n1  NVMe at 0000:00:04.0 with partition nvme0n1p1
    vdc   virtio on s390 channel I/O (CCW 0.0.0002 / devno 0004)
    dm-0  device-mapper volume "vg-root" on vda2; dm-1 on dm-0 (stacked)
    loop0 (empty), loop1 (virtual, no slaves), sr0 (no medium: size 0)
    plus CPUs (cpu0 without an online file, cpu2 offline) and memory blocks.
    """
    fs = FakeSysfs()
    fs.driver(f"{PCI}/0000:00:02.0", "virtio-pci")
    vda = fs.disk(f"{PCI}/0000:00:02.0/virtio1/block/vda", 254, 0,
                  udev={"ID_SERIAL": "SER-VDA", "DEVLINKS": "/dev/disk/by-id/virtio-SER-VDA"})
    fs.partition(vda, "vda1", 254, 1)
    vda2 = fs.partition(vda, "vda2", 254, 2, udev={"ID_SERIAL": "SER-VDA"})
    fs.driver(f"{PCI}/0000:00:1e.0", "pcieport")
    fs.driver(f"{PCI}/0000:00:1e.0/0000:01:03.0", "virtio-pci")
    fs.disk(f"{PCI}/0000:00:1e.0/0000:01:03.0/virtio3/block/vdb", 254, 16)
    fs.driver(f"{PCI}/0000:00:03.0", "virtio-pci")
    fs.disk(f"{PCI}/0000:00:03.0/virtio2/host0/target0:0:0/0:0:0:2/block/sda", 8, 0,
            udev={"ID_SERIAL": "0QEMU_QEMU_HARDDISK_drive-scsi0-0-0-2"})
    fs.driver(f"{PCI}/0000:00:1f.2", "ahci")
    fs.spec[f"{PCI}/0000:00:1f.2/ata1"] = None
    fs.spec[f"{PCI}/0000:00:1f.2/ata3/host2/scsi_host"] = None
    fs.disk(f"{PCI}/0000:00:1f.2/ata3/host2/target2:0:0/2:0:0:0/block/sdb", 8, 16)
    fs.driver(f"{PCI}/0000:00:01.1", "ata_piix")
    fs.spec[f"{PCI}/0000:00:01.1/ata1"] = None
    fs.disk(f"{PCI}/0000:00:01.1/ata2/host1/target1:0:1/1:0:1:0/block/sdc", 8, 32)
    fs.driver(f"{PCI}/0000:00:05.0", "sym53c8xx")
    fs.disk(f"{PCI}/0000:00:05.0/host3/target3:0:4/3:0:4:0/block/sdd", 8, 48)
    fs.driver(f"{PCI}/0000:00:06.0", "xhci_hcd")
    fs.disk(f"{PCI}/0000:00:06.0/usb2/2-1/2-1:1.0/host4/target4:0:0/4:0:0:0/block/sde", 8, 64)
    fs.driver(f"{PCI}/0000:00:04.0", "nvme")
    nvme = fs.disk(f"{PCI}/0000:00:04.0/nvme/nvme0/nvme0n1", 259, 0)
    fs.partition(nvme, "nvme0n1p1", 259, 1)
    fs.disk("/sys/devices/css0/0.0.0002/0.0.0004/virtio2/block/vdc", 254, 32)
    dm0 = fs.disk(f"{VIRTUAL}/dm-0", 253, 0, slaves={"vda2": vda2}, udev={"DM_NAME": "vg-root"})
    fs.disk(f"{VIRTUAL}/dm-1", 253, 1, slaves={"dm-0": dm0}, udev={"DM_NAME": ""})
    fs.disk(f"{VIRTUAL}/loop0", 7, 0, size="0\n")
    fs.disk(f"{VIRTUAL}/loop1", 7, 1, size="4096\n", slaves_dir=False)
    fs.disk(f"{PCI}/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/block/sr0", 11, 0, size="0\n")
    fs.spec["/sys/block/README"] = "not a device link"
    cpu = "/sys/devices/system/cpu"
    fs.spec.update({f"{cpu}/cpu0/topology": None, f"{cpu}/cpu1/online": "1\n",
                    f"{cpu}/cpu2/online": "0\n", f"{cpu}/cpufreq": None,
                    f"{cpu}/cpuidle": None, f"{cpu}/online": "0-1\n"})
    mem = "/sys/devices/system/memory"
    fs.spec.update({f"{mem}/block_size_bytes": "8000000\n",
                    f"{mem}/auto_online_blocks": "online\n",
                    f"{mem}/memory0/state": "online\n", f"{mem}/memory0/removable": "0\n",
                    f"{mem}/memory1/state": "online\n", f"{mem}/memory1/removable": "1\n",
                    f"{mem}/memory32/state": "offline\n", f"{mem}/memory32/removable": "1\n",
                    f"{mem}/memory33/state": "online-movable\n"})
    return fs.spec


def probe(tree: Path, qemu_ga: str, workdir: Path, *args: str, net: bool = False,
          env: dict[str, str] | None = None) -> dict:
    """Both agents' answers about ``tree`` (a fake /sys, /run) from ns_probe.py,
    run in a private mount (and with ``net``, network) namespace."""
    import shutil
    import sys
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is needed to give qemu-ga a fake /sys")
    if net and shutil.which("ip") is None:
        pytest.skip("ip (iproute2) is needed to set up test interfaces")
    workdir.mkdir(exist_ok=True)
    # a PID namespace too: when the probe ends, however it ends, the kernel
    # kills every process it started
    namespaces = ["-m", "--propagation", "private", "-p", "-f", "--mount-proc"] + \
        (["-n"] if net else [])
    extra = ["--net", os.readlink("/proc/self/ns/net")] if net else []
    env = dict(env or {})
    if "PATH" in env:  # the agents' PATH; the probe itself needs mount, ip...
        extra += ["--agent-path", env.pop("PATH")]
    done = subprocess.run(
        ["unshare", *namespaces, sys.executable, str(Path(__file__).parent / "ns_probe.py"),
         os.readlink("/proc/self/ns/mnt"), str(tree), qemu_ga, str(workdir), *extra, *args],
        capture_output=True, timeout=60, env={**os.environ, **env})
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return json.loads(done.stdout)
