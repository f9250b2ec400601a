"""qga's configuration: qemu-ga.conf, the command line, and ``-D``.

Sources and precedence are qemu-ga 7.2's: the key file named by
``QGA_CONF`` (default /etc/qemu/qemu-ga.conf; a missing file is fine, any
other problem is fatal) is read first, then the command line; scalars on
the command line replace the file's, block lists add to it.  Lists split
on ``,`` only and keep empty pieces; each split is stored in reverse, so
``-b a,b,c`` dumps as ``c,b,a``, exactly as qemu-ga does.  The deprecated
key ``blacklist`` replaces ``block-rpcs`` when present (with a warning).

Beyond qemu-ga (all off by default, each a key in [general] and a long
option):

    fsfreeze-hook-timeout=SECONDS   --fsfreeze-hook-timeout=SECONDS
        kill a freeze/thaw hook that runs longer, and fail the command
    fsfreeze-hook-log=true          --fsfreeze-hook-log
        capture the hook's stdout/stderr into the agent's log
    fsfreeze-watchdog=SECONDS       --fsfreeze-watchdog=SECONDS
        thaw by itself when the host has not thawed within SECONDS

``-D`` prints them only when set, after qemu-ga's keys, so the dump of a
configuration that does not use them is byte-for-byte qemu-ga's.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from agent import keyfile
from agent.getopt import NO_ARGUMENT, OPTIONAL, REQUIRED, LongOption, iter_getopt_long

CONF_DEFAULT = "/etc/qemu/qemu-ga.conf"
VIRTIO_PATH_DEFAULT = "/dev/virtio-ports/org.qemu.guest_agent.0"
SERIAL_PATH_DEFAULT = "/dev/ttyS0"
PIDFILE_DEFAULT = "/var/run/qemu-ga.pid"
STATEDIR_DEFAULT = "/var/run"
FSFREEZE_HOOK_DEFAULT = "/etc/qemu/fsfreeze-hook"
GROUP = "general"

SHORT_OPTIONS = "hVvdm:p:l:f:F::b:s:t:Dr"
LONG_OPTIONS = [
    LongOption("help", NO_ARGUMENT, "h"),
    LongOption("version", NO_ARGUMENT, "V"),
    LongOption("dump-conf", NO_ARGUMENT, "D"),
    LongOption("logfile", REQUIRED, "l"),
    LongOption("pidfile", REQUIRED, "f"),
    LongOption("fsfreeze-hook", OPTIONAL, "F"),
    LongOption("verbose", NO_ARGUMENT, "v"),
    LongOption("method", REQUIRED, "m"),
    LongOption("path", REQUIRED, "p"),
    LongOption("daemonize", NO_ARGUMENT, "d"),
    LongOption("block-rpcs", REQUIRED, "b"),
    LongOption("blacklist", REQUIRED, "b"),  # deprecated alias, still accepted by 7.2
    LongOption("statedir", REQUIRED, "t"),
    LongOption("retry-path", NO_ARGUMENT, "r"),
    # qga's own
    LongOption("fsfreeze-hook-timeout", REQUIRED, "hook-timeout"),
    LongOption("fsfreeze-hook-log", NO_ARGUMENT, "hook-log"),
    LongOption("fsfreeze-watchdog", REQUIRED, "watchdog"),
]


class ConfigError(Exception):
    """A fatal configuration problem; ``message`` is what is logged."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UsageError(Exception):
    """A bad command line: the getopt line, then qemu-ga's hint."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass
class Config:
    daemonize: bool = False
    method: str | None = None
    path: str | None = None
    logfile: str | None = None
    pidfile: str | None = None
    fsfreeze_hook: str | None = None
    statedir: str | None = None
    verbose: bool = False
    retry_path: bool = False
    #: the block list in qemu-ga's internal (dump) order
    blocked: list[str] = field(default_factory=list)
    dump: bool = False
    # qga's own
    hook_timeout: float | None = None
    hook_log: bool = False
    watchdog: float | None = None
    #: GLib warnings met while reading the file, in order: (domain, text);
    #: domain "" is qemu-ga's own, "GLib" is GLib's
    warnings: list[tuple[str, str]] = field(default_factory=list)

    def fill_defaults(self) -> None:
        """Default pidfile, statedir, method and the method's default path."""
        if self.pidfile is None:
            self.pidfile = PIDFILE_DEFAULT
        if self.statedir is None:
            self.statedir = STATEDIR_DEFAULT
        if self.method is None:
            self.method = "virtio-serial"

    def default_path(self) -> None:
        if self.path is not None:
            return
        if self.method == "virtio-serial":
            self.path = VIRTIO_PATH_DEFAULT
        elif self.method == "isa-serial":
            self.path = SERIAL_PATH_DEFAULT
        else:
            raise ConfigError("must specify a path for this channel")


