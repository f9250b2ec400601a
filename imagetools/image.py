"""Opening and creating images: probing, backing chains, locks, warnings.

``open_image(filename, fmt=None, *, read_only=True, force_share=False,
open_backing=True, backing_fmt=None) -> Driver``
    Opens an image and its whole backing chain, as qemu-img does:

    * the format is ``fmt`` (-f) or probed by magic as qemu-img 7.2 probes
      (raw when nothing matches; an empty file is raw);
    * a read-write open of a *probed* raw image prints qemu-img's three-line
      ``WARNING: Image format was not specified ...`` through :func:`warn`
      and restricts writes to the first sector (see ``formats/raw.py``);
    * QEMU's image locks are taken on every file (``force_share`` is -U);
    * backing files open read-only; their format is the one recorded in the
      image (or ``backing_fmt`` for the top image's backing file when
      given), else probed (silently, as qemu-img 7.2 does at open time);
      relative names are resolved against the directory part of the
      overlay's name *as given* (:func:`resolve_backing_path`);
    * a missing or broken backing file, a loop (the same file twice in the
      chain) or a chain deeper than :data:`MAX_BACKING_DEPTH` is one
      :class:`~imagetools.errors.ImageOpenError`, worded as qemu-img words
      it: ``Could not open 'top': Could not open backing file: <reason>``.

    ``check=True`` is how ``qemu-img check`` opens (see the function);
    ``open_backing=False`` is what ``qemu-img info`` does (no chain);
    ``cache`` is qemu-img's -t mode (only "unsafe" changes anything: no
    fdatasync at all, as qemu-img convert's default).

``create_image(filename, fmt, size, options, *, unsafe=False, on_formatting=None)``
    Creates an image as ``qemu-img create`` does (checks, messages and their
    order included); ``on_formatting(size, options)`` is called at the moment
    qemu-img prints its ``Formatting ...`` line.

``resolve_backing_path(overlay, backing)``
    QEMU's rule for a relative backing file name (also what ``info`` shows
    as ``full-backing-filename``).

``read_probe_header(filename) -> (format, header)``
    The format qemu-img would probe for a file.

``warn(message)``
    Where the engine's warnings go (stderr by default; replace
    :data:`warning_handler` to capture them).
"""

from __future__ import annotations

import os
import sys
TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from typing import Any, Callable

from imagetools.errors import ImageError, ImageOpenError, UnsupportedError
from imagetools.formats import PROBE_SIZE, driver as driver_class, probe
from imagetools.formats.base import Driver

#: deepest backing chain we open (QEMU has no limit but runs out of files)
MAX_BACKING_DEPTH = 256

PROBED_RAW_WARNING = (
    "WARNING: Image format was not specified for '{}' and probing guessed raw.\n"
    "         Automatically detecting the format is dangerous for raw images, "
    "write operations on block 0 will be restricted.\n"
    "         Specify the 'raw' format explicitly to remove the restrictions."
)


def _stderr_warning(message: str) -> None:
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


#: called with each warning's full text (no trailing newline)
warning_handler: Callable[[str], None] = _stderr_warning


def warn(message: str) -> None:
    warning_handler(message)


# -- paths and probing ----------------------------------------------------

def path_has_protocol(name: str) -> bool:
    """``proto:rest`` where the colon comes before any slash (QEMU's rule)."""
    colon = name.find(":")
    if colon <= 0:
        return False
    slash = name.find("/")
    return slash < 0 or colon < slash


def resolve_backing_path(overlay: str, backing: str) -> str:
    """The file QEMU opens for backing name ``backing`` of image ``overlay``.

    Absolute names and protocol names stay as they are; a relative name is
    appended to the directory part of the overlay's name as given
    (``sub/top.qcow2`` + ``base.qcow2`` -> ``sub/base.qcow2``).
    """
    if not backing or backing.startswith("/") or path_has_protocol(backing):
        return backing
    slash = overlay.rfind("/")
    if slash < 0:
        return backing
    return overlay[:slash + 1] + backing


