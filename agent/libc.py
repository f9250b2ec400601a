"""The few libc calls Python's os module lacks, through ctypes:
settimeofday(2), getifaddrs(3), and a C buffer for an ioctl that takes a
pointer (the NVMe admin command).

Only agent.platform uses this module, and only when a command needs it:
ctypes is not imported by an agent that never runs those commands.
"""

from __future__ import annotations

import ctypes
import os
import socket


def settimeofday(seconds: int, microseconds: int) -> None:
    """Set the system clock. Raises OSError."""
    tv = (ctypes.c_long * 2)(seconds, microseconds)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.settimeofday(ctypes.byref(tv), None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def getifaddrs() -> list[tuple[str, int | None, bytes | None, bytes | None]]:
    """(name, family, raw address, raw netmask) of every getifaddrs(3) entry,
    in its order; addresses only for IPv4 and IPv6. Raises OSError."""
    libc = ctypes.CDLL(None, use_errno=True)
    head = ctypes.POINTER(_IfAddrs)()
    if libc.getifaddrs(ctypes.byref(head)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    entries = []
    try:
        node = head
        while node:
            ifa = node.contents
            entries.append((os.fsdecode(ifa.ifa_name), *_sockaddr_parts(ifa.ifa_addr),
                            _sockaddr_parts(ifa.ifa_netmask)[1]))
            node = ifa.ifa_next
    finally:
        libc.freeifaddrs(head)
    return entries


def buffer(size: int) -> tuple[ctypes.Array, int]:
    """A zeroed C buffer of ``size`` bytes and its address (read it back with ``.raw``)."""
    buf = ctypes.create_string_buffer(size)
    return buf, ctypes.addressof(buf)


class _SockAddr(ctypes.Structure):
    _fields_ = [("sa_family", ctypes.c_ushort), ("sa_data", ctypes.c_char * 14)]


class _IfAddrs(ctypes.Structure):
    pass


_IfAddrs._fields_ = [("ifa_next", ctypes.POINTER(_IfAddrs)), ("ifa_name", ctypes.c_char_p),
                     ("ifa_flags", ctypes.c_uint), ("ifa_addr", ctypes.POINTER(_SockAddr)),
                     ("ifa_netmask", ctypes.POINTER(_SockAddr)),
                     ("ifa_ifu", ctypes.POINTER(_SockAddr)), ("ifa_data", ctypes.c_void_p)]


def _sockaddr_parts(ptr) -> tuple[int | None, bytes | None]:
    """(family, raw address bytes) of a sockaddr pointer; IPv4 and IPv6 only."""
    if not ptr:
        return None, None
    family = ptr.contents.sa_family
    if family == socket.AF_INET:
        return family, ctypes.string_at(ptr, 8)[4:8]
    if family == socket.AF_INET6:
        return family, ctypes.string_at(ptr, 24)[8:24]
    return family, None
