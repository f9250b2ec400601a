"""``quiesce``: command-line entry point of the host client.

Parses the command line once into the frozen configs of hostclient/config.py
and dispatches; errors become one line on stderr. Exit codes: 0 success,
1 failure, 2 usage error; ``backup`` adds 3 (VM left on an overlay),
4 (guest may still be frozen) and 130 (interrupted), see hostclient/backup.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable

from hostclient import __version__
from hostclient.config import (
    AGENT_FAILURE_POLICIES,
    AgentCommandConfig,
    BackupConfig,
    ImageSpec,
    ListConfig,
    RestoreConfig,
    Timeouts,
    VerifyConfig,
)
from hostclient.errors import ConfigError, HostClientError, Interrupted

EXIT_USAGE = 2


def _info(quiet: bool) -> Callable[[str], None]:
    if quiet:
        return lambda message: None
    return lambda message: print(f"quiesce: {message}", file=sys.stderr, flush=True)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds: {text!r}")
    return value


class _FormatAction(argparse.Action):
    """``--format FMT``: the format of every ``--image`` after it (until the
    next ``--format``), as qemu-img's -f applies to the file after it."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if namespace.image_format is not None and not namespace.format_used:
            parser.error(f"--format {namespace.image_format} is followed by no --image "
                         "(--format applies to the --image options after it)")
        namespace.image_format = values
        namespace.format_used = False


