"""guest-get-disks: every block device with a size, its partitions and dependencies.

From /sys/block, in the order qemu-ga 7.2 reports (it prepends, so the
list comes out reversed): the disk by device node, its address for real
disks, ``dependencies`` (the devices under a device-mapper or md volume,
always present as a list), ``alias`` (the device-mapper name), NVMe SMART
health data, and each partition as its own entry depending on its disk.
"""

from __future__ import annotations

import struct

from agent.commands.blockdev import Filesystem, devnode, is_virtual, udev_properties, walk_device
from agent.errors import AgentError
from agent.registry import command

SYS_BLOCK = "/sys/block"


@command("guest-get-disks")
def get_disks(ctx) -> list[dict]:
    platform = ctx.platform
    try:
        entries = platform.scandir(SYS_BLOCK)
    except OSError as err:
        raise AgentError(f'Can\'t open directory "{SYS_BLOCK}": {err.strerror}') from None
    result: list[dict] = []
    for entry in entries:
        if not entry.is_symlink() or not _has_size(platform, entry.name):
            continue
        disk_dir = f"{SYS_BLOCK}/{entry.name}"
        name = devnode(platform, disk_dir)
        if name is None:
            ctx.log.debug("Failed to get device name for syspath: %s", disk_dir)
            continue
        disk: dict = {"name": name, "partition": False}
        alias = (udev_properties(platform, disk_dir) or {}).get("DM_NAME")
        if alias:
            disk["alias"] = alias
        result.insert(0, disk)
        if not is_virtual(platform, disk_dir):
            address = _address(ctx, disk_dir)
            if address is not None:
                disk["address"] = address
        dependencies = _dependencies(platform, disk_dir)
        if dependencies is not None:
            disk["dependencies"] = dependencies
        if disk.get("address", {}).get("bus-type") == "nvme":
            smart = _nvme_smart(platform, name)
            if smart is not None:
                disk["smart"] = smart
        for partition in _partitions(platform, entry.name, disk_dir, name):
            result.insert(0, partition)
    return result


def _has_size(platform, name: str) -> bool:
    try:
        size = platform.read_text(f"{SYS_BLOCK}/{name}/size")
    except OSError:
        return False
    return size != "0\n"


def _address(ctx, disk_dir: str) -> dict | None:
    fs = Filesystem()
    try:
        walk_device(ctx.platform, disk_dir, fs)
    except AgentError as err:
        ctx.log.debug("  failed to get device info, ignoring error: %s", err.desc)
        return None
    return fs.disks[0] if fs.disks else None


def _dependencies(platform, disk_dir: str) -> list[str] | None:
    """Device nodes of ``slaves/``, newest first; None when there is no such directory."""
    try:
        entries = platform.scandir(disk_dir + "/slaves")
    except OSError:
        return None
    nodes: list[str] = []
    for entry in entries:
        node = devnode(platform, f"{disk_dir}/slaves/{entry.name}")
        if node is not None:
            nodes.insert(0, node)
    return nodes


def _partitions(platform, disk_name: str, disk_dir: str, disk_node: str) -> list[dict]:
    """``<disk>N`` and ``<disk>pN`` subdirectories, in directory order."""
    found = []
    try:
        entries = platform.scandir(disk_dir)
    except OSError:
        return found  # gone since it was listed
    for entry in entries:
        rest = entry.name[len(disk_name):]
        if not entry.is_dir(follow_symlinks=False) or not entry.name.startswith(disk_name):
            continue
        if not (rest[:1].isdigit() or (rest[:1] == "p" and rest[1:2].isdigit())):
            continue
        node = devnode(platform, f"{disk_dir}/{entry.name}")
        if node is not None:
            found.append({"name": node, "partition": True, "dependencies": [disk_node]})
    return found


# NVMe SMART / health log (NVMe base spec, log page 02h): byte offsets of the
# fields guest-get-disks reports; the 128-bit counters as two u64 halves.
_SMART_BYTES = (("critical-warning", 0), ("available-spare", 3),
                ("available-spare-threshold", 4), ("percentage-used", 5))
_SMART_U128 = (("data-units-read", 32), ("data-units-written", 48),
               ("host-read-commands", 64), ("host-write-commands", 80),
               ("controller-busy-time", 96), ("power-cycles", 112), ("power-on-hours", 128),
               ("unsafe-shutdowns", 144), ("media-errors", 160),
               ("number-of-error-log-entries", 176))


def _nvme_smart(platform, node: str) -> dict | None:
    log = platform.nvme_smart_log(node)
    if log is None or len(log) < 192:
        return None
    # built in schema member order: the -lo/-hi pairs share QDict buckets, so
    # the order members are added decides the order they are printed in
    smart: dict = {"type": "nvme"}
    for name, offset in _SMART_BYTES:
        smart[name] = log[offset]
        if name == "critical-warning":
            smart["temperature"] = struct.unpack_from("<H", log, 1)[0]
    for name, offset in _SMART_U128:
        lo, hi = struct.unpack_from("<QQ", log, offset)
        smart[f"{name}-lo"], smart[f"{name}-hi"] = lo, hi
    return smart
