"""guest-file-open/close/read/write/seek/flush: guest files behind numbered handles.

Handle numbers come from the persistent counter ``fd_counter`` in
STATEDIR/qga.state (qemu-ga's file and format), so they start at 1000, keep
increasing across agent restarts and are never reused; the open files
themselves live only as long as the agent.

qemu-ga wraps each file in a stdio stream; here the handle is the raw,
non-blocking descriptor, which gives the same answers (the read position
after a write, ``eof`` meaning "this read hit the end") without stdio's
buffering. Where stdio loses data qemu-ga loses too, this does better: a
read or write on a pipe that would block after moving some bytes returns
what it moved instead of failing and dropping it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from agent.commands.glibcompat import b64decode, b64encode, os_path, strerror
from agent.errors import AgentError
from agent.registry import command

READ_COUNT_DEFAULT = 4096
#: 48 MiB: base64 of the data must stay under the 64 MiB JSON token limit
READ_COUNT_MAX = 48 * 1024 * 1024
FIRST_HANDLE = 1000
STATE_FILE = "qga.state"

_CREATE = os.O_CREAT
OPEN_MODES = {
    "r": os.O_RDONLY, "rb": os.O_RDONLY,
    "w": os.O_WRONLY | _CREATE | os.O_TRUNC, "wb": os.O_WRONLY | _CREATE | os.O_TRUNC,
    "a": os.O_WRONLY | _CREATE | os.O_APPEND, "ab": os.O_WRONLY | _CREATE | os.O_APPEND,
    "r+": os.O_RDWR, "rb+": os.O_RDWR, "r+b": os.O_RDWR,
    "w+": os.O_RDWR | _CREATE | os.O_TRUNC, "wb+": os.O_RDWR | _CREATE | os.O_TRUNC,
    "w+b": os.O_RDWR | _CREATE | os.O_TRUNC,
    "a+": os.O_RDWR | _CREATE | os.O_APPEND, "ab+": os.O_RDWR | _CREATE | os.O_APPEND,
    "a+b": os.O_RDWR | _CREATE | os.O_APPEND,
}
NEW_FILE_MODE = 0o666
WHENCE_NAMES = {"set": os.SEEK_SET, "cur": os.SEEK_CUR, "end": os.SEEK_END}


@dataclass
class OpenFile:
    fd: int
    path: str


class FileTable:
    """The open handles of one agent and the persistent handle counter."""

    def __init__(self, ctx) -> None:
        self.ctx = ctx
        self.files: dict[int, OpenFile] = {}
        self._counter = FIRST_HANDLE

    def find(self, handle: int) -> OpenFile:
        try:
            return self.files[handle]
        except KeyError:
            raise AgentError(f"handle '{handle}' has not been found") from None

    def add(self, opened: OpenFile) -> int:
        handle = self._take_handle()
        self.files[handle] = opened
        return handle

    def _take_handle(self) -> int:
        # The file is the authority (another agent may have run since), the
        # memory only guards against reusing a number whose commit failed.
        handle = max(self._counter, read_fd_counter(self.ctx.statedir))
        self._counter = handle + 1
        try:
            write_fd_counter(self.ctx.statedir, self._counter)
        except OSError as err:
            self.ctx.log.warning("failed to write persistent state to %s: %s",
                                 state_path(self.ctx.statedir), strerror(err))
            raise AgentError("failed to commit persistent state to disk") from None
        return handle


def state_path(statedir: str) -> str:
    return os.path.join(statedir, STATE_FILE)


def read_fd_counter(statedir: str) -> int:
    """``fd_counter`` of ``[global]`` in qga.state; 1000 when absent or unreadable."""
    try:
        with open(state_path(statedir), encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return FIRST_HANDLE
    group = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            group = line
        elif group == "[global]" and "=" in line:
            key, _, value = line.partition("=")
            if key.strip() == "fd_counter":
                try:
                    return int(value.strip())
                except ValueError:
                    return FIRST_HANDLE
    return FIRST_HANDLE


def write_fd_counter(statedir: str, counter: int) -> None:
    """Replace qga.state atomically, in the format qemu-ga writes."""
    path = state_path(statedir)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(f"[global]\nfd_counter={counter}\n")
    os.replace(tmp, path)


def _table(ctx) -> FileTable:
    return ctx.service("file", FileTable)


@command("guest-file-open")
def file_open(ctx, path: str, mode: str = "r") -> int:
    flags = OPEN_MODES.get(mode)
    if flags is None:
        raise AgentError(f"invalid file open mode '{mode}'")
    ctx.log.info("guest-file-open called, filepath: %s, mode: %s", path, mode)
    fd = _open_or_create(ctx, path, mode, flags | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        handle = _table(ctx).add(OpenFile(fd, path))
    except AgentError:
        os.close(fd)
        raise
    ctx.log.info("guest-file-open, handle: %d", handle)
    return handle


def _open_or_create(ctx, path: str, mode: str, flags: int) -> int:
    """Create exclusively first, so only a file this call created gets mode 0666
    (whatever the umask); an existing file keeps its permissions."""
    real = os_path(path)
    created = bool(flags & os.O_CREAT)
    try:
        try:
            fd = ctx.platform.open_file(real, flags | (os.O_EXCL if created else 0), 0)
        except FileExistsError:
            created = False
            fd = ctx.platform.open_file(real, flags & ~os.O_CREAT)
    except OSError as err:
        raise AgentError(f"failed to open file '{path}' (mode: '{mode}'): {strerror(err)}") from None
    if created:
        try:
            os.fchmod(fd, NEW_FILE_MODE)
        except OSError as err:
            os.close(fd)
            os.unlink(real)
            raise AgentError(f"failed to set permission 0666 on new file '{path}' "
                             f"(mode: '{mode}'): {strerror(err)}") from None
    return fd


@command("guest-file-close")
def file_close(ctx, handle: int) -> dict:
    table = _table(ctx)
    opened = table.find(handle)
    ctx.log.info("guest-file-close called, handle: %d", handle)
    del table.files[handle]
    try:
        os.close(opened.fd)
    except OSError as err:
        raise AgentError(f"failed to close handle: {strerror(err)}") from None
    return {}


@command("guest-file-read")
def file_read(ctx, handle: int, count: int | None = None) -> dict:
    opened = _table(ctx).find(handle)
    if count is None:
        count = READ_COUNT_DEFAULT
    elif count < 0 or count > READ_COUNT_MAX:
        raise AgentError(f"value '{count}' is invalid for argument count")
    data, eof = _read_up_to(opened.fd, count)
    return {"count": len(data), "buf-b64": b64encode(data), "eof": eof}


def _read_up_to(fd: int, count: int) -> tuple[bytes, bool]:
    """Read until ``count`` bytes or the end: (data, whether the end was hit)."""
    chunks: list[bytes] = []
    got = 0
    while got < count:
        try:
            chunk = os.read(fd, count - got)
        except BlockingIOError as err:
            if got:
                break
            raise AgentError(f"failed to read file: {strerror(err)}") from None
        except OSError as err:
            raise AgentError(f"failed to read file: {strerror(err)}") from None
        if not chunk:
            return b"".join(chunks), True
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks), False


@command("guest-file-write")
def file_write(ctx, handle: int, buf_b64: str, count: int | None = None) -> dict:
    opened = _table(ctx).find(handle)
    data = b64decode(buf_b64)
    if count is None:
        count = len(data)
    elif count < 0 or count > len(data):
        raise AgentError(f"value '{count}' is invalid for argument count")
    view = memoryview(data)[:count]
    written = 0
    while written < count:
        try:
            written += os.write(opened.fd, view[written:])
        except BlockingIOError as err:
            if written:
                break
            raise AgentError(f"failed to write to file: {strerror(err)}") from None
        except OSError as err:
            ctx.log.info("guest-file-write failed, handle: %d", handle)
            raise AgentError(f"failed to write to file: {strerror(err)}") from None
    return {"count": written, "eof": False}


@command("guest-file-seek")
def file_seek(ctx, handle: int, offset: int, whence: int | str) -> dict:
    opened = _table(ctx).find(handle)
    if isinstance(whence, str):
        code = WHENCE_NAMES[whence]
    elif whence in (os.SEEK_SET, os.SEEK_CUR, os.SEEK_END):
        code = whence
    else:
        raise AgentError(f"invalid whence code {whence}")
    try:
        position = os.lseek(opened.fd, offset, code)
    except OSError as err:
        raise AgentError(f"failed to seek file: {strerror(err)}") from None
    return {"position": position, "eof": False}


@command("guest-file-flush")
def file_flush(ctx, handle: int) -> dict:
    # Nothing is buffered in the agent: every write already reached the kernel.
    _table(ctx).find(handle)
    return {}
