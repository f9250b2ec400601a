"""Ctrl-C (and SIGTERM) as a request to stop at the next safe point.

A backup must never stop between a freeze and its thaw, or leave the VM on
an overlay because the user pressed Ctrl-C during the copy. So signals do
not raise anywhere: they set a :class:`CancelToken`; the backup checks it
where stopping is safe (between steps, inside the copy's progress callback)
and then runs its cleanup — thaw, commit back, delete the overlay — to the
end. Pressing Ctrl-C again only repeats that cleanup is under way.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from typing import Callable, Iterator

from hostclient.errors import Interrupted


class CancelToken:
    """Set once by a signal (or a test); checked at safe points."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def cancel(self, reason: str = "interrupted") -> None:
        if self.reason is None:
            self.reason = reason

    @property
    def cancelled(self) -> bool:
        return self.reason is not None

    def check(self) -> None:
        if self.reason is not None:
            raise Interrupted(self.reason)


def _default_notice(message: str) -> None:
    print(f"quiesce: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def cancel_on_signals(token: CancelToken,
                      notice: Callable[[str], None] = _default_notice) -> Iterator[CancelToken]:
    """Route SIGINT and SIGTERM to ``token`` while the block runs."""
    names = {signal.SIGINT: "interrupted (Ctrl-C)", signal.SIGTERM: "terminated (SIGTERM)"}

    def handler(signum: int, frame: object) -> None:  # noqa: ARG001
        if token.cancelled:
            notice("still cleaning up so the VM is left thawed and on its own disk; please wait")
        else:
            token.cancel(names.get(signum, f"signal {signum}"))
            notice(f"{names.get(signum)}: stopping at the next safe point, then cleaning up")

    previous = {s: signal.signal(s, handler) for s in names}
    try:
        yield token
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
