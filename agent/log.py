"""The agent's log: qemu-ga's line format, levels and freeze silence.

Every record is one line, ``SECONDS.MICROSECONDS: LEVEL: MESSAGE``, with
GLib's level words (error, critical, warning, message, info, debug), to
stderr or the ``-l`` file (opened for append).  qemu-ga shows error and
critical by default and everything with ``-v``.  While filesystems are
frozen nothing is written at all (the log may live on a frozen
filesystem); lines are dropped, not queued, as in qemu-ga.

Records of the ``qga.hook`` logger (the fsfreeze hook's captured output,
asked for with ``fsfreeze-hook-log``) are written whatever the level, since
the user asked for them explicitly.

Before the handler is installed (configuration errors, the frozen-state
warning) messages use GLib's default format, see :func:`early`.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import IO

MESSAGE = 25
logging.addLevelName(MESSAGE, "MESSAGE")

LEVEL_WORDS = {logging.CRITICAL: "critical", logging.ERROR: "error",
               logging.WARNING: "warning", MESSAGE: "message",
               logging.INFO: "info", logging.DEBUG: "debug"}

ROOT = "qga"
HOOK_LOGGER = "qga.hook"


def level_word(levelno: int) -> str:
    for level in sorted(LEVEL_WORDS, reverse=True):
        if levelno >= level:
            return LEVEL_WORDS[level]
    return "debug"


class AgentLogHandler(logging.Handler):
    def __init__(self, stream: IO[str], verbose: bool = False) -> None:
        super().__init__(logging.DEBUG)
        self.stream = stream
        self.threshold = logging.DEBUG if verbose else logging.ERROR
        self.enabled = True

    def emit(self, record: logging.LogRecord) -> None:
        if not self.enabled:
            return
        if record.levelno < self.threshold and not record.name.startswith(HOOK_LOGGER):
            return
        try:
            now = time.time()
            line = f"{int(now)}.{int(now % 1 * 1e6):06d}: {level_word(record.levelno)}: " \
                   f"{record.getMessage()}\n"
            self.stream.write(line)
            self.stream.flush()
        except Exception:  # a full disk or a closed stderr must not stop the agent
            pass

    def set_stream(self, stream: IO[str]) -> None:
        old, self.stream = self.stream, stream
        if old not in (sys.stderr, sys.__stderr__):
            try:
                old.close()
            except OSError:
                pass


def install(verbose: bool) -> AgentLogHandler:
    """Route the ``qga`` loggers to stderr in qemu-ga's format."""
    handler = AgentLogHandler(sys.stderr, verbose)
    root = logging.getLogger(ROOT)
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    root.propagate = False
    return handler


def open_logfile(path: str) -> IO[str]:
    """``-l FILE``: append, close-on-exec, line-flushed; OSError if it cannot be opened."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o666)
    return os.fdopen(fd, "a", encoding="utf-8", errors="backslashreplace")


def early(level: str, message: str, domain: str = "") -> None:
    """GLib's default handler format, used before the agent's own is installed.

    qemu-ga never calls setlocale, so GLib converts its messages to the C
    locale's charset whatever LANG or LC_ALL say: every non-ASCII character
    (its own curly quotes included) and every undecodable byte prints as '?'.
    """
    now = time.time()
    stamp = time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}"
    if domain:
        text = f"\n(process:{os.getpid()}): {domain}-{level.upper()} **: {stamp}: {message}\n"
    else:
        text = f"\n** (process:{os.getpid()}): {level.upper()} **: {stamp}: {message}\n"
    try:
        sys.stderr.flush()
        sys.stderr.buffer.write(text.encode("ascii", "replace"))
        sys.stderr.buffer.flush()
    except (OSError, ValueError, AttributeError):
        pass
