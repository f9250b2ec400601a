"""The image engine (``imagetools``) as the backup uses it.

Copy, verify and fingerprint disk images through the project's own engine
(``imagetools.api`` and ``imagetools.image.open_image``), never through
qemu-img, and turn every engine failure into an :class:`EngineError` that
names the image. Also answers whether a running QEMU holds an image: QEMU
marks the images it has open with OFD locks on bytes 100-103 (permissions
in use) and 200-203 (permissions it refuses to share).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from hostclient.durable import sync_file
from hostclient.errors import EngineError, HostClientError, VerifyError

CHUNK = 4 << 20
_ZEROS = bytes(CHUNK)
_FLOCK = struct.Struct("hhxxxxqqixxxx")       # struct flock, Linux x86-64/aarch64

Progress = Callable[[int, int], None]


def _api() -> Any:
    try:
        from imagetools import api
    except ImportError as exc:
        raise EngineError(f"the image engine's API (imagetools.api) is not available: {exc}") from None
    return api


def _wrap(what: str, exc: BaseException) -> EngineError:
    from imagetools.errors import ImageError
    if isinstance(exc, HostClientError):
        raise exc
    if isinstance(exc, (ImageError, OSError)):
        return EngineError(f"{what}: {exc}".replace("\n", " "))
    return EngineError(f"{what}: internal error in the image engine: "
                       f"{type(exc).__name__}: {exc}".replace("\n", " "))


def _image_errors() -> tuple[type[BaseException], ...]:
    """What an engine call may fail with. Anything but our own errors counts:
    a bug in the engine must fail the backup cleanly, not crash it."""
    return (Exception,)


@dataclass(frozen=True)
class CopyStats:
    virtual_size: int
    file_size: int
    seconds: float

    @property
    def throughput(self) -> float:
        """Guest bytes per second."""
        return self.virtual_size / self.seconds if self.seconds > 0 else 0.0


def copy_image(source: str, source_format: str, target: Path, *, out_format: str = "qcow2",
               compress: bool = False, progress: Progress | None = None) -> CopyStats:
    """Copy the guest-visible content of ``source`` to a new image ``target``.

    The copy is on disk (fsynced, with its directory entry) when this
    returns: the engine itself writes without flushing.
    ``progress(done, total)`` may raise (Interrupted) to stop the copy; the
    partial target is then removed and the exception propagates.
    """
    api = _api()
    started = time.monotonic()
    try:
        api.convert([source], str(target), src_fmt=source_format, out_fmt=out_format,
                    compress=compress, progress=progress)
    except HostClientError:
        target.unlink(missing_ok=True)
        raise
    except _image_errors() as exc:
        target.unlink(missing_ok=True)
        raise _wrap(f"copying {source}", exc) from None
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    try:
        sync_file(target)
    except HostClientError:
        target.unlink(missing_ok=True)
        raise
    seconds = time.monotonic() - started
    return CopyStats(virtual_size(str(target), out_format), target.stat().st_size, seconds)


def verify_copy(source: str, source_format: str, copy: Path) -> None:
    """The copy has the source's content (engine compare) and is a sound qcow2
    (engine check). VerifyError otherwise."""
    api = _api()
    try:
        # formats named, never probed: a raw guest disk may look like anything
        result = api.compare(source, str(copy), fmt_a=source_format, fmt_b="qcow2")
    except _image_errors() as exc:
        raise _wrap(f"comparing {copy} with {source}", exc) from None
    if not _identical(result):
        where = getattr(result, "mismatch_offset", None)
        raise VerifyError(f"{copy} differs from {source}"
                          + (f" at offset {where}" if where is not None else ""))
    check_image(copy)


def check_image(path: Path, fmt: str = "qcow2") -> None:
    try:
        result = _api().check(str(path), fmt=fmt)
    except _image_errors() as exc:
        raise _wrap(f"checking {path}", exc) from None
    problems = _check_problems(result)
    if problems:
        raise VerifyError(f"{path} fails its qcow2 check: {problems}")


def _identical(result: Any) -> bool:
    if isinstance(result, bool):
        return result
    if hasattr(result, "identical"):
        return bool(result.identical)
    if isinstance(result, dict) and "identical" in result:
        return bool(result["identical"])
    return getattr(result, "exit_code", 1) == 0


def _check_problems(result: Any) -> str:
    get = (result.get if isinstance(result, dict)
           else lambda k, d=None: getattr(result, k.replace("-", "_"), d))
    found = []
    for key in ("corruptions", "check-errors", "leaks"):
        value = get(key, 0) or 0
        if isinstance(value, (list, tuple)):
            value = len(value)
        if value:
            found.append(f"{value} {key.replace('-', ' ')}")
    return ", ".join(found)


def virtual_size(path: str, fmt: str | None = None) -> int:
    from imagetools.image import open_image
    try:
        with open_image(path, fmt) as drv:
            return drv.size
    except _image_errors() as exc:
        raise _wrap(f"opening {path}", exc) from None


# ------------------------------------------------------------ formats


@dataclass(frozen=True)
class ChainLevel:
    """One image of a backing chain, as the engine opens it."""

    filename: str                 # as the engine opens it (backing names resolved)
    format: str
    guessed: bool                 # format probed from the content, not stated
    virtual_size: int
    backing: str | None = None    # backing file name recorded in it
    backing_format: str | None = None
    data_file: str | None = None  # qcow2 external data file recorded in it


@dataclass(frozen=True)
class Chain:
    """An image and its backing files, top first, and whether it is safe to read.

    ``refused`` says why the engine must not read it: a format guessed from
    the content (which a guest can write: a raw disk may hold anything)
    that would make the engine open other host files. The chain is not
    followed past that level.
    """

    levels: tuple[ChainLevel, ...]
    refused: str | None = None

    @property
    def top(self) -> ChainLevel:
        return self.levels[0]

    def warnings(self) -> list[str]:
        """One line per level whose format other than raw was only guessed."""
        found = []
        for above, lv in zip((None, *self.levels), self.levels):
            if not lv.guessed or lv.format == "raw":
                continue
            if above is None:
                found.append(f"{lv.filename}: format {lv.format} guessed from its content "
                             f"(pass --format {lv.format} to state it)")
            else:
                found.append(f"{lv.filename}: format {lv.format} of this backing file guessed "
                             f"from its content (record it: qemu-img rebase -u -F {lv.format} "
                             f"-b {above.backing} {above.filename})")
        return found


#: formats whose guessed (probed) headers are followed at all: raw has no
#: references to other files; qcow2 ones are checked below. Others (vmdk
#: descriptors name extent files, ...) need their format stated.
GUESSABLE = ("raw", "qcow2")
MAX_CHAIN = 64


def openable_formats() -> list[str]:
    from imagetools.formats import drivers
    return sorted(name for name, drv in drivers().items() if getattr(drv, "can_open", True))


def image_chain(path: str, fmt: str | None = None, *, follow_guesses: bool = False) -> Chain:
    """Open ``path`` (format ``fmt``, or probed when None) and its backing
    files one level at a time, without reading guest data.

    A level whose format is guessed may not lead anywhere else: guessed
    formats other than raw and qcow2, and a guessed qcow2 with a backing or
    data file, stop the walk with ``refused`` set, unless ``follow_guesses``
    (a running VM, where QEMU's own view of the chain is the judge).
    """
    from imagetools.image import open_image, read_probe_header, resolve_backing_path
    levels: list[ChainLevel] = []
    name, level_fmt = path, fmt
    try:
        while True:
            guessed = level_fmt is None
            if guessed:
                level_fmt = read_probe_header(name)[0]
                if level_fmt not in GUESSABLE and not follow_guesses:
                    return Chain((*levels, ChainLevel(name, level_fmt, True, 0)), _refusal(
                        name, level_fmt, "its format was guessed from its content", levels))
            with open_image(name, level_fmt, open_backing=False, force_share=True) as drv:
                level = ChainLevel(name, drv.format_name, guessed, drv.size,
                                   drv.backing_filename or None, drv.backing_format or None,
                                   drv.data_filename or None)
            levels.append(level)
            if guessed and (level.backing or level.data_file) and not follow_guesses:
                what = (f"its content names the backing file {level.backing!r}" if level.backing
                        else f"its content names the data file {level.data_file!r}")
                return Chain(tuple(levels), _refusal(name, level.format, what, levels[:-1]))
            if not level.backing:
                return Chain(tuple(levels))
            if len(levels) >= MAX_CHAIN:
                raise EngineError(f"{path}: backing chain deeper than {MAX_CHAIN} images")
            name = resolve_backing_path(name, level.backing)
            level_fmt = level.backing_format
    except HostClientError:
        raise
    except _image_errors() as exc:
        raise _wrap(f"opening {name}", exc) from None


def _refusal(name: str, fmt: str, what: str, above: list[ChainLevel]) -> str:
    if not above:
        return (f"{name} looks like a {fmt} image, but {what}, and a guest can write anything "
                f"into a raw disk; quiesce does not follow that: if it really is {fmt}, say so "
                f"with --format {fmt} (or --format raw to copy it as raw)")
    return (f"{name}, the backing file of {above[-1].filename}, has no format recorded and "
            f"looks like {fmt}, but {what}; quiesce does not follow a chain guessed from "
            f"content: record its format with `qemu-img rebase -u -F {fmt} "
            f"-b {above[-1].backing} {above[-1].filename}`")


def content_sha256(path: str, fmt: str, check: Callable[[], None] | None = None) -> str:
    """sha256 of the guest-visible content (all virtual-size bytes).

    Zero runs are hashed from a shared zero buffer without reading them.
    ``check`` runs between chunks and may raise to stop.
    """
    from imagetools.image import open_image
    digest = hashlib.sha256()
    try:
        with open_image(path, fmt) as drv:
            for extent in drv.block_status(0, drv.size):
                offset, end = extent.start, extent.end
                while offset < end:
                    if check:
                        check()
                    n = min(CHUNK, end - offset)
                    digest.update(_ZEROS[:n] if extent.zero else drv.read(offset, n))
                    offset += n
    except _image_errors() as exc:
        raise _wrap(f"reading {path}", exc) from None
    return digest.hexdigest()


def held_by_qemu(path: str) -> bool:
    """True if some process holds QEMU's image locks on ``path``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise EngineError(f"cannot open {path}: {exc.strerror}") from None
    try:
        query = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 100, 200, 0)
        try:
            answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, query)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP):
                return False          # no OFD locks on this filesystem: QEMU can't lock either
            raise EngineError(f"cannot query locks on {path}: {exc.strerror}") from None
        return _FLOCK.unpack(answer)[0] != fcntl.F_UNLCK
    finally:
        os.close(fd)
