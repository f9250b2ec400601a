"""The progress bar and the signal routing of Ctrl-C."""

from __future__ import annotations

import io
import os
import signal

import pytest

from hostclient.errors import Interrupted
from hostclient.interrupt import CancelToken, cancel_on_signals
from hostclient.progress import ProgressBar, human_bytes


def test_progress_bar_draws_in_place_and_ends_the_line():
    out = io.StringIO()
    bar = ProgressBar("vda (1/2)", stream=out, enabled=True, width=10, interval=0)
    bar.update(0, 4 << 20)
    bar.update(1 << 20, 4 << 20)
    bar.update(4 << 20, 4 << 20)
    bar.finish()
    frames = out.getvalue().split("\r")[1:]
    assert frames[1].startswith("vda (1/2) [##--------]  25%  1.0 MiB/4.0 MiB  ")
    assert frames[2].startswith("vda (1/2) [##########] 100%  4.0 MiB/4.0 MiB  ")
    assert out.getvalue().endswith("\n")


def test_progress_bar_is_silent_when_disabled():
    out = io.StringIO()
    bar = ProgressBar("x", stream=out, enabled=False)
    bar.update(1, 2)
    bar.finish()
    assert out.getvalue() == ""
    assert ProgressBar("x", stream=io.StringIO()).enabled is False     # not a terminal


@pytest.mark.parametrize("n, text", [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"),
                                     (5 << 30, "5.0 GiB"), (3 << 40, "3.0 TiB")])
def test_human_bytes(n, text):
    assert human_bytes(n) == text


def test_sigint_sets_the_token_and_never_raises():
    notes = []
    with cancel_on_signals(CancelToken(), notes.append) as token:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        assert token.cancelled and token.reason == "interrupted (Ctrl-C)"
        with pytest.raises(Interrupted, match="Ctrl-C"):
            token.check()
    assert "stopping at the next safe point" in notes[0]
    assert "still cleaning up" in notes[1]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