def split_list(text: str) -> list[str]:
    """qemu-ga's split_list: ``,`` pieces, prepended (so reversed); "" is no piece."""
    if text == "":
        return []
    return list(reversed(text.split(",")))


def conf_path(environ: dict[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    path = env.get("QGA_CONF")
    return CONF_DEFAULT if path is None else path   # set but empty: no file, as qemu-ga


def load_file(config: Config, path: str) -> None:
    """Apply the key file at ``path``; a missing file is silently ignored."""
    try:
        data = _read_regular(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError(_load_error(path, exc.strerror or str(exc))) from None
    except keyfile.KeyFileError as exc:
        raise ConfigError(_load_error(path, exc.message)) from None
    try:
        _apply(config, keyfile.KeyFile.parse(data))
    except keyfile.KeyFileError as exc:
        raise ConfigError(_load_error(path, exc.message)) from None


def _load_error(path: str, message: str) -> str:
    return f"error loading configuration from path: {path}, {message}"


def _read_regular(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise keyfile.KeyFileError("Not a regular file")
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(fd)


def _apply(config: Config, kf: keyfile.KeyFile) -> None:
    # qemu-ga reads every key even after a bad one; the first error wins
    first_error: list[keyfile.KeyFileError] = []

    def get(kind: str, key: str):
        if not kf.has_key(GROUP, key):
            return None
        try:
            return kf.get_boolean(GROUP, key) if kind == "bool" else kf.get_string(GROUP, key)
        except keyfile.KeyFileError as exc:
            failed(exc)
            return None

    def failed(exc: keyfile.KeyFileError) -> None:
        if first_error:
            # GLib complains when an error is set over a previous one
            config.warnings.append(("GLib", _GERROR_OVERWRITE + exc.message))
        else:
            first_error.append(exc)

    # qemu-ga's order, which decides whose error is reported
    for kind, key, attr in (("bool", "daemon", "daemonize"), ("str", "method", "method"),
                            ("str", "path", "path"), ("str", "logfile", "logfile"),
                            ("str", "pidfile", "pidfile"), ("str", "fsfreeze-hook", "fsfreeze_hook"),
                            ("str", "statedir", "statedir")):
        value = get(kind, key)
        if value is not None:
            setattr(config, attr, value)
    if get("bool", "verbose"):
        config.verbose = True
    value = get("bool", "retry-path")
    if value is not None:
        config.retry_path = value
    block_key = "block-rpcs"
    if kf.has_key(GROUP, "blacklist"):
        config.warnings.append(("", "config using deprecated 'blacklist' key, should be replaced"
                                    " with the 'block-rpcs' key."))
        block_key = "blacklist"
    value = get("str", block_key)
    if value is not None:
        config.blocked += split_list(value)
    value = get("bool", "fsfreeze-hook-log")
    if value is not None:
        config.hook_log = value
    for key, attr in (("fsfreeze-hook-timeout", "hook_timeout"),
                      ("fsfreeze-watchdog", "watchdog")):
        value = get("str", key)
        if value is not None:
            try:
                setattr(config, attr, _seconds(value))
            except ValueError:
                failed(keyfile.KeyFileError(
                    f"Key file contains key \u201c{key}\u201d which has a value "
                    "that cannot be interpreted."))
    if first_error:
        raise first_error[0]


_GERROR_OVERWRITE = ("GError set over the top of a previous GError or uninitialized memory.\n"
                     "This indicates a bug in someone's code. You must ensure an error is NULL "
                     "before it's set.\nThe overwriting error message was: ")


def _seconds(text: str) -> float | None:
    value = float(text)
    if value != value or value < 0 or value == float("inf"):
        raise ValueError(text)
    return value or None


@dataclass
class Action:
    """What the command line asks for besides running: help, version, list RPCs."""
    kind: str  # "help", "version", "list-rpcs"


def parse_command_line(config: Config, prog: str, argv: list[str]) -> Action | None:
    """Apply the options to ``config``; an option that exits at once returns its Action."""
    try:
        for key, arg in iter_getopt_long(prog, argv, SHORT_OPTIONS, LONG_OPTIONS):
            action = _apply_option(config, key, arg)
            if action is not None:
                return action
    except Exception as exc:
        message = getattr(exc, "message", None)
        if message is None:
            raise
        raise UsageError(message) from None
    return None


def _apply_option(config: Config, key: str, arg: str | None) -> Action | None:
    simple = {"m": "method", "p": "path", "l": "logfile", "f": "pidfile", "t": "statedir"}
    if key in simple:
        setattr(config, simple[key], arg)
    elif key == "F":
        config.fsfreeze_hook = arg if arg is not None else FSFREEZE_HOOK_DEFAULT
    elif key == "v":
        config.verbose = True
    elif key == "V":
        return Action("version")
    elif key == "h":
        return Action("help")
    elif key == "d":
        config.daemonize = True
    elif key == "D":
        config.dump = True
    elif key == "r":
        config.retry_path = True
    elif key == "b":
        if arg in ("?", "help"):
            return Action("list-rpcs")
        config.blocked += split_list(arg or "")
    elif key == "hook-log":
        config.hook_log = True
    elif key in ("hook-timeout", "watchdog"):
        try:
            value = _seconds(arg or "")
        except ValueError:
            raise UsageError(f"invalid number of seconds for --{_LONG_NAME[key]}: '{arg}'") from None
        setattr(config, "hook_timeout" if key == "hook-timeout" else "watchdog", value)
    # -s (Windows service commands) is accepted and ignored on Linux, as by qemu-ga
    return None


_LONG_NAME = {"hook-timeout": "fsfreeze-hook-timeout", "watchdog": "fsfreeze-watchdog"}


def dump(config: Config) -> str:
    """``-D``: the effective configuration as qemu-ga prints it."""
    entries: list[tuple[str, str | bool]] = [("daemon", config.daemonize),
                                             ("method", config.method or "")]
    if config.path is not None:
        entries.append(("path", config.path))
    if config.logfile is not None:
        entries.append(("logfile", config.logfile))
    entries.append(("pidfile", config.pidfile or ""))
    if config.fsfreeze_hook is not None:
        entries.append(("fsfreeze-hook", config.fsfreeze_hook))
    entries += [("statedir", config.statedir or ""), ("verbose", config.verbose),
                ("retry-path", config.retry_path), ("block-rpcs", ",".join(config.blocked))]
    if config.hook_timeout is not None:
        entries.append(("fsfreeze-hook-timeout", _number(config.hook_timeout)))
    if config.hook_log:
        entries.append(("fsfreeze-hook-log", True))
    if config.watchdog is not None:
        entries.append(("fsfreeze-watchdog", _number(config.watchdog)))
    return keyfile.render(GROUP, entries)


def _number(value: float) -> str:
    return str(int(value)) if value == int(value) else repr(value)
