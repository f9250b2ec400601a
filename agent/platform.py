"""Everything the agent reads from or does to the operating system.

Handlers never touch /proc, /sys, /etc, ioctls or subprocesses directly:
they call ``ctx.platform``. Unit tests give the handlers a ``Platform``
whose ``root`` is a temporary directory holding a fake /proc, /sys and /etc
tree (or a subclass overriding the side-effecting methods), so they run
without root; the real behaviour is tested for real on loop devices and in
a QEMU guest.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from typing import Sequence


@dataclass
class Platform:
    root: str = "/"
    env: dict[str, str] = field(default_factory=dict)

    def path(self, path: str) -> str:
        """``path`` (absolute, as in the guest) under this platform's root."""
        if self.root == "/":
            return path
        return os.path.join(self.root, path.lstrip("/"))

    def read_text(self, path: str) -> str:
        with open(self.path(path), encoding="utf-8", errors="replace") as f:
            return f.read()

    def read_bytes(self, path: str) -> bytes:
        with open(self.path(path), "rb") as f:
            return f.read()

    def exists(self, path: str) -> bool:
        return os.path.exists(self.path(path))

    def listdir(self, path: str) -> list[str]:
        return sorted(os.listdir(self.path(path)))

    def readlink(self, path: str) -> str:
        return os.readlink(self.path(path))

    def realpath(self, path: str) -> str:
        """Resolve symlinks inside the platform root; the result is a guest path."""
        resolved = os.path.realpath(self.path(path))
        if self.root == "/":
            return resolved
        root = os.path.realpath(self.root)
        return "/" + os.path.relpath(resolved, root).lstrip("./") if resolved != root else "/"

    def run(self, argv: Sequence[str], *, input: bytes | None = None,
            timeout: float | None = None) -> subprocess.CompletedProcess:
        """Run a helper program (hwclock, shutdown, chpasswd...) and capture its output."""
        return subprocess.run(list(argv), input=input, capture_output=True,
                              timeout=timeout, check=False)
