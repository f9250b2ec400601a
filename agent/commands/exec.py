"""guest-exec and guest-exec-status: run a guest program, collect its exit and output.

guest-exec starts the program at once (no shell; a name without ``/`` is
looked up in the PATH of ``env`` when it has one, else in the agent's) and
answers with its pid. Background threads feed ``input-data`` to its stdin,
collect stdout and stderr (at most 16 MiB each, the rest read and dropped
with the ``*-truncated`` flag set) and reap it, so the agent never blocks
on a child. guest-exec-status reports ``exited: false`` until the process
has exited and, when output is captured, both pipes are closed (a
background grandchild holding stdout keeps it "running", as in qemu-ga);
the first status that reports the exit forgets the process.
"""

from __future__ import annotations

import errno
import os
import selectors
import threading
from dataclasses import dataclass, field

from agent.commands.glibcompat import b64decode, b64encode, os_bytes, strerror
from agent.errors import AgentError
from agent.registry import command

MAX_OUTPUT = 16 * 1024 * 1024
_IO_CHUNK = 64 * 1024


@dataclass
class Stream:
    data: bytearray = field(default_factory=bytearray)
    truncated: bool = False
    closed: bool = False

    def take(self, chunk: bytes) -> None:
        room = MAX_OUTPUT - len(self.data)
        if len(chunk) > room:
            self.truncated = True
            chunk = chunk[:room]
        self.data += chunk


@dataclass
class Process:
    popen: object
    capture: bool
    out: Stream = field(default_factory=Stream)
    err: Stream = field(default_factory=Stream)
    returncode: int | None = None

    @property
    def finished(self) -> bool:
        if self.returncode is None:
            return False
        return not self.capture or (self.out.closed and self.err.closed)


class ProcessTable:
    """guest-exec'd processes by pid, until a status call reports their end."""

    def __init__(self, ctx) -> None:
        self.processes: dict[int, Process] = {}
        self.lock = threading.Lock()


def _table(ctx) -> ProcessTable:
    return ctx.service("exec", ProcessTable)


@command("guest-exec")
def guest_exec(ctx, path: str, arg: list[str] | None = None, env: list[str] | None = None,
               input_data: str | None = None, capture_output: bool = False) -> dict:
    stdin_data = b64decode(input_data) if input_data is not None else None
    argv = [os_bytes(a) for a in [path, *(arg or [])]]
    ctx.log.info('guest-exec called: "%s"', " ".join([path, *(arg or [])]))
    environment = _environment(env) if env is not None else None
    try:
        executable = _resolve(ctx, path, environment)
        try:
            popen = ctx.platform.spawn(argv, executable=os.fsdecode(executable),
                                       env=environment, stdin=stdin_data is not None,
                                       capture=capture_output)
        except OSError as err:
            if err.errno != errno.ENOEXEC:
                raise
            # no #! line: glib runs the file with /bin/sh, as execvp(3) does
            popen = ctx.platform.spawn([b"/bin/sh", executable, *argv[1:]],
                                       executable="/bin/sh", env=environment,
                                       stdin=stdin_data is not None, capture=capture_output)
    except OSError as err:
        raise AgentError("Guest agent command failed, error was 'Failed to execute child "
                         f"process \u201c{path}\u201d ({strerror(err)})'") from None
    proc = Process(popen, capture_output)
    with _table(ctx).lock:
        _table(ctx).processes[popen.pid] = proc
    _start_threads(proc, stdin_data)
    return {"pid": popen.pid}


def _environment(entries: list[str]) -> list[tuple[bytes, bytes]]:
    """``env`` replaces the whole environment, entries kept as given."""
    return [os_bytes(entry).partition(b"=")[::2] for entry in entries]


