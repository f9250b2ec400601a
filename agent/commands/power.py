"""guest-shutdown and guest-suspend-disk/ram/hybrid: power state changes.

None of them answers on success (qemu-ga's ``success-response: false``):
the host learns the outcome from the VM itself. They do answer errors.

Suspend tries systemd, then pm-utils, then the kernel's /sys/power/state,
as qemu-ga 7.2 does. Where qemu-ga would stay silent after a mechanism
claimed support and then failed (and the next one does not apply), this
reports that failure instead, so the host is not left guessing.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.errors import AgentError
from agent.registry import command

SHUTDOWN = "/sbin/shutdown"
SHUTDOWN_FLAGS = {"powerdown": "-P", "halt": "-H", "reboot": "-r"}
POWER_STATE = "/sys/power/state"


@command("guest-shutdown", success_response=False)
def shutdown(ctx, mode: str | None = None) -> dict:
    ctx.log.info("guest-shutdown called, mode: %s", mode)
    flag = SHUTDOWN_FLAGS.get("powerdown" if mode is None else mode)
    if flag is None:
        raise AgentError("mode is invalid (valid values are: halt|powerdown|reboot")
    status = ctx.platform.run_helper(
        [SHUTDOWN, "-h", flag, "+0", "hypervisor initiated shutdown"])
    if status < 0:
        raise AgentError("child process has terminated abnormally")
    if status:
        raise AgentError("child process has failed to shutdown")
    return {}


@dataclass(frozen=True)
class SuspendMode:
    systemd_unit: str        # what `systemctl status` is asked about
    systemd_verb: str        # what `systemctl` is told to do
    pm_flag: str             # pm-is-supported's option
    pm_program: str
    kernel_word: str | None  # the word written to /sys/power/state


DISK = SuspendMode("systemd-hibernate", "hibernate", "--hibernate", "pm-hibernate", "disk")
RAM = SuspendMode("systemd-suspend", "suspend", "--suspend", "pm-suspend", "mem")
HYBRID = SuspendMode("systemd-hybrid-sleep", "hybrid-sleep", "--suspend-hybrid",
                     "pm-suspend-hybrid", None)


@command("guest-suspend-disk", success_response=False)
def suspend_disk(ctx) -> dict:
    return _suspend(ctx, DISK)


@command("guest-suspend-ram", success_response=False)
def suspend_ram(ctx) -> dict:
    return _suspend(ctx, RAM)


@command("guest-suspend-hybrid", success_response=False)
def suspend_hybrid(ctx) -> dict:
    return _suspend(ctx, HYBRID)


def _suspend(ctx, mode: SuspendMode) -> dict:
    supported = False
    errors: list[AgentError | None] = []  # what each mechanism ended with
    for mechanism in (_systemd, _pm_utils, _kernel):
        error = None
        try:
            if mechanism(ctx, mode, probe=True):
                supported = True
                mechanism(ctx, mode, probe=False)
                return {}
        except AgentError as err:
            error = err
        errors.append(error)
    if not supported:
        raise AgentError("the requested suspend mode is not supported by the guest")
    # qemu-ga reports the last mechanism's error, and nothing at all when the
    # last one simply did not apply; then the latest real error is reported.
    raise next(err for err in reversed(errors) if err is not None)


def _spawn_sync(ctx, argv: list[str]) -> int | None:
    """Run a helper found in PATH, output discarded: its exit status, or None
    when it is not installed (glib's g_spawn_sync with SEARCH_PATH)."""
    program = ctx.platform.find_program(argv[0])
    if program is None:
        return None
    status = ctx.platform.run_helper([program, *argv[1:]], setsid=False)
    return max(status, 0)  # WEXITSTATUS of a signalled child reads as 0


def _run_to_success(ctx, argv: list[str]) -> bool:
    """Run a suspend helper that must exit 0, with qemu-ga's error texts."""
    status = _spawn_sync(ctx, argv)
    label = " ".join(argv)
    if status is None:
        raise AgentError(f"the helper program '{label}' was not found")
    if status:
        raise AgentError(f"the helper program '{label}' returned an unexpected "
                         f"exit status code ({status})")
    return True


def _systemd(ctx, mode: SuspendMode, probe: bool) -> bool:
    if probe:
        # LSB status codes: 1..3 mean the unit exists (3 = not running)
        status = _spawn_sync(ctx, ["systemctl", "status", mode.systemd_unit])
        return status is not None and 0 < status < 4
    return _run_to_success(ctx, ["systemctl", mode.systemd_verb])


def _pm_utils(ctx, mode: SuspendMode, probe: bool) -> bool:
    if probe:
        status = _spawn_sync(ctx, ["pm-is-supported", mode.pm_flag])
        if status is None or status == 0:
            return status == 0
        raise AgentError("the helper program 'pm-is-supported' returned an unexpected "
                         f"exit status code ({status})")
    return _run_to_success(ctx, [mode.pm_program])


def _kernel(ctx, mode: SuspendMode, probe: bool) -> bool:
    if mode.kernel_word is None:
        raise AgentError("unknown guest suspend mode")
    if probe:
        try:
            states = ctx.platform.read_prefix(POWER_STATE, 31)
        except OSError:
            return False
        return mode.kernel_word.encode() in states
    try:
        ctx.platform.write_file(POWER_STATE, mode.kernel_word.encode())
    except OSError:
        raise AgentError("child process has failed to suspend") from None
    return True
