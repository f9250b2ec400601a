"""``quiesce``: command-line entry point of the host client."""

from __future__ import annotations

import argparse
import sys

from hostclient import __version__

SUBCOMMANDS = {
    "backup": "take a consistent backup of a running or stopped VM",
    "restore": "write the disk images of a backup back out",
    "verify": "re-check a backup's images against its manifest",
    "list": "list the backups in a target directory",
    "agent": "run one guest agent command by hand",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quiesce",
        description="Consistent backups of QEMU/KVM virtual machines.")
    parser.add_argument("-V", "--version", action="version",
                        version=f"quiesce {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, text in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command is None:
        build_parser().print_help()
        return 0
    print(f"quiesce: '{args.command}' is not implemented yet", file=sys.stderr)
    return 1