def _resolve(ctx, path: str, environment: list[tuple[bytes, bytes]] | None) -> bytes:
    """The program to execute: ``path`` itself when it has a ``/``, else the
    first executable of that name in PATH (glib's G_SPAWN_SEARCH_PATH)."""
    name = os_bytes(path)
    if not name:
        raise FileNotFoundError(errno.ENOENT, "empty program name")
    if b"/" in name:
        return name
    search = None
    for key, value in environment or ():
        if key == b"PATH":  # the first one, as getenv(3) finds it
            search = os.fsdecode(value)
            break
    found = ctx.platform.find_program(os.fsdecode(name), search)
    if found is not None:
        return os.fsencode(found)
    # like execvp: a match that cannot be executed (no x bit, a directory)
    # makes the search fail with EACCES rather than ENOENT
    dirs = (search if search is not None else ctx.platform.getenv("PATH") or "").split(":")
    if any(ctx.platform.exists(os.path.join(d or ".", os.fsdecode(name))) for d in dirs):
        raise PermissionError(errno.EACCES, "not executable")
    raise FileNotFoundError(errno.ENOENT, "not found")


def _start_threads(proc: Process, stdin_data: bytes | None) -> None:
    popen = proc.popen
    pipes = [p for p in (popen.stdin, popen.stdout, popen.stderr) if p is not None]
    if pipes:
        threading.Thread(target=_pump, args=(proc, stdin_data), daemon=True,
                         name=f"qga-exec-io-{popen.pid}").start()
    threading.Thread(target=_reap, args=(proc,), daemon=True,
                     name=f"qga-exec-wait-{popen.pid}").start()


def _reap(proc: Process) -> None:
    proc.returncode = proc.popen.wait()


def _pump(proc: Process, stdin_data: bytes | None) -> None:
    """Write the input and read both outputs until every pipe is closed."""
    popen = proc.popen
    sel = selectors.DefaultSelector()
    pending = memoryview(stdin_data or b"")
    if popen.stdin is not None:
        os.set_blocking(popen.stdin.fileno(), False)
        if pending:
            sel.register(popen.stdin, selectors.EVENT_WRITE)
        else:
            popen.stdin.close()
    for pipe, stream in ((popen.stdout, proc.out), (popen.stderr, proc.err)):
        if pipe is not None:
            sel.register(pipe, selectors.EVENT_READ, stream)
    try:
        while sel.get_map():
            for key, _events in sel.select():
                if key.fileobj is popen.stdin:
                    pending = _feed(sel, popen.stdin, pending)
                else:
                    _drain(sel, key.fileobj, key.data)
    finally:
        sel.close()


def _feed(sel, pipe, pending: memoryview) -> memoryview:
    try:
        pending = pending[os.write(pipe.fileno(), pending[:_IO_CHUNK]):]
    except BlockingIOError:
        return pending
    except OSError:  # the child closed its stdin (EPIPE): stop feeding
        pending = pending[:0]
    if not pending:
        sel.unregister(pipe)
        pipe.close()
    return pending


def _drain(sel, pipe, stream: Stream) -> None:
    try:
        chunk = os.read(pipe.fileno(), _IO_CHUNK)
    except OSError:
        chunk = b""
    if chunk:
        stream.take(chunk)
        return
    sel.unregister(pipe)
    pipe.close()
    stream.closed = True


@command("guest-exec-status")
def guest_exec_status(ctx, pid: int) -> dict:
    table = _table(ctx)
    ctx.log.info("guest-exec-status called, pid: %d", pid & 0xFFFFFFFF)
    with table.lock:
        proc = table.processes.get(pid)
        if proc is None:
            raise AgentError("Invalid parameter 'pid'")
        if not proc.finished:
            return {"exited": False}
        del table.processes[pid]
    status: dict = {"exited": True}
    if proc.returncode < 0:
        status["signal"] = -proc.returncode
    else:
        status["exitcode"] = proc.returncode
    for name, stream in (("out", proc.out), ("err", proc.err)):
        if stream.data:
            status[f"{name}-data"] = b64encode(bytes(stream.data))
            status[f"{name}-truncated"] = stream.truncated
    return status