def _protocol_file(name: str) -> str:
    """Strip a ``file:`` protocol prefix; refuse other protocols."""
    if name.startswith("file:"):
        return name[5:]
    if path_has_protocol(name):
        raise ImageOpenError(name, f"Unknown protocol '{name.split(':', 1)[0]}'")
    return name


def read_probe_header(filename: str) -> tuple[str, bytes]:
    """(probed format, first 2 KiB zero padded) of a file, as qemu-img probes it."""
    from imagetools.formats.hostfile import HostFile

    file = HostFile.open(filename, read_only=True, lock=False)
    try:
        length = file.length()
        if length == 0 and not file.is_block:
            return "raw", b""
        header = file.pread_full(0, PROBE_SIZE)
    finally:
        file.close()
    return probe(header, filename), header


# -- opening ---------------------------------------------------------------

def _open_one(filename: str, fmt: str | None, *, read_only: bool,
              force_share: bool, check: bool = False) -> Driver:
    path = _protocol_file(filename)
    probed = fmt is None
    if fmt is None:
        fmt, _ = read_probe_header(path)
    try:
        cls = driver_class(fmt)
    except ImageError as err:
        raise ImageOpenError(filename, str(err)) from None
    extra = {"check_mode": True} if check and getattr(cls, "supports_check_mode", False) else {}
    drv = cls.open(path, read_only=read_only, force_share=force_share, probed=probed, **extra)
    drv.format_probed = probed
    if drv.filename != filename:
        drv.filename = filename
    return drv


def open_image(filename: str, fmt: str | None = None, *, read_only: bool = True,
               force_share: bool = False, open_backing: bool = True,
               backing_fmt: str | None = None, cache: str | None = None,
               check: bool = False) -> Driver:
    """Open ``filename`` and (unless ``open_backing`` is false) its backing chain.

    ``cache`` is qemu-img's -t mode for this image ("unsafe" skips fdatasync).
    ``check`` opens for ``qemu-img check`` (QEMU's BDRV_O_CHECK): damage that
    would refuse a normal open (no refcount table, a broken snapshot table)
    is left for the check to report, and a dirty image is not repaired.
    """
    top = _open_one(filename, fmt, read_only=read_only, force_share=force_share,
                    check=check)
    try:
        if cache is not None:
            top.set_cache_mode(cache)
        if top.format_probed and top.format_name == "raw" and not read_only:
            warn(PROBED_RAW_WARNING.format(filename))
        if open_backing:
            _open_chain(top, backing_fmt, force_share)
    except BaseException:
        top.close()
        raise
    return top


def refuse_writers(drv: Driver) -> None:
    """Let nobody write to or resize ``drv`` or its backing chain while they
    stay open (qemu-img convert's sources: what is copied cannot change).

    Raises ImageLockedError (``Failed to get shared "write" lock``, naming
    the file) when another open of one of the files writes to it.
    """
    from imagetools.errors import ImageLockedError
    from imagetools.locking import PERM_RESIZE, PERM_WRITE, unshare
    for node in drv.chain():
        for f in node.host_files():
            try:
                unshare(f.fd, f.filename, PERM_WRITE | PERM_RESIZE)
            except ImageLockedError as err:
                # qemu-img names the image it opened, then the file in use
                raise ImageLockedError(drv.filename, err.reason) from None


def reopen_backing_read_write(overlay: Driver, cache: str | None = None) -> Driver:
    """Reopen ``overlay.backing`` for writing and return it (qemu-img commit
    writes into a backing file of the image it opened).

    The backing file's own chain stays open as it is. Its read-only handle
    is closed first, because two handles of one process refuse each other's
    QEMU locks; if the read-write open fails, the chain below is closed too
    and the overlay is left without a backing file. (Added for the
    snapshot/commit issue.)
    """
    node = overlay.backing
    if node is None:
        raise ImageError("Image does not have a backing file")
    below = node.backing
    node.backing = None
    node.close()
    overlay.backing = None
    try:
        new = open_image(node.filename, node.format_name, read_only=False, open_backing=False,
                         cache=cache)
    except BaseException:
        if below is not None:
            below.close()
        raise
    new.backing = below
    overlay.backing = new
    return new


