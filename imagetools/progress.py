"""``-p`` progress, printed exactly as qemu-img prints it.

qemu-img writes ``    (P/100%)\\r`` records to stdout (tty or not) whenever
the percentage moved by more than a per-command minimum step (up or
down), or hit 0 or 100, and a final newline when the command ends. The
arithmetic is C ``float`` (32-bit); :func:`f32` rounds each step the same way so that the
printed two-decimal values agree. Without ``-p``, SIGUSR1 makes the next
update print one ``    (P/100%)`` line on stderr, as in qemu-img.

The engine (convert, compare, ...) reports progress through a plain
``callback(done, total)``; :meth:`Progress.absolute` and
:meth:`Progress.relative` turn those calls into qemu-img's updates.
"""

from __future__ import annotations

import struct
import sys
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import TextIO

_F32 = struct.Struct("f")


def f32(value: float) -> float:
    """``value`` rounded to a C float."""
    return _F32.unpack(_F32.pack(value))[0]


class Progress:
    """One command's progress meter (qemu_progress_init/print/end)."""

    def __init__(self, enabled: bool, min_skip: float, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.min_skip = f32(min_skip)
        self.current = 0.0
        self.last_print = 0.0
        self.stream = stream
        self._pending = False
        if not enabled:
            self._install_sigusr1()

    def _install_sigusr1(self) -> None:
        def on_signal(signum: int, frame: object) -> None:
            self._pending = True
        try:
            # the C module under ``signal`` (always loaded): ``signal`` itself
            # imports enum, a few milliseconds at the start of every command
            import _signal as signal
        except ImportError:
            import signal
        try:
            signal.signal(signal.SIGUSR1, on_signal)
        except (ValueError, OSError, AttributeError):
            pass   # not the main thread, or no SIGUSR1: no on-demand report

    def _out(self) -> TextIO:
        return self.stream if self.stream is not None else sys.stdout

    def print(self, delta: float, max_: int = 0) -> None:
        """qemu_progress_print: absolute ``delta`` if ``max_`` is 0, else a share."""
        delta = f32(delta)
        if max_ == 0:
            current = delta
        else:
            current = f32(self.current + f32(f32(delta / 100.0) * max_))
        if current > 100:
            current = 100.0
        self.current = current
        # it prints when the value moved by more than the step either way (an
        # amend's second operation starts low again), and at 0 and 100
        if (current > f32(self.last_print + self.min_skip)
                or current < f32(self.last_print - self.min_skip)
                or current == 100 or current == 0):
            self.last_print = current
            self._emit()

    def _emit(self) -> None:
        if self.enabled:
            out = self._out()
            out.write("    (%3.2f/100%%)\r" % self.current)
            out.flush()
        elif self._pending:
            self._pending = False
            sys.stderr.write("    (%3.2f/100%%)\n" % self.current)
            sys.stderr.flush()

    def end(self) -> None:
        if self.enabled:
            out = self._out()
            out.write("\n")
            out.flush()

    # -- adapters for the engine's callback(done, total) ------------------

    def absolute(self, done: int, total: int) -> None:
        """Share ``done/total`` of the whole job (convert's accounting)."""
        self.print(100.0 * done / total if total else 100.0, 0)

    def relative(self, chunk: int, total: int) -> None:
        """``chunk`` more units of ``total`` were done (compare's accounting)."""
        self.print(f32(f32(f32(chunk) / f32(total)) * 100) if total else 0.0, 100)
