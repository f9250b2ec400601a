"""guest-fsfreeze-status, -freeze, -freeze-list, -thaw, and the freeze hook.

qemu-ga 7.2's sequence, which hosts rely on:

freeze(-list): run the hook with ``freeze`` (an error stops here, nothing
frozen); build the mount list; enter the frozen state (commands
restricted, log silent, marker file in the statedir); FIFREEZE the mounts
in REVERSE mount order (freeze-list: only mount points named exactly);
EOPNOTSUPP/EBUSY are skipped and not counted; any other failure thaws
everything (thaw hook included) and returns the error.  The result is the
number of filesystems this call froze.

thaw: FITHAW every mount in mount order, repeating until it fails (a
filesystem frozen twice needs two thaws); count those that thawed at least
once; leave the frozen state; run the hook with ``thaw``.

Where qga differs, on purpose: a freeze that froze nothing also runs the
thaw hook (qemu-ga leaves the hook's "freeze" side, e.g. a locked database,
in place); the hook may be given a timeout and its output may be logged;
the watchdog thaws by itself after ``fsfreeze-watchdog`` seconds.
"""

from __future__ import annotations

import errno
import logging
import os
from typing import Any

from agent.context import Context
from agent.errors import AgentError
from agent.registry import command

hook_log = logging.getLogger("qga.hook")

_SKIPPED = (errno.EOPNOTSUPP, errno.EBUSY)


def _config(ctx: Context, name: str, default: Any = None) -> Any:
    return getattr(ctx.config, name, default) if ctx.config is not None else default


@command("guest-fsfreeze-status", while_frozen=True)
def guest_fsfreeze_status(ctx: Context) -> str:
    return "frozen" if ctx.frozen else "thawed"


@command("guest-fsfreeze-freeze")
def guest_fsfreeze_freeze(ctx: Context) -> int:
    return freeze(ctx, None)


@command("guest-fsfreeze-freeze-list")
def guest_fsfreeze_freeze_list(ctx: Context, mountpoints: list[str] | None = None) -> int:
    return freeze(ctx, mountpoints)


@command("guest-fsfreeze-thaw", while_frozen=True)
def guest_fsfreeze_thaw(ctx: Context) -> int:
    return thaw(ctx)


def _mounts(ctx: Context) -> list:
    try:
        return ctx.platform.mount_list()
    except OSError:
        raise AgentError("failed to open mtab file: '/proc/self/mounts'") from None


def freeze(ctx: Context, mountpoints: list[str] | None) -> int:
    ctx.log.info("guest-fsfreeze called")
    run_hook(ctx, "freeze")
    mounts = _mounts(ctx)
    ctx.set_frozen(True)
    try:
        count = _freeze_mounts(ctx, mounts, mountpoints)
    except BaseException:
        _thaw_after_failure(ctx)
        raise
    if count == 0:
        ctx.set_frozen(False)
        try:
            run_hook(ctx, "thaw")
        except AgentError as exc:
            ctx.log.warning("fsfreeze hook failed on thaw after an empty freeze: %s", exc.desc)
        return 0
    _start_watchdog(ctx)
    return count


def _freeze_mounts(ctx: Context, mounts: list, mountpoints: list[str] | None) -> int:
    platform = ctx.platform
    wanted = None if mountpoints is None else set(mountpoints)
    count = 0
    for mount in reversed(mounts):
        if wanted is not None and mount.dirname not in wanted:
            continue
        try:
            fd = platform.open_mountpoint(mount.dirname)
        except OSError as exc:
            raise AgentError(f"failed to open {mount.dirname}: {os.strerror(exc.errno or 0)}") from None
        try:
            platform.fifreeze(fd)
        except OSError as exc:
            if exc.errno not in _SKIPPED:
                raise AgentError(f"failed to freeze {mount.dirname}: "
                                 f"{os.strerror(exc.errno or 0)}") from None
        else:
            count += 1
        finally:
            platform.close_fd(fd)
    return count


