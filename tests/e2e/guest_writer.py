"""Writer that runs inside the test guest and keeps a filesystem busy.

Each file is written under a temporary name, fsync'ed, renamed to
``f-<seq>-<sha256>.bin`` and the directory fsync'ed: any file with the final
name in a consistent copy of the filesystem must match the checksum in its
name. Old files are removed so the disk never fills. ``STATUS`` (in /run,
never on the filesystem being frozen) tells the host how far it got.

Runs with the host's plain python3 (no project imports): it is the workload,
not the product.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import signal
import sys
import time


def write_one(directory: str, seq: int, size: int, dir_fd: int) -> str:
    data = os.urandom(size)
    digest = hashlib.sha256(data).hexdigest()
    tmp = os.path.join(directory, f".tmp-{seq:08d}")
    final = os.path.join(directory, f"f-{seq:08d}-{digest}.bin")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, final)
    os.fsync(dir_fd)
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("directory")
    parser.add_argument("--status", default="/run/guest/writer.status")
    parser.add_argument("--min-size", type=int, default=4096)
    parser.add_argument("--max-size", type=int, default=256 * 1024)
    parser.add_argument("--keep", type=int, default=200, help="files kept before deleting the oldest")
    parser.add_argument("--pause", type=float, default=0.0, help="seconds between files")
    args = parser.parse_args(argv)

    stop = False

    def on_term(signum, frame):  # noqa: ARG001 - signal handler signature
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    os.makedirs(args.directory, exist_ok=True)
    dir_fd = os.open(args.directory, os.O_RDONLY | os.O_DIRECTORY)
    written: list[str] = []
    seq = 0
    rng = random.Random()
    while not stop:
        seq += 1
        written.append(write_one(args.directory, seq, rng.randint(args.min_size, args.max_size), dir_fd))
        while len(written) > args.keep:
            os.unlink(written.pop(0))
        tmp = args.status + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{seq} {time.time():.3f}\n")
        os.rename(tmp, args.status)
        if args.pause:
            time.sleep(args.pause)
    os.close(dir_fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
