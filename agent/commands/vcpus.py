"""guest-get-vcpus and guest-set-vcpus: logical CPUs online and offline.

Each ``cpuN`` directory of /sys/devices/system/cpu, in directory order; a
CPU without an ``online`` file (usually cpu0) is online and cannot be
taken offline. Setting writes ``online`` only where the state differs.
"""

from __future__ import annotations

import errno
import re

from agent.commands.glibcompat import strerror
from agent.errors import AgentError
from agent.registry import command

CPU_DIR = "/sys/devices/system/cpu"
_CPU_NAME = re.compile(r"cpu\s*([+-]?\d+)")


def _cpu_path(logical_id: int) -> str:
    return f"{CPU_DIR}/cpu{logical_id}/"


@command("guest-get-vcpus")
def get_vcpus(ctx) -> list[dict]:
    try:
        names = [entry.name for entry in ctx.platform.scandir(CPU_DIR)]
    except OSError as err:
        raise AgentError(f"failed to list entries: {CPU_DIR}: {strerror(err)}") from None
    vcpus = []
    for name in names:
        m = _CPU_NAME.match(name)
        if m:
            logical_id = int(m.group(1))
            online, can_offline = _read_state(ctx.platform, _cpu_path(logical_id))
            vcpus.append({"logical-id": logical_id, "online": online,
                          "can-offline": can_offline})
    return vcpus


def _read_state(platform, dirpath: str) -> tuple[bool, bool]:
    """(online, can-offline) of one CPU directory."""
    if not platform.is_dir(dirpath):
        raise AgentError(f'open("{dirpath}"): {strerror(errno.ENOENT)}')
    try:
        status = platform.read_prefix(dirpath + "/online", 1)
    except FileNotFoundError:
        return True, False
    except OSError as err:
        raise AgentError(f'open("{dirpath}/online"): {strerror(err)}') from None
    if not status:
        raise AgentError(f'pread("{dirpath}/online"): unexpected EOF')
    return status != b"0", True


@command("guest-set-vcpus")
def set_vcpus(ctx, vcpus: list[dict]) -> int:
    processed = 0
    for vcpu in vcpus:
        try:
            _write_state(ctx.platform, vcpu["logical-id"], vcpu["online"])
        except AgentError:
            if processed == 0:
                raise
            break
        processed += 1
    return processed


def _write_state(platform, logical_id: int, online: bool) -> None:
    dirpath = _cpu_path(logical_id)
    if not platform.is_dir(dirpath):
        raise AgentError(f'open("{dirpath}"): {strerror(errno.ENOENT)}')
    online_file = dirpath + "/online"
    try:
        status = platform.read_prefix(online_file, 1)
    except FileNotFoundError:
        if not online:
            raise AgentError(f"logical processor #{logical_id} can't be offlined") from None
        return  # already online for good: nothing to do
    except OSError as err:
        raise AgentError(f'open("{online_file}"): {strerror(err)}') from None
    if not status:
        raise AgentError(f'pread("{online_file}"): unexpected EOF')
    if online != (status != b"0"):
        try:
            platform.write_file(online_file, b"1" if online else b"0")
        except OSError as err:
            raise AgentError(f'pwrite("{online_file}"): {strerror(err)}') from None