def _thaw_after_failure(ctx: Context) -> None:
    try:
        thaw(ctx)
    except AgentError:
        pass


def thaw(ctx: Context) -> int:
    mounts = _mounts(ctx)
    platform = ctx.platform
    count = 0
    for mount in mounts:
        try:
            fd = platform.open_mountpoint(mount.dirname)
        except OSError:
            continue
        thawed = False
        try:
            while True:
                try:
                    platform.fithaw(fd)
                except OSError:
                    break
                thawed = True
        finally:
            platform.close_fd(fd)
        count += thawed
    _stop_watchdog(ctx)
    ctx.set_frozen(False)
    run_hook(ctx, "thaw")
    return count


# ---------------------------------------------------------------- the hook

def run_hook(ctx: Context, arg: str) -> None:
    """Run the configured hook with ``freeze``/``thaw``; AgentError on failure."""
    hook = _config(ctx, "fsfreeze_hook")
    if not hook:
        return
    if not os.access(ctx.platform.path(hook), os.X_OK):
        err = os.strerror(_access_errno(ctx.platform.path(hook)))
        raise AgentError(f"can't access fsfreeze hook '{hook}': {err}")
    ctx.log.info("executing fsfreeze hook with arg '%s'", arg)
    timeout = _config(ctx, "hook_timeout")
    capture = bool(_config(ctx, "hook_log"))
    result = ctx.platform.run_hook(hook, arg, timeout=timeout, capture=capture)
    if capture:
        for line in result.output.decode("utf-8", "replace").splitlines():
            hook_log.info("fsfreeze hook %s: %s", arg, line)
        if result.dropped:
            hook_log.info("fsfreeze hook %s: %d more bytes of output not logged", arg, result.dropped)
    if result.timed_out:
        hook_log.error("fsfreeze hook '%s %s' killed after %g seconds", hook, arg, timeout)
        raise AgentError(f"fsfreeze hook has timed out after {timeout:g} seconds")
    if result.status < 0:
        raise AgentError("fsfreeze hook has terminated abnormally")
    if result.status:
        raise AgentError(f"fsfreeze hook has failed with status {result.status}")


def _access_errno(path: str) -> int:
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno or errno.EACCES
    return errno.EACCES


# ---------------------------------------------------------------- watchdog

def _start_watchdog(ctx: Context) -> None:
    seconds = _config(ctx, "watchdog")
    if not seconds:
        return
    _stop_watchdog(ctx)
    ctx.services["fsfreeze-watchdog"] = ctx.timers.call_later(seconds, lambda: _watchdog(ctx))


def _stop_watchdog(ctx: Context) -> None:
    ctx.timers.cancel(ctx.services.pop("fsfreeze-watchdog", None))


def _watchdog(ctx: Context) -> None:
    ctx.services.pop("fsfreeze-watchdog", None)
    if not ctx.frozen:
        return
    seconds = _config(ctx, "watchdog")
    try:
        count = thaw(ctx)
        outcome = f"thawed {count} filesystem(s)"
    except AgentError as exc:
        outcome = f"thawed, but: {exc.desc}"
    # logged after the thaw: nothing is written while frozen
    logging.getLogger("qga").critical(
        "fsfreeze watchdog: filesystems stayed frozen for %g seconds without "
        "guest-fsfreeze-thaw; %s", seconds, outcome)


def setup(ctx: Context) -> None:
    """Daemon start-up: the exit-time thaw, and the watchdog for an agent
    that starts frozen (a previous instance died mid-freeze)."""
    ctx.services["fsfreeze-cleanup"] = lambda: _cleanup(ctx)
    if ctx.frozen:
        _start_watchdog(ctx)


def _cleanup(ctx: Context) -> None:
    if ctx.frozen:
        try:
            thaw(ctx)
        except AgentError as exc:
            ctx.log.warning("failed to clean up frozen filesystems: %s", exc.desc)
