"""``qga``: the command line of the guest agent (qemu-ga 7.2's flags and exits).

``main()`` only dispatches: configuration (agent.config), the frozen check,
the log, then the daemon (agent.daemon).  Exit statuses are qemu-ga's:
0 for help, version, ``-D``, ``-b help`` and a normal stop; 1 for option
and configuration errors and channel failures; 0 (sic, as qemu-ga) when
initialisation fails after the options were accepted.
"""

from __future__ import annotations

import os
import sys

from agent import __version__

QEMU_GA_VERSION = "7.2.22"


def usage(prog: str) -> str:
    return f"""\
Usage: {prog} [-m <method> -p <path>] [<options>]
qga {__version__}: a drop-in for QEMU Guest Agent {QEMU_GA_VERSION}

  -m, --method      transport method: one of unix-listen, virtio-serial,
                    isa-serial, or vsock-listen (virtio-serial is the default)
  -p, --path        device/socket path (the default for virtio-serial is:
                    /dev/virtio-ports/org.qemu.guest_agent.0,
                    the default for isa-serial is:
                    /dev/ttyS0).
                    Socket addresses for vsock-listen are written as
                    <cid>:<port>.
  -l, --logfile     set logfile path, logs to stderr by default
  -f, --pidfile     specify pidfile (default is /var/run/qemu-ga.pid)
  -F, --fsfreeze-hook
                    enable fsfreeze hook. Accepts an optional argument that
                    specifies script to run on freeze/thaw. Script will be
                    called with 'freeze'/'thaw' arguments accordingly.
                    (default is /etc/qemu/fsfreeze-hook)
                    If using -F with an argument, do not follow -F with a
                    space.
                    (for example: -F/var/run/fsfreezehook.sh)
  -t, --statedir    specify dir to store state information (absolute paths
                    only, default is /var/run)
  -v, --verbose     log extra debugging information
  -V, --version     print version information and exit
  -d, --daemonize   become a daemon
  -b, --block-rpcs  comma-separated list of RPCs to disable (no spaces,
                    use "help" to list available RPCs)
  -D, --dump-conf   dump a qemu-ga config file based on current config
                    options / command-line parameters to stdout
  -r, --retry-path  attempt re-opening path if it's unavailable or closed
                    due to an error which may be recoverable in the future
                    (virtio-serial driver re-install, serial device hot
                    plug/unplug, etc.)
  -h, --help        display this help and exit

qga's own options (off unless given; also keys of [general] in qemu-ga.conf):
      --fsfreeze-hook-timeout=SECONDS
                    kill a freeze/thaw hook running longer and fail the command
      --fsfreeze-hook-log
                    write the hook's stdout/stderr into the agent's log
      --fsfreeze-watchdog=SECONDS
                    thaw by itself if the host has not thawed in time

Configuration: /etc/qemu/qemu-ga.conf, or the file named by QGA_CONF.
"""


def _write(stream, text: str) -> None:
    """``text`` as the bytes it came from (UTF-8, undecodable bytes kept), as
    C's stdio writes them whatever the locale."""
    stream.flush()
    stream.buffer.write(text.encode("utf-8", "surrogateescape"))
    stream.buffer.flush()


def _write_stdout(text: str) -> None:
    _write(sys.stdout, text)


