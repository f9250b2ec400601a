"""guest-fstrim: discard the unused blocks of every mounted local filesystem.

FITRIM on each filesystem of the mount list (results in reverse mount
order, as qemu-ga 7.2 returns them); a filesystem that cannot be trimmed
gets an ``error`` entry instead of failing the whole command.
"""

from __future__ import annotations

import errno
import os

from agent.commands.glibcompat import strerror
from agent.registry import command

_U64 = 1 << 64


@command("guest-fstrim")
def fstrim(ctx, minimum: int | None = None) -> dict:
    platform = ctx.platform
    ctx.log.info("guest-fstrim called")
    paths: list[dict] = []
    for mount in platform.mount_list():
        paths.insert(0, _trim(platform, mount.dirname, minimum or 0))
    return {"paths": paths}


def _trim(platform, mountpoint: str, minimum: int) -> dict:
    result: dict = {"path": mountpoint}
    try:
        fd = platform.open_file(mountpoint, os.O_RDONLY)
    except OSError as err:
        result["error"] = f"failed to open: {strerror(err)}"
        return result
    try:
        minlen, trimmed = platform.fitrim(fd, minimum)
    except OSError as err:
        if err.errno in (errno.ENOTTY, errno.EOPNOTSUPP):
            result["error"] = "trim not supported"
        else:
            result["error"] = f"failed to trim: {strerror(err)}"
        return result
    finally:
        os.close(fd)
    # the kernel may raise the minimum to the device's discard granularity
    result["minimum"] = minlen - _U64 if minlen >= _U64 // 2 else minlen
    result["trimmed"] = trimmed - _U64 if trimmed >= _U64 // 2 else trimmed
    return result
