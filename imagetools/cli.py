"""``qimg``: command-line entry point of the image engine (qemu-img 7.2 syntax).

``main`` only reads the global options (``-h``, ``-V``, ``-T``), finds the
command and hands it the rest of the command line; ``run`` (the installed
``qimg`` program) calls it and exits. Each command lives in
``imagetools.ops.<command>`` and is imported only when it runs, so a small
command such as ``info`` starts nearly as fast as a bare interpreter.

Errors end here: a :class:`~imagetools.errors.UsageError` prints
``PROG: message`` plus ``Try 'PROG --help' for more information`` (exit 1);
any other :class:`~imagetools.errors.ImageError` prints its qemu-img style
report and exits with its ``exit_code``. ``PROG`` is ``qemu-img`` when qimg
is installed under that name (a drop-in symlink), ``qimg`` otherwise.
"""

from __future__ import annotations

import os
import sys

from imagetools import __version__
from imagetools.errors import ImageError, UsageError

QEMU_IMG_VERSION = "7.2.22"

#: every qemu-img 7.2 command; the ones without a module in imagetools.ops
#: answer "not implemented yet"
COMMANDS = ("amend", "bench", "bitmap", "check", "commit", "compare", "convert",
            "create", "dd", "info", "map", "measure", "snapshot", "rebase", "resize")


def version_text(prog: str) -> str:
    if prog == "qemu-img":
        return (f"qemu-img version {QEMU_IMG_VERSION} (qimg {__version__})\n"
                "Copyright (c) the quiesce authors; a re-implementation of QEMU's qemu-img\n")
    return (f"qimg version {__version__} (qemu-img {QEMU_IMG_VERSION} compatible)\n"
            "Copyright (c) the quiesce authors; a re-implementation of QEMU's qemu-img\n")


def main(argv: list[str] | None = None) -> int:
    from imagetools.output import report_error, set_prog
    if argv is None:
        argv = sys.argv[1:]
        prog = set_prog(sys.argv[0] if sys.argv else "qimg")
    else:
        prog = set_prog("qimg")
    _setup_streams()
    try:
        return _dispatch(prog, list(argv))
    except UsageError as err:
        sys.stdout.flush()
        sys.stderr.write(f"{prog}: {err}\nTry '{prog} --help' for more information\n")
        return 1
    except ImageError as err:
        report_error(err)
        return getattr(err, "exit_code", 1)
    except KeyboardInterrupt:
        sys.stderr.write(f"\n{prog}: interrupted\n")
        return 130
    except BrokenPipeError:
        _silence_stdout()
        return 1
    except SystemExit:
        raise
    except Exception as err:  # a bug: one clear line, the traceback on request
        if os.environ.get("QIMG_DEBUG"):
            raise
        sys.stdout.flush()
        sys.stderr.write(f"{prog}: internal error: {type(err).__name__}: {err}"
                         " (set QIMG_DEBUG=1 for a traceback)\n")
        return 1


def run() -> None:
    """The ``qimg`` program: :func:`main`, then exit with its status.

    The exit skips the interpreter's finalization (freeing every module and
    object: about 1.3 ms of a 12 ms ``qimg info``) once the output is
    flushed, as every image is closed by then. It is a normal exit when
    something may still need the interpreter: another thread alive, or an
    ``atexit`` callback registered (the fault-injection counter).
    """
    status = main() or 0
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:
        _silence_stdout()
        status = status or 1
    except OSError as err:          # e.g. a full disk under a redirection
        _silence_stdout()
        os.write(2, f"qimg: error writing output: {err.strerror or err}\n".encode())
        status = status or 1
    if _nothing_left_to_finish():
        os._exit(status)
    sys.exit(status)


def _nothing_left_to_finish() -> bool:
    import atexit
    threading = sys.modules.get("threading")
    if threading is not None and threading.active_count() > 1:
        return False
    callbacks = getattr(atexit, "_ncallbacks", None)     # CPython's count
    return callbacks is not None and callbacks() == 0


def _dispatch(prog: str, args: list[str]) -> int:
    from imagetools.ops.args import Getopt
    if not args:
        raise UsageError("Not enough arguments")
    scan = Getopt([prog] + args, "+:hVT:",
                  [("help", 0, "h"), ("version", 0, "V"), ("trace", 1, "T")])
    for opt, value in scan:
        if opt == "h":
            return print_help(prog)
        if opt == "V":
            sys.stdout.write(version_text(prog))
            return 0
        if opt == "T":
            from imagetools.output import warn
            warn(f"tracing is not supported, ignoring '{value}'")
    rest = scan.operands
    if not rest:
        return 0
    command = rest[0]
    if command not in COMMANDS:
        raise UsageError(f"Command not found: {command}")
    try:
        __import__(f"imagetools.ops.{command}")
        module = sys.modules[f"imagetools.ops.{command}"]
    except ModuleNotFoundError as err:
        if err.name != f"imagetools.ops.{command}":
            raise
        from imagetools.output import Reported
        raise Reported(f"'{command}' is not implemented yet") from None
    return module.main(rest)


def _setup_streams() -> None:
    """File names are bytes: print them back exactly as they came in."""
    encoding = sys.getfilesystemencoding()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(encoding=encoding, errors="surrogateescape")
        except (AttributeError, ValueError):
            pass


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def print_help(prog: str) -> int:
    from imagetools.ops.usage import help_text
    sys.stdout.write(version_text(prog) + help_text(prog))
    return 0
