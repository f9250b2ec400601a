"""``qimg``: command-line entry point of the image engine (qemu-img 7.2 syntax)."""

from __future__ import annotations

import sys

from imagetools import __version__

QEMU_IMG_VERSION = "7.2.22"

COMMANDS = ("amend", "bench", "check", "commit", "compare", "convert", "create",
            "dd", "info", "map", "measure", "snapshot", "rebase", "resize")

USAGE = f"""\
qimg version {__version__} (qemu-img {QEMU_IMG_VERSION} compatible)
usage: qimg [standard options] command [command options]
QEMU disk image utility

    '-h', '--help'       display this help and exit
    '-V', '--version'    output version information and exit

Command syntax: as qemu-img 7.2 ({", ".join(COMMANDS)})
"""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("qimg: Not enough arguments\nTry 'qimg --help' for more information",
              file=sys.stderr)
        return 1
    if args[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0
    if args[0] in ("-V", "--version"):
        print(f"qimg version {__version__} (qemu-img {QEMU_IMG_VERSION} compatible)")
        return 0
    if args[0] not in COMMANDS:
        print(f"qimg: Command not found: {args[0]}\nTry 'qimg --help' for more information",
              file=sys.stderr)
        return 1
    print(f"qimg: '{args[0]}' is not implemented yet", file=sys.stderr)
    return 1
