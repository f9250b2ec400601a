"""``qga``: command-line entry point of the guest agent (qemu-ga 7.2 flags)."""

from __future__ import annotations

import sys

from agent import __version__

QEMU_GA_VERSION = "7.2.22"

USAGE = f"""\
Usage: qga [-m <method> -p <path>] [<options>]
qga {__version__}: QEMU Guest Agent {QEMU_GA_VERSION} compatible

  -m, --method      transport method: one of unix-listen, virtio-serial,
                    isa-serial, or vsock-listen (virtio-serial is the default)
  -p, --path        device/socket path
  -V, --version     print version information and exit
  -h, --help        display this help and exit
"""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        sys.stdout.write(USAGE)
        return 0
    if any(a in ("-V", "--version") for a in args):
        print(f"QEMU Guest Agent {QEMU_GA_VERSION} (qga {__version__})")
        return 0
    print("qga: the agent daemon is not implemented yet", file=sys.stderr)
    return 1
