"""Waiting for an fsfreeze hook process and collecting what it prints.

A hook is done when the hook process exits, not when its output pipe
closes: the usual "lock holder" hook (``sleep 600 & echo ok; exit 0``, or
a database client kept open for the freeze) leaves a background child that
still holds the pipe.  So the wait is on the process itself (a pidfd where
the kernel has one, Linux 5.3+, else polling every 10 ms), the pipe is read
while the hook runs (a hook may print more than a pipe holds), and when the
hook has exited, what it wrote is in the pipe and is taken without waiting
for anything else.  The pipe is then handed to a thread that reads and
discards whatever the hook's children still print, until they close it, so
they neither block on a full pipe nor die of SIGPIPE.

Only a hook that is still running at its deadline is killed (its whole
session: TERM, then KILL); children of a hook that finished are left alone,
as qemu-ga leaves them.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import threading
import time

#: what is kept of a hook's output for the log; the rest is read and dropped
OUTPUT_LIMIT = 1 << 20
_POLL_STEP = 0.01            # without a pidfd: how often to look at the hook
_KILL_GRACE = ((signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0))


class HookProcess:
    """A started hook: ``proc`` and, when its output is captured, the read end
    ``output_fd`` of the pipe its stdout and stderr write to (owned here)."""

    def __init__(self, proc: subprocess.Popen, output_fd: int | None) -> None:
        self.proc = proc
        self.output_fd = output_fd
        self.output = bytearray()
        self.output_dropped = 0
        self._eof = output_fd is None
        if output_fd is not None:
            os.set_blocking(output_fd, False)
        try:
            self._pidfd: int | None = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):
            self._pidfd = None

    def finish(self, timeout: float | None) -> tuple[int, bytes, bool]:
        """Wait for the hook (killing its session if it outlives ``timeout``
        seconds): (status, -N when killed by signal N; output; timed out)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        timed_out = not self._wait(deadline)
        if timed_out:
            for sig, grace in _KILL_GRACE:
                try:
                    os.killpg(self.proc.pid, sig)
                except OSError:
                    pass
                if self._wait(time.monotonic() + grace):
                    break
        self._close()
        status = self.proc.returncode
        return (-signal.SIGKILL if status is None else status), bytes(self.output), timed_out

    def _wait(self, deadline: float | None) -> bool:
        """Read output until the hook exits (True, reaped) or ``deadline`` (False)."""
        poller = select.poll()
        if self._pidfd is not None:
            poller.register(self._pidfd, select.POLLIN)
        if not self._eof:
            poller.register(self.output_fd, select.POLLIN)
        while True:
            if self._pidfd is None and self.proc.poll() is not None:
                return True
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if self._pidfd is None:
                wait = _POLL_STEP if wait is None else min(wait, _POLL_STEP)
            events = poller.poll(None if wait is None else wait * 1000)
            for fd, _ in events:
                if fd == self._pidfd:
                    self.proc.wait()
                    return True
                if not self._read():
                    poller.unregister(fd)
            if deadline is not None and time.monotonic() >= deadline:
                # checked whether or not output came: a hook printing
                # without pause must not keep its deadline from being seen
                return self.proc.poll() is not None

    def _read(self) -> bool:
        """Take what the pipe holds now; False once it reached end of file."""
        while True:
            try:
                data = os.read(self.output_fd, 65536)
            except BlockingIOError:
                return True
            except OSError:
                data = b""
            if not data:
                self._eof = True
                return False
            room = OUTPUT_LIMIT - len(self.output)
            self.output += data[:room]
            self.output_dropped += max(0, len(data) - room)

    def _close(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        if self.output_fd is None:
            return
        if not self._eof:
            self._read()
        if self._eof:
            os.close(self.output_fd)
        else:
            threading.Thread(target=_discard_until_closed, args=(self.output_fd,),
                             name="fsfreeze-hook-leftover-output", daemon=True).start()
        self.output_fd = None


def _discard_until_closed(fd: int) -> None:
    """What the children a hook left behind print, read and dropped.

    Nothing is logged from here: the log may sit on a filesystem that is
    frozen by then, and a write blocked on it must never hold the agent.
    """
    os.set_blocking(fd, True)
    try:
        while os.read(fd, 65536):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
