"""guest-get-users: who is logged in, from the utmp database.

One entry per user name among the USER_PROCESS records of /var/run/utmp,
with the earliest login time as seconds since the epoch (a float with
microseconds). ``domain`` is never set on Linux.
"""

from __future__ import annotations

import struct

from agent.registry import command

UTMP = "/var/run/utmp"
USER_PROCESS = 7
# struct utmp of glibc on 64-bit Linux (384 bytes): type, pid, line, id,
# user, host, exit status, session, tv (two int32), v6 address, padding
_RECORD = struct.Struct("<hxxi32s4s32s256shhiii16s20x")


@command("guest-get-users")
def get_users(ctx) -> list[dict]:
    try:
        data = ctx.platform.read_bytes(UTMP)
    except OSError:
        return []
    users: dict[str, dict] = {}
    for offset in range(0, len(data) - _RECORD.size + 1, _RECORD.size):
        fields = _RECORD.unpack_from(data, offset)
        if fields[0] != USER_PROCESS:
            continue
        name = fields[4].split(b"\0", 1)[0].decode("utf-8", "replace")
        login = fields[9] + fields[10] / 1_000_000
        if name in users:
            users[name]["login-time"] = min(users[name]["login-time"], login)
        else:
            users[name] = {"user": name, "login-time": login}
    return list(users.values())