def _identity(drv: Driver) -> tuple[int, int] | None:
    file = getattr(drv, "file", None)
    return getattr(file, "dev_ino", None)


def _open_chain(top: Driver, backing_fmt: str | None, force_share: bool) -> None:
    """Open every backing file below ``top``, attaching each to its overlay."""
    seen = {_identity(top)}
    node = top
    depth = 0
    fmt_override = backing_fmt
    while node.backing_filename:
        depth += 1
        name = resolve_backing_path(node.filename, node.backing_filename)
        fmt = fmt_override or node.backing_format
        fmt_override = None
        if depth > MAX_BACKING_DEPTH:
            raise ImageOpenError(top.filename, f"Backing chain is deeper than "
                                 f"{MAX_BACKING_DEPTH} images (at '{name}')")
        try:
            backing = _open_one(name, fmt, read_only=True, force_share=force_share)
        except ImageOpenError as err:
            raise ImageOpenError(top.filename,
                                 "Could not open backing file: " * depth + err.reason) from None
        except ImageError as err:
            raise ImageOpenError(top.filename,
                                 "Could not open backing file: " * depth + str(err)) from None
        ident = _identity(backing)
        if ident is not None and ident in seen:
            backing.close()
            raise ImageOpenError(top.filename,
                                 f"Backing file '{name}' creates an infinite loop.")
        seen.add(ident)
        node.backing = backing
        node = backing


# -- creating --------------------------------------------------------------

def _backing_size(filename: str, backing: str, backing_fmt: str | None) -> int:
    """Open the would-be backing file to learn its size (create without a size)."""
    path = resolve_backing_path(filename, backing)
    try:
        drv = open_image(path, backing_fmt, read_only=True, force_share=True)
    except ImageOpenError as err:
        raise ImageError(f"{err.reason}\nCould not open backing image.") from None
    except ImageError as err:
        raise ImageError(f"{err}\nCould not open backing image.") from None
    try:
        return drv.size
    finally:
        drv.close()


def create_image(filename: str, fmt: str, size: int | None, options: dict[str, Any], *,
                 unsafe: bool = False,
                 on_formatting: Callable[[int, dict[str, Any]], None] | None = None) -> None:
    """Create an image as ``qemu-img create`` does.

    ``size`` None means "take it from the backing file". ``options`` are the
    ``-o`` options with ``-b``/``-F`` folded in as ``backing_file`` /
    ``backing_fmt`` (sizes as int, booleans as bool or "on"/"off", the rest
    as strings). ``unsafe`` is ``-u`` (do not open the backing file).
    Raises ImageError with qemu-img's message minus the ``FILENAME: ``
    prefix; a message of several lines keeps its newlines (7.2 prints the
    ``Detected format of X.`` line without a final newline).
    """
    try:
        cls = driver_class(fmt)
    except ImageError:
        raise ImageError(f"Unknown file format '{fmt}'") from None
    options = dict(options)
    backing = options.get("backing_file")
    backing_fmt = options.get("backing_fmt")
    if backing:
        if not cls.supports_backing:
            raise UnsupportedError(f"Backing file not supported for file format '{fmt}'")
        if _same_file(filename, resolve_backing_path(filename, backing)):
            raise ImageError("Error: Trying to create an image with the same filename as "
                             "the backing file")
        if not backing_fmt:
            message = "Backing file specified without backing format"
            if not unsafe:
                try:
                    detected, _ = read_probe_header(resolve_backing_path(filename, backing))
                    message += f"\nDetected format of {detected}."
                except ImageError:
                    pass
            raise ImageError(message)
        if not unsafe:
            backing_size = _backing_size(filename, backing, backing_fmt)
            if size is None:
                size = backing_size
    if size is None:
        raise ImageError("Image creation needs a size parameter")
    if on_formatting is not None:
        on_formatting(size, options)
    if backing_fmt and not backing:
        raise ImageError("Backing format cannot be used without backing file")
    cls.create(filename, size, options)


def _same_file(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)
