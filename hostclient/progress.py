"""A one-line progress bar for terminals (silent elsewhere)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class ProgressBar:
    """``label [#####-----]  52%  1.2 GiB/2.0 GiB  130.2 MiB/s``, redrawn in place."""

    def __init__(self, label: str, stream: TextIO | None = None, enabled: bool | None = None,
                 width: int = 30, interval: float = 0.1) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.width = width
        self.interval = interval
        self.started = time.monotonic()
        self._last = 0.0
        self._drawn = False

    def update(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < self.interval and done < total:
            return
        self._last = now
        fraction = done / total if total else 1.0
        filled = int(self.width * fraction)
        rate = done / max(now - self.started, 1e-6)
        line = (f"\r{self.label} [{'#' * filled}{'-' * (self.width - filled)}] {fraction * 100:3.0f}%"
                f"  {human_bytes(done)}/{human_bytes(total)}  {human_bytes(rate)}/s")
        self.stream.write(line + "\033[K")
        self.stream.flush()
        self._drawn = True

    def finish(self) -> None:
        if self.enabled and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
