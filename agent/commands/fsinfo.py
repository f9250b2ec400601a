"""guest-get-fsinfo: mounted local filesystems, their usage and the disks under them.

One entry per mount of the mount list (the one fsfreeze uses), in reverse
mount order as qemu-ga 7.2 returns it; ``name`` is the kernel's name of the
device (``vda1``, ``dm-0``), ``disk`` the addresses of the real disks below
it (device-mapper and md are followed down their ``slaves``).
"""

from __future__ import annotations

from agent.commands.blockdev import Filesystem, walk_device
from agent.registry import command


@command("guest-get-fsinfo")
def get_fsinfo(ctx) -> list[dict]:
    platform = ctx.platform
    result = []
    for mount in platform.mount_list():
        fs = Filesystem()
        walk_device(platform, f"/sys/dev/block/{mount.devmajor}:{mount.devminor}", fs)
        info = {"name": fs.name, "mountpoint": mount.dirname, "type": mount.devtype,
                "disk": fs.disks}
        info.update(_usage(platform, mount.dirname))
        result.insert(0, info)
    return result


def _usage(platform, mountpoint: str) -> dict:
    """used-bytes and total-bytes; total counts only what non-root users may use."""
    try:
        st = platform.statvfs(mountpoint)
    except OSError:
        return {}
    used = st.f_blocks - st.f_bfree
    return {"used-bytes": used * st.f_frsize,
            "total-bytes": (used + st.f_bavail) * st.f_frsize}
