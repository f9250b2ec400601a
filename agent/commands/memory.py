"""guest-get-memory-blocks, guest-set-memory-blocks, guest-get-memory-block-info.

Memory hotplug blocks of /sys/devices/system/memory (``memoryN``, in
directory order). Setting answers per block, as qemu-ga does, with its
response codes and the errno of what failed.
"""

from __future__ import annotations

import errno

from agent.commands.glibcompat import strerror
from agent.errors import AgentError
from agent.registry import command

MEMORY_DIR = "/sys/devices/system/memory/"


def _block_dir(phys_index: int) -> str:
    return f"{MEMORY_DIR}memory{phys_index}/"


def _strtoul(text: str) -> int:
    digits = ""
    for ch in text:
        if not ch.isdigit():
            break
        digits += ch
    return int(digits or 0) & 0xFFFFFFFFFFFFFFFF


@command("guest-get-memory-blocks")
def get_memory_blocks(ctx) -> list[dict]:
    platform = ctx.platform
    try:
        entries = platform.scandir(MEMORY_DIR)
    except FileNotFoundError:
        return []  # no memory hotplug in this kernel: nothing to report
    except OSError as err:
        raise AgentError(f'Can\'t open directory"{MEMORY_DIR}": {strerror(err)}') from None
    blocks = []
    for entry in entries:
        if not entry.name.startswith("memory") or not entry.is_dir(follow_symlinks=False):
            continue
        phys_index = _strtoul(entry.name[6:])
        online, can_offline = _read_block(platform, phys_index)
        blocks.append({"phys-index": phys_index, "online": online, "can-offline": can_offline})
    if not blocks:
        raise AgentError("guest reported zero memory blocks!")
    return blocks


def _read_block(platform, phys_index: int) -> tuple[bool, bool]:
    dirpath = _block_dir(phys_index)
    if not platform.is_dir(dirpath):
        raise AgentError(f'open("{dirpath}"): {strerror(errno.ENOENT)}')
    try:
        state = _read_attr(platform, dirpath, "state", 10)
    except FileNotFoundError:
        return True, False  # kernels without the attribute: always online
    except OSError as err:
        raise _attr_error("state", err) from None
    try:
        removable = _read_attr(platform, dirpath, "removable", 1)
    except FileNotFoundError:
        return state.startswith(b"online"), False
    except OSError as err:
        raise _attr_error("removable", err) from None
    return state.startswith(b"online"), removable != b"0"


class _EmptyAttribute(OSError):
    """A sysfs attribute that read as nothing."""


def _read_attr(platform, dirpath: str, name: str, size: int) -> bytes:
    """One pread of a sysfs attribute. Raises OSError."""
    data = platform.read_prefix(dirpath + name, size)
    if not data:
        raise _EmptyAttribute(0, "unexpected EOF")
    return data


def _attr_error(name: str, err: OSError) -> AgentError:
    if isinstance(err, _EmptyAttribute):
        return AgentError(f'pread sysfs file "{name}": unexpected EOF')
    return AgentError(f'open sysfs file "{name}": {strerror(err)}')


@command("guest-set-memory-blocks")
def set_memory_blocks(ctx, mem_blks: list[dict]) -> list[dict]:
    return [_set_block(ctx.platform, blk["phys-index"], blk["online"]) for blk in mem_blks]


def _set_block(platform, phys_index: int, online: bool) -> dict:
    # a uint64 that QEMU's input visitor also takes as a negative int64: the
    # answer echoes it unsigned, the sysfs path prints it signed (PRId64)
    result = {"phys-index": phys_index & 0xFFFFFFFFFFFFFFFF, "response": "success"}
    phys_index = phys_index - (1 << 64) if phys_index >= 1 << 63 else phys_index

    def failed(response: str, code: int) -> dict:
        result["response"] = response
        result["error-code"] = code
        return result

    if not platform.is_dir(MEMORY_DIR):
        return failed("operation-not-supported", errno.ENOENT)
    dirpath = _block_dir(phys_index)
    if not platform.is_dir(dirpath):
        return failed("not-found", errno.ENOENT)
    try:
        state = _read_attr(platform, dirpath, "state", 10)
    except FileNotFoundError:
        # qemu-ga: bringing online is a no-op that still carries the errno
        return failed("success" if online else "operation-not-supported", errno.ENOENT)
    except OSError as err:
        return failed("operation-failed", err.errno or 0)
    if online != state.startswith(b"online"):
        try:
            platform.write_file(dirpath + "state", b"online" if online else b"offline")
        except OSError as err:
            return failed("operation-failed", err.errno or errno.EIO)
    return result


@command("guest-get-memory-block-info")
def get_memory_block_info(ctx) -> dict:
    platform = ctx.platform
    if not platform.is_dir(MEMORY_DIR):
        raise AgentError(f'open("{MEMORY_DIR}"): {strerror(errno.ENOENT)}')
    try:
        data = _read_attr(platform, MEMORY_DIR, "block_size_bytes", 20)
    except OSError as err:
        raise _attr_error("block_size_bytes", err) from None
    return {"size": _strtol_hex(data.decode("ascii", "replace"))}


def _strtol_hex(text: str) -> int:
    text = text.strip()
    if text[:2].lower() == "0x":
        text = text[2:]
    digits = ""
    for ch in text:
        if ch not in "0123456789abcdefABCDEF":
            break
        digits += ch
    return int(digits or "0", 16)