def _byte_transparent_interpreter() -> None:
    """Re-run this interpreter in UTF-8 mode when the locale's charset is not
    UTF-8 (e.g. LANG=de_DE.ISO-8859-1).

    qemu-ga never calls setlocale: it treats arguments, paths and file
    contents as bytes and prints the same whatever LANG or LC_ALL say.
    Python decodes argv, the environment and paths with the locale's
    charset unless it runs in UTF-8 mode (automatic in the C and POSIX
    locales, the same as UTF-8 in a UTF-8 locale); everything here assumes
    UTF-8 with undecodable bytes kept.  ``-X utf8`` rather than PYTHONUTF8,
    so that hooks and guest-exec children do not inherit it.
    """
    if sys.flags.utf8_mode or sys.getfilesystemencoding().lower().replace("-", "") == "utf8":
        return
    if not sys.executable or len(sys.orig_argv) < 2:
        return
    os.execv(sys.executable, [sys.orig_argv[0], "-X", "utf8", *sys.orig_argv[1:]])


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        _byte_transparent_interpreter()
    from agent import config as cfg
    from agent import log as agentlog

    args = sys.argv[1:] if argv is None else argv
    prog = os.path.basename(sys.argv[0]) if argv is None and sys.argv[0] else "qga"
    if prog in ("__main__.py", "-c", "-m"):
        prog = "qga"

    config = cfg.Config()
    try:
        cfg.load_file(config, cfg.conf_path())
    except cfg.ConfigError as exc:
        for domain, warning in config.warnings:
            agentlog.early("warning", warning, domain)
        agentlog.early("critical", exc.message)
        return 1
    for domain, warning in config.warnings:
        agentlog.early("warning", warning, domain)

    try:
        action = cfg.parse_command_line(config, prog, args)
    except cfg.UsageError as exc:
        _write(sys.stderr, exc.message + "\n")
        _write_stdout(f"Unknown option, try '{prog} --help' for more information.\n")
        return 1
    if action is not None:
        return _act(action.kind, prog)

    config.fill_defaults()
    from agent.transports import activation_socket
    sockets, activated_method = activation_socket()
    listen_fd = None
    if sockets > 1:
        agentlog.early("critical", "qemu-ga only supports listening on one socket")
        return 1
    if sockets == 1:
        if activated_method is None:
            agentlog.early("critical", "unsupported listen fd type")
            return 1
        config.method, config.path, listen_fd = activated_method, None, 3
    else:
        try:
            config.default_path()
        except cfg.ConfigError as exc:
            agentlog.early("critical", exc.message)
            return 1

    if config.dump:
        _write_stdout(cfg.dump(config))
        return 0
    return _run_agent(config, listen_fd)


def _act(kind: str, prog: str) -> int:
    if kind == "help":
        _write_stdout(usage(prog))
    elif kind == "version":
        _write_stdout(f"QEMU Guest Agent {QEMU_GA_VERSION}\n")
    else:  # -b help: every command, in qemu-ga's registration order
        from agent import registry
        from agent.commands import load_all
        from agent.dispatcher import registration_order
        load_all()
        _write_stdout("".join(f"{name}\n" for name in registration_order(registry.COMMANDS)))
    return 0


def _run_agent(config, listen_fd: int | None) -> int:
    import logging

    from agent import log as agentlog
    from agent.daemon import Agent
    from agent.state import StateDir

    statedir = config.statedir
    if not os.path.isabs(statedir):
        agentlog.early("critical", f"the state directory must be an absolute path: {statedir}")
        return 1
    marker = StateDir(statedir)
    try:
        frozen = marker.was_frozen()
    except OSError as exc:
        agentlog.early("critical", f"unable to access state file at path {marker.frozen_marker}: "
                                   f"{os.strerror(exc.errno or 0)}")
        return 1
    if frozen:
        agentlog.early("warning", "previous instance appears to have exited with frozen"
                                  " filesystems. deferring logging/pidfile creation and"
                                  " disabling non-fsfreeze-safe commands until"
                                  " guest-fsfreeze-thaw is issued, or filesystems are"
                                  " manually unfrozen and the file "
                                  f"{marker.frozen_marker} is removed")
    handler = agentlog.install(config.verbose)
    log = logging.getLogger(agentlog.ROOT)
    log.debug("Guest agent version %s started (qga %s)", QEMU_GA_VERSION, __version__)
    agent = Agent(config, handler, listen_fd)
    if not agent.initialize(frozen):
        log.critical("error initializing guest agent")
        return 0
    return agent.run()
