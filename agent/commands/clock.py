"""guest-get-time and guest-set-time: the guest's wall clock and its RTC.

guest-set-time with a time sets the system clock and then writes it to the
RTC with ``/sbin/hwclock -w``; without one it sets the system clock from the
RTC (``hwclock -s``), which is what a host does after resuming a guest.
"""

from __future__ import annotations

from agent.commands.glibcompat import strerror
from agent.errors import AgentError
from agent.registry import command

HWCLOCK = "/sbin/hwclock"
UNSUPPORTED = "this feature or command is not currently supported"


@command("guest-get-time")
def get_time(ctx) -> int:
    return ctx.platform.time_ns()


@command("guest-set-time")
def set_time(ctx, time: int | None = None) -> dict:
    platform = ctx.platform
    if not platform.is_executable(HWCLOCK):
        raise AgentError(UNSUPPORTED)
    if time is not None:
        seconds, microseconds = _to_timeval(time)
        # qemu-ga rejects years outside 1970..2069 of the local calendar
        if not 1970 <= _local_year(platform, seconds) < 2070:
            raise AgentError("Invalid time")
        try:
            platform.settimeofday(seconds, microseconds)
        except OSError as err:
            raise AgentError(f"Failed to set time to guest: {strerror(err)}") from None
    status = platform.run_helper([HWCLOCK, "-w" if time is not None else "-s"])
    if status < 0:
        raise AgentError("child process has terminated abnormally")
    if status:
        raise AgentError("hwclock failed to set hardware clock to system time")
    return {}


def _to_timeval(time_ns: int) -> tuple[int, int]:
    """ns to (seconds, microseconds) with C's truncation toward zero."""
    seconds = abs(time_ns) // 1_000_000_000 * (1 if time_ns >= 0 else -1)
    remainder = time_ns - seconds * 1_000_000_000
    return seconds, int(remainder / 1000)


def _local_year(platform, seconds: int) -> int:
    try:
        return platform.local_year(seconds)
    except (OverflowError, OSError, ValueError):
        return 0