class _ImageAction(argparse.Action):
    """``--image PATH``, remembered with the ``--format`` given before it."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        namespace.image = [*namespace.image, (values, namespace.image_format)]
        namespace.format_used = True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quiesce",
        description="Consistent backups of QEMU/KVM virtual machines.")
    parser.add_argument("-V", "--version", action="version", version=f"quiesce {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every step on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    b = sub.add_parser("backup", help="take a consistent backup of a running or stopped VM",
                       description="Back up a running VM (--qmp, --agent) with the guest frozen "
                       "only for the snapshot, or a stopped VM's images (--image).")
    b.add_argument("--qmp", metavar="QMP_SOCKET", help="QEMU's QMP unix socket (running VM)")
    b.add_argument("--agent", metavar="AGENT_SOCKET", help="the guest agent's unix socket")
    b.add_argument("--disk", action="append", default=[], metavar="NODE",
                   help="back up only this drive (node, drive or device name); repeatable")
    b.add_argument("--mountpoint", action="append", default=[], metavar="DIR",
                   help="freeze only this guest filesystem (guest-fsfreeze-freeze-list); repeatable")
    b.add_argument("--image", action=_ImageAction, dest="image", default=[], metavar="PATH",
                   help="an image of a stopped VM; repeatable")
    b.add_argument("--format", action=_FormatAction, dest="image_format", default=None,
                   metavar="FMT", help="format of the --image options that follow it (qcow2, "
                   "raw, ...); without it the format is guessed from the content, and a guessed "
                   "format may not name backing or data files")
    b.add_argument("-c", "--compress", action="store_true", help="write compressed qcow2 images")
    b.add_argument("--on-agent-failure", choices=AGENT_FAILURE_POLICIES, default="fail",
                   help="without a working freeze: fail (default), or take a crash-consistent backup")
    b.add_argument("--freeze-timeout", type=_positive, default=Timeouts.freeze, metavar="SECONDS",
                   help=f"longest wait for the guest to freeze (default {Timeouts.freeze:g})")
    b.add_argument("--thaw-timeout", type=_positive, default=Timeouts.thaw, metavar="SECONDS",
                   help=f"longest wait for the thaw (default {Timeouts.thaw:g})")
    b.add_argument("--commit-timeout", type=_positive, default=Timeouts.commit, metavar="SECONDS",
                   help=f"longest wait for each commit back (default {Timeouts.commit:g})")
    b.add_argument("--overlay-dir", type=Path, metavar="DIR",
                   help="where QEMU writes the temporary overlays (default: next to each image)")
    b.add_argument("--json", action="store_true", help="print the manifest instead of the directory")
    b.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal)")
    b.add_argument("-q", "--quiet", action="store_true", help="no step messages on stderr")
    b.add_argument("target_dir", type=Path, metavar="TARGET_DIR")
    b.set_defaults(format_used=True)

    r = sub.add_parser("restore", help="write the disk images of a backup back out")
    r.add_argument("-O", dest="out_format", default="qcow2", choices=("qcow2", "raw"),
                   help="format of the restored images (default qcow2)")
    r.add_argument("--disk", action="append", default=[], help="restore only this disk; repeatable")
    r.add_argument("--force", action="store_true", help="overwrite existing files")
    r.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    r.add_argument("-q", "--quiet", action="store_true")
    r.add_argument("backup_dir", type=Path, metavar="BACKUP_DIR")
    r.add_argument("dest_dir", type=Path, metavar="DEST_DIR")

    v = sub.add_parser("verify", help="re-check a backup's images against its manifest")
    v.add_argument("--json", action="store_true")
    v.add_argument("backup_dir", type=Path, metavar="BACKUP_DIR")

    ls = sub.add_parser("list", help="list the backups in a target directory")
    ls.add_argument("--json", action="store_true")
    ls.add_argument("target_dir", type=Path, metavar="TARGET_DIR")

    a = sub.add_parser("agent", help="run one guest agent command by hand",
                       description="Send one command to the guest agent and print its answer "
                       "(like virsh qemu-agent-command).")
    a.add_argument("--timeout", type=_positive, help="seconds to wait for the answer")
    a.add_argument("--pretty", action="store_true", help="indent the JSON answer")
    a.add_argument("socket", metavar="SOCKET")
    a.add_argument("agent_command", metavar="COMMAND")
    a.add_argument("arguments", nargs="?", metavar="JSON-ARGS")

    rc = sub.add_parser("recover", help="commit a VM left on backup overlays back to its disks")
    rc.add_argument("--qmp", required=True, metavar="QMP_SOCKET")
    rc.add_argument("--commit-timeout", type=_positive, default=Timeouts.commit, metavar="SECONDS")
    return parser


# ------------------------------------------------------------- commands


def cmd_backup(args: argparse.Namespace) -> int:
    from hostclient.backup import Ui, run_backup
    from hostclient.interrupt import CancelToken, cancel_on_signals
    if args.image_format is not None and not args.format_used:
        raise ConfigError(f"--format {args.image_format} is followed by no --image "
                          "(--format applies to the --image options after it)")
    timeouts = Timeouts(freeze=args.freeze_timeout, thaw=args.thaw_timeout,
                        commit=args.commit_timeout)
    cfg = BackupConfig(
        target_dir=args.target_dir, qmp=args.qmp, agent=args.agent,
        images=tuple(ImageSpec(Path(p), fmt) for p, fmt in args.image), disks=tuple(args.disk),
        mountpoints=tuple(args.mountpoint), compress=args.compress,
        on_agent_failure=args.on_agent_failure, overlay_dir=args.overlay_dir,
        timeouts=timeouts, json=args.json, progress=args.progress)
    progress = sys.stderr.isatty() if cfg.progress is None else cfg.progress
    ui = Ui(info=_info(args.quiet), progress=progress and not args.quiet)
    with cancel_on_signals(CancelToken()) as token:
        result = run_backup(cfg, cancel=token, ui=ui)
    if result.manifest is not None:
        if cfg.json:
            print(json.dumps(result.manifest.to_json(), indent=2))
        else:
            print(result.directory)
        for step in result.manifest.recovery:
            print(f"quiesce: next step: {step}", file=sys.stderr)
        if result.manifest.status != "complete":
            print(f"quiesce: backup {result.manifest.status}; see {result.directory}/manifest.json",
                  file=sys.stderr)
    return result.exit_code


def cmd_restore(args: argparse.Namespace) -> int:
    from hostclient.interrupt import CancelToken, cancel_on_signals
    from hostclient.restore import restore
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    cfg = RestoreConfig(args.backup_dir, args.dest_dir, args.out_format, tuple(args.disk),
                        args.force, progress and not args.quiet)
    with cancel_on_signals(CancelToken()) as token:
        for path in restore(cfg, token, _info(args.quiet)):
            print(path)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from hostclient.interrupt import CancelToken, cancel_on_signals
    from hostclient.restore import verify
    cfg = VerifyConfig(args.backup_dir, args.json)
    with cancel_on_signals(CancelToken()) as token:
        manifest, verdicts = verify(cfg, token)
    ok = all(v.ok for v in verdicts)
    if cfg.json:
        print(json.dumps({"backup_id": manifest.backup_id, "ok": ok,
                          "disks": [v.__dict__ for v in verdicts]}, indent=2))
    else:
        for v in verdicts:
            print(f"{v.name}: {'ok' if v.ok else 'FAILED: ' + (v.problem or '')}")
        print(f"backup {manifest.backup_id}: {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


def cmd_list(args: argparse.Namespace) -> int:
    from hostclient.restore import format_listing, list_backups, listing_json
    rows = list_backups(ListConfig(args.target_dir, args.json))
    print(listing_json(rows) if args.json else format_listing(rows))
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    from hostclient.agentclient import AgentClient
    arguments: dict[str, Any] | None = None
    if args.arguments is not None:
        try:
            arguments = json.loads(args.arguments)
        except ValueError as exc:
            raise ConfigError(f"JSON-ARGS is not valid JSON: {exc}") from None
        if not isinstance(arguments, dict):
            raise ConfigError("JSON-ARGS must be a JSON object, e.g. '{\"id\": 1}'")
    cfg = AgentCommandConfig(args.socket, args.agent_command, arguments, args.timeout, args.pretty)
    with AgentClient(cfg.socket) as agent:
        value = agent.execute(cfg.command, cfg.arguments, timeout=cfg.timeout)
    if value is not None or cfg.command not in ("guest-shutdown", "guest-suspend-disk",
                                                "guest-suspend-ram", "guest-suspend-hybrid"):
        print(json.dumps({"return": value}, indent=2 if cfg.pretty else None))
    return 0


def cmd_recover(args: argparse.Namespace) -> int:
    from hostclient.recover import RecoverConfig, recover
    recover(RecoverConfig(args.qmp, args.commit_timeout), _info(False))
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "backup": cmd_backup, "restore": cmd_restore, "verify": cmd_verify, "list": cmd_list,
    "agent": cmd_agent, "recover": cmd_recover,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.ERROR,
                        format="quiesce: %(name)s: %(message)s", stream=sys.stderr)
    if not args.verbose:
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)  # its errors reach us as exceptions
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"quiesce {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Interrupted as exc:
        print(f"quiesce: {exc}", file=sys.stderr)
        return 130
    except HostClientError as exc:
        print(f"quiesce: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("quiesce: interrupted", file=sys.stderr)
        return 130
