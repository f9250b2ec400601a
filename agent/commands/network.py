"""guest-network-get-interfaces: interfaces, MAC addresses, IPs and counters.

One entry per interface name in getifaddrs(3) order. The MAC comes from
SIOCGIFHWADDR (all zeros for loopback); IPv4 and IPv6 addresses carry the
prefix length counted from the netmask; the /proc/net/dev counters are
attached only to interfaces that have at least one address, as in qemu-ga.
"""

from __future__ import annotations

import errno
import socket

from agent.commands.glibcompat import strerror
from agent.errors import AgentError
from agent.registry import command

NET_DEV = "/proc/net/dev"


@command("guest-network-get-interfaces")
def get_interfaces(ctx) -> list[dict]:
    platform = ctx.platform
    interfaces: dict[str, dict] = {}
    try:
        entries = platform.getifaddrs()
    except OSError as err:
        raise AgentError(f"getifaddrs failed: {strerror(err)}") from None
    for ifa in entries:
        info = interfaces.setdefault(ifa.name, {"name": ifa.name})
        if "hardware-address" not in info:
            mac = _hardware_address(ctx, ifa.name)
            if mac is not None:
                info["hardware-address"] = ":".join(f"{b:02x}" for b in mac)
        address = _ip_address(ifa)
        if address is None:
            continue
        info.setdefault("ip-addresses", []).append(address)
        if "statistics" not in info:
            stats = _interface_stats(ctx, ifa.name)
            if stats is not None:
                info["statistics"] = stats
    return list(interfaces.values())


def _hardware_address(ctx, name: str) -> bytes | None:
    try:
        return ctx.platform.hardware_address(name)
    except OSError as err:
        # not fatal: the interface simply has no hardware address to report
        if err.errno != errno.EADDRNOTAVAIL:
            ctx.log.warning("failed to get MAC address of %s: %s", name, strerror(err))
        return None


def _ip_address(ifa) -> dict | None:
    if ifa.family not in (socket.AF_INET, socket.AF_INET6) or ifa.address is None:
        return None
    kind = "ipv4" if ifa.family == socket.AF_INET else "ipv6"
    address = {"ip-address": socket.inet_ntop(ifa.family, ifa.address),
               "ip-address-type": kind}
    if ifa.netmask is not None:
        address["prefix"] = sum(bin(b).count("1") for b in ifa.netmask)
    else:
        address["prefix"] = 0
    return address


def _interface_stats(ctx, name: str) -> dict | None:
    """The counters of ``name`` in /proc/net/dev, or None when it is not listed."""
    try:
        text = ctx.platform.read_text(NET_DEV)
    except OSError as err:
        ctx.log.debug("failed to open network stats %s: %s", NET_DEV, strerror(err))
        return None
    for line in text.splitlines():
        line = line.lstrip()
        label, colon, counters = line.partition(":")
        if not colon or label != name:
            continue
        values = counters.split()
        if len(values) < 16 or not all(_is_int(v) for v in values[:16]):
            continue
        v = [int(x) & 0xFFFFFFFFFFFFFFFF for x in values[:16]]
        return {"rx-bytes": v[0], "rx-packets": v[1], "rx-errs": v[2], "rx-dropped": v[3],
                "tx-bytes": v[8], "tx-packets": v[9], "tx-errs": v[10], "tx-dropped": v[11]}
    ctx.log.debug("/proc/net/dev: Interface '%s' not found", name)
    return None


def _is_int(text: str) -> bool:
    return text.lstrip("+-").isdigit()
