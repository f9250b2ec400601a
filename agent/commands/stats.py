"""guest-get-diskstats and guest-get-cpustats: /proc/diskstats and /proc/stat.

Both read the kernel's counters as qemu-ga 7.2 does: every diskstats line
with the fields its kernel has (4-, 11-, 15- and 17-field layouts), every
``cpuN`` line of /proc/stat with clock ticks turned into milliseconds.
"""

from __future__ import annotations

from agent.commands.glibcompat import strerror
from agent.errors import AgentError
from agent.registry import command

DISKSTATS = "/proc/diskstats"
PROC_STAT = "/proc/stat"
_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF


def _leading_numbers(tokens: list[str], limit: int) -> list[int]:
    """Numbers at the start of ``tokens``, stopping at the first non-number (sscanf)."""
    numbers = []
    for token in tokens[:limit]:
        digits = token.lstrip("+")
        if not digits.isdigit():
            break
        numbers.append(int(digits))
    return numbers


def _read(ctx, path: str) -> str:
    try:
        return ctx.platform.read_text(path)
    except OSError as err:
        raise AgentError(f'open("{path}"): {strerror(err)}') from None


# Fields of a diskstats line after major, minor and name, in kernel order,
# with the C width qemu-ga parses each into (it truncates the u32 ones).
_DISK_FIELDS_11 = (("read-ios", 0, _U64), ("read-merges", 1, _U64), ("read-sectors", 2, _U64),
                   ("read-ticks", 3, _U64), ("write-ios", 4, _U64), ("write-merges", 5, _U64),
                   ("write-sectors", 6, _U64), ("write-ticks", 7, _U32), ("ios-pgr", 8, _U32),
                   ("total-ticks", 9, _U32), ("weight-ticks", 10, _U32))
_DISK_FIELDS_15 = (("discard-ios", 11, _U64), ("discard-merges", 12, _U64),
                   ("discard-sectors", 13, _U64), ("discard-ticks", 14, _U32))
_DISK_FIELDS_17 = (("flush-ios", 15, _U64), ("flush-ticks", 16, _U32))
# the old 4-field layout of partitions: ios and sectors only
_DISK_FIELDS_4 = (("read-ios", 0, _U64), ("read-sectors", 1, _U64),
                  ("write-ios", 2, _U64), ("write-sectors", 3, _U64))


@command("guest-get-diskstats")
def get_diskstats(ctx) -> list[dict]:
    result = []
    for line in _read(ctx, DISKSTATS).splitlines():
        tokens = line.split()
        head = _leading_numbers(tokens, 2)
        if len(head) < 2 or len(tokens) < 3:
            continue
        values = _leading_numbers(tokens[3:], 17)
        if len(values) < 4:
            continue
        fields: tuple = ()
        if len(values) == 4:
            fields = _DISK_FIELDS_4
        if len(values) >= 11:
            fields = _DISK_FIELDS_11
        if len(values) >= 15:
            fields += _DISK_FIELDS_15
        if len(values) >= 17:
            fields += _DISK_FIELDS_17
        stats = {name: values[i] & width for name, i, width in fields}
        result.append({"name": tokens[2], "major": head[0] & _U32,
                       "minor": head[1] & _U32, "stats": stats})
    return result


_CPU_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq",
               "steal", "guest", "guestnice")


@command("guest-get-cpustats")
def get_cpustats(ctx) -> list[dict]:
    ticks = ctx.platform.clock_ticks()
    result = []
    for line in _read(ctx, PROC_STAT).splitlines():
        tokens = line.split()
        if not tokens or not tokens[0].startswith("cpu") or tokens[0] == "cpu":
            continue
        values = _leading_numbers(tokens[1:], 10)
        if len(values) < 4:
            ctx.log.warning('Parsing cpu stat from %s failed, see "man proc"', PROC_STAT)
            break
        # the counts qemu-ga includes: the first four always, then iowait,
        # irq with softirq, steal, guest, guestnice as the kernel has them
        present = 4 + (len(values) >= 5) + 2 * (len(values) >= 6)
        present += (len(values) >= 8) + (len(values) >= 9) + (len(values) >= 10)
        stat: dict = {"type": "linux", "cpu": _atoi(tokens[0][3:])}
        for i, name in enumerate(_CPU_FIELDS[:present]):
            value = values[i] if i < len(values) else 0
            stat[name] = (value * 1000 & _U64) // ticks
        result.append(stat)
    return result


def _atoi(text: str) -> int:
    digits = ""
    for i, ch in enumerate(text):
        if ch.isdigit() or (i == 0 and ch in "+-"):
            digits += ch
        else:
            break
    try:
        return int(digits)
    except ValueError:
        return 0
