"""From a block device in sysfs to the disk address the host understands.

guest-get-fsinfo and guest-get-disks both need it: follow the device's
sysfs path to its controller and read, as qemu-ga 7.2 does, the PCI address
and bus type (virtio-blk, virtio-scsi, IDE via ata_piix, SATA via ahci,
LSI SCSI via sym53c8xx, NVMe), or the s390 CCW address; for virtual devices
(device-mapper, md, loop) walk ``slaves/`` down to the real disks. The
device node and serial number come from what udev knows: the ``uevent``
file of the device and udev's database in /run/udev/data, read directly so
a fake tree can stand in for both.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from agent.commands.glibcompat import strerror
from agent.errors import AgentError

#: drivers whose controller addresses qemu-ga 7.2 understands
KNOWN_DRIVERS = ("ata_piix", "sym53c8xx", "virtio-pci", "ahci", "nvme")
UDEV_DB = "/run/udev/data"

_HEX = "[0-9a-fA-F]+"
_PCI_ROOT = re.compile(rf"{_HEX}:{_HEX}/({_HEX}):({_HEX}):({_HEX})\.({_HEX})")
_PCI_CHILD = re.compile(rf"/({_HEX}):({_HEX}):({_HEX})\.({_HEX})")
_TARGET = re.compile(r"\d+:\d+:\d+/\d+:(\d+):(\d+):(\d+)")
_CCW = re.compile(rf"{_HEX}/({_HEX})\.({_HEX})\.({_HEX})/{_HEX}\.{_HEX}\.({_HEX})")
_NUMBER = re.compile(r"\s*\+?(\d+)")


@dataclass
class Filesystem:
    """What the walk collects for one device: its name and disk addresses,
    newest first (qemu-ga prepends)."""

    name: str | None = None
    disks: list[dict] = field(default_factory=list)


def udev_properties(platform, syspath: str) -> dict[str, str] | None:
    """The udev properties of a sysfs device: its uevent file plus udev's database.

    None when ``syspath`` is no device (libudev refuses it then).
    """
    real = platform.realpath(syspath)
    try:
        uevent = platform.read_text(real + "/uevent")
    except OSError:
        return None
    props = dict(_key_values(uevent.splitlines()))
    try:
        subsystem = os.path.basename(platform.readlink(real + "/subsystem"))
    except OSError:
        subsystem = None
    # udev files a block device's database entry under b<major>:<minor>
    if subsystem == "block" and "MAJOR" in props and "MINOR" in props:
        try:
            db = platform.read_text(f"{UDEV_DB}/b{props['MAJOR']}:{props['MINOR']}")
        except OSError:
            db = ""
        props.update(_key_values(line[2:] for line in db.splitlines() if line.startswith("E:")))
    return props


def _key_values(lines):
    for line in lines:
        key, sep, value = line.partition("=")
        if sep:
            yield key, value


def devnode(platform, syspath: str) -> str | None:
    """The device node (``/dev/vda``) of a sysfs device, as udev names it."""
    props = udev_properties(platform, syspath)
    if not props or not props.get("DEVNAME"):
        return None
    name = props["DEVNAME"]
    return name if name.startswith("/") else "/dev/" + name


def is_virtual(platform, path: str) -> bool:
    return "/devices/virtual/block/" in platform.realpath(path)


def walk_device(platform, devpath: str, fs: Filesystem) -> None:
    """Add the disk addresses under ``devpath`` to ``fs`` (qemu-ga's
    build_guest_fsinfo_for_device). Raises AgentError as qemu-ga fails."""
    if not platform.exists(devpath):
        # e.g. a container without this device in its /sys
        if fs.name is None:
            fs.name = os.path.basename(devpath)
        return
    syspath = platform.realpath(devpath)
    if fs.name is None:
        fs.name = os.path.basename(syspath)
    if is_virtual(platform, syspath):
        _walk_slaves(platform, syspath, fs)
    else:
        _add_real_device(platform, syspath, fs)


def _walk_slaves(platform, syspath: str, fs: Filesystem) -> None:
    slaves = syspath + "/slaves"
    try:
        entries = platform.scandir(slaves)
    except FileNotFoundError:
        return
    except OSError as err:
        raise AgentError(f'opendir("{slaves}"): {strerror(err)}') from None
    for entry in entries:
        if entry.is_symlink():
            walk_device(platform, f"{slaves}/{entry.name}", fs)


def _add_real_device(platform, syspath: str, fs: Filesystem) -> None:
    disk = {"pci-controller": {"domain": -1, "bus": -1, "slot": -1, "function": -1},
            "bus-type": "unknown", "bus": 0, "target": 0, "unit": 0}
    props = udev_properties(platform, syspath)
    if props is not None:
        node = props.get("DEVNAME")
        if node:
            disk["dev"] = node if node.startswith("/") else "/dev/" + node
        if props.get("ID_SERIAL"):
            disk["serial"] = props["ID_SERIAL"]
    if "/devices/pci" in syspath:
        known = _pci_address(platform, syspath, disk)
    elif "/devices/css" in syspath:
        known = _ccw_address(syspath, disk)
    elif "/virtio" in syspath:
        known = _nonpci_virtio(syspath, disk)
    else:
        known = False
    if known or "dev" in disk or "serial" in disk:
        fs.disks.insert(0, disk)


def _driver(platform, devdir: str) -> str | None:
    try:
        return os.path.basename(platform.readlink(devdir + "/driver"))
    except OSError:
        return None


def _pci_address(platform, syspath: str, disk: dict) -> bool:
    """Fill the PCI address and bus type; False when the controller is not understood."""
    start = syspath.index("/devices/pci") + len("/devices/pci")
    m = _PCI_ROOT.match(syspath, start)
    if not m:
        return False
    pci = [int(g, 16) for g in m.groups()]
    pos = m.end()
    while True:
        driver = _driver(platform, syspath[:pos])
        if driver in KNOWN_DRIVERS:
            break
        child = _PCI_CHILD.match(syspath, pos)
        if not child:
            return False  # an unsupported driver
        pci = [int(g, 16) for g in child.groups()]
        pos = child.end()
    target = _after(_TARGET, syspath, "/target")
    host, hosts = _scsi_host(platform, syspath)
    controller = disk["pci-controller"]
    controller["domain"], controller["bus"], controller["slot"], controller["function"] = pci
    if driver == "ata_piix":  # one host per IDE bus: target*:0:<unit>:0
        if host is None or target is None or host not in hosts:
            return False
        disk["bus-type"], disk["bus"], disk["unit"] = "ide", hosts.index(host), target[1]
    elif driver == "sym53c8xx":  # LSI SCSI: target*:0:<unit>:0
        if target is None:
            return False
        disk["bus-type"], disk["unit"] = "scsi", target[1]
    elif driver == "virtio-pci":  # virtio-scsi target*:0:0:<unit>, or virtio-blk
        if target is not None:
            disk["bus-type"], disk["unit"] = "scsi", target[2]
        else:
            disk["bus-type"] = "virtio"
    elif driver == "ahci":  # one host per SATA port
        if host is None or target is None or host not in hosts:
            return False
        disk["bus-type"], disk["unit"] = "sata", hosts.index(host)
    else:
        disk["bus-type"] = "nvme"
    return True


def _after(pattern: re.Pattern, path: str, marker: str) -> list[int] | None:
    """The numbers ``pattern`` reads right after the first ``marker`` in ``path``."""
    at = path.find(marker)
    if at < 0:
        return None
    m = pattern.match(path, at + len(marker))
    return [int(g) for g in m.groups()] if m else None


def _scsi_host(platform, syspath: str) -> tuple[int | None, list[int]]:
    """The ata/SCSI host number in the path and the sorted host numbers beside it."""
    marker = "/ata" if "/ata" in syspath else "/host"
    at = syspath.find(marker)
    if at < 0:
        return None, []
    m = _NUMBER.match(syspath, at + len(marker))
    if not m:
        return None, []
    prefix = marker[1:]
    try:
        entries = platform.scandir(syspath[:at])
    except OSError as err:
        raise AgentError(f'opendir("{syspath[:at]}"): {strerror(err)}') from None
    hosts = []
    for entry in entries:
        n = _NUMBER.match(entry.name, len(prefix)) if entry.name.startswith(prefix) else None
        if n:
            hosts.append(int(n.group(1)))
            if len(hosts) == 8:
                break
    return int(m.group(1)), sorted(hosts)


def _ccw_address(syspath: str, disk: dict) -> bool:
    start = syspath.index("/devices/css")
    m = _CCW.match(syspath, start + len("/devices/css"))
    if not m:
        return False
    cssid, ssid, subchno, devno = (int(g, 16) for g in m.groups())
    disk["ccw-address"] = {"cssid": cssid, "ssid": ssid, "subchno": subchno, "devno": devno}
    if "/virtio" in syspath[start:]:
        _nonpci_virtio(syspath, disk)
    return True


def _nonpci_virtio(syspath: str, disk: dict) -> bool:
    if "/virtio" not in syspath or "/block" not in syspath:
        return False
    target = _after(_TARGET, syspath, "/target")
    if target is not None:
        disk["bus-type"] = "scsi"
        disk["bus"], disk["target"], disk["unit"] = target
    else:
        disk["bus-type"] = "virtio"
    return True
