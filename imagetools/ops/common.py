"""What every command shares: opening images the way qemu-img's img_open
does (with its messages), ``--output``, cache modes, ``--image-opts``.

The format drivers (imagetools.formats, imagetools.image) raise engine
errors with the driver's own text; qemu-img prefixes ``Could not open
'FILE': `` when an image cannot be opened, and so does :func:`open_image`.
"""

from __future__ import annotations

TYPE_CHECKING = False

from imagetools.errors import ImageError
from imagetools.output import Reported

if TYPE_CHECKING:
    from imagetools.formats.base import Driver

CACHE_MODES = ("none", "writeback", "writethrough", "directsync", "unsafe", "off")

#: format names QEMU knows, so that "not supported by qimg" and "unknown"
#: can be told apart
QEMU_FORMATS = ("bochs", "cloop", "dmg", "luks", "parallels", "qcow", "qcow2", "qed",
                "raw", "vdi", "vhdx", "vmdk", "vpc", "vvfat")


def format_names() -> list[str]:
    from imagetools.formats import drivers
    return sorted(drivers())


def known_format(fmt: str) -> bool:
    return fmt in QEMU_FORMATS or fmt in format_names()


def output_format(value: str | None) -> str:
    """``--output``: 'human' (default) or 'json'."""
    if value is None or value == "human":
        return "human"
    if value == "json":
        return "json"
    raise Reported("--output must be used with human or json as argument.")


def check_cache(mode: str, source: bool = False) -> str:
    if mode not in CACHE_MODES:
        kind = "source cache" if source else "cache"
        raise Reported(f"Invalid {kind} option: {mode}")
    return mode


def parse_image_opts(text: str, fmt: str | None) -> tuple[str, str | None]:
    """``--image-opts driver=FMT,file.filename=PATH`` -> (path, format)."""
    from imagetools.ops.options import split_options
    if fmt is not None:
        raise Reported("--image-opts and --format are mutually exclusive")
    opts = {name: value for name, value, _ in split_options(text)}
    filename = opts.pop("file.filename", None) or opts.pop("filename", None) or opts.pop("file", None)
    driver = opts.pop("driver", None)
    opts.pop("file.driver", None)
    opts.pop("force-share", None)
    if filename is None:
        raise Reported(f"Could not open '{text}': Cannot find device='{text}' nor node-name='{text}'")
    return filename, driver


def open_image(filename: str, fmt: str | None = None, *, read_only: bool = True,
               force_share: bool = False, image_opts: bool = False,
               open_backing: bool = True, exit_code: int = 1,
               cache: str | None = None, unchanged: bool = False,
               check: bool = False) -> "Driver":
    """Open an image (and its backing chain) as qemu-img's img_open would.

    ``cache`` is a qemu-img cache mode (-t/-T); "unsafe" never syncs.
    ``check``: open as qemu-img check does (QEMU's BDRV_O_CHECK).
    ``unchanged``: nobody may write to the image or its backing files while
    it is open (qemu-img convert's sources), unless ``force_share`` (-U).
    """
    display = filename
    if image_opts:
        filename, fmt = parse_image_opts(filename, fmt)
    from imagetools import image
    try:
        extra = {} if cache is None else {"cache": "none" if cache == "off" else cache}
        drv = image.open_image(filename, fmt, read_only=read_only, force_share=force_share,
                               open_backing=open_backing, check=check, **extra)
        if unchanged and not force_share:
            try:
                image.refuse_writers(drv)
            except BaseException:
                drv.close()
                raise
        return drv
    except ImageError as err:
        raise open_error(display, err, exit_code) from None
    except OSError as err:
        raise Reported(f"Could not open '{display}': Could not open '{filename}': "
                       f"{err.strerror}", exit_code=exit_code) from None


def open_error(filename: str, err: ImageError, exit_code: int = 1) -> Reported:
    """The ``Could not open 'F': ...`` report for a failed open.

    The drivers' ImageOpenError already reads that way; other engine errors
    raised while opening (unknown driver, lock conflict) get the prefix.
    """
    from imagetools.errors import ImageOpenError
    text = str(err) if isinstance(err, ImageOpenError) else f"Could not open '{filename}': {err}"
    return Reported(text, exit_code=exit_code)


def creation_error(filename: str, err: Exception) -> str:
    """The message for a failed image creation.

    A file that cannot be created is ``Could not create 'F': <reason>`` in
    qemu-img, whatever way the failure reached us.
    """
    from imagetools.errors import ImageOpenError
    if isinstance(err, OSError):
        return f"Could not create '{filename}': {err.strerror or err}"
    if isinstance(err, ImageOpenError):
        reason = err.reason.rsplit(": ", 1)[-1]
        return f"Could not create '{filename}': {reason}"
    return str(err)


def l2_span(drv) -> int:
    """Guest bytes one qcow2 L2 table maps, 0 for other formats.

    QEMU's qcow2 block status never answers past the end of one L2 table,
    so qemu-img's chunks (and compare's status checks) break there too.
    """
    if drv.format_name != "qcow2" or not drv.cluster_size:
        return 0
    specific = (drv.format_specific() or {}).get("data", {})
    entry = 16 if specific.get("extended-l2") else 8
    return drv.cluster_size * (drv.cluster_size // entry)


def status_runs(drv, start: int = 0):
    """The image's block status from ``start`` as qemu-img sees it.

    Adjacent equal runs are merged, but, as QEMU's qcow2 block status
    answers, a run never crosses an L2 table boundary and compressed
    clusters come one cluster at a time.
    """
    from imagetools.formats.base import merge_extents
    span = l2_span(drv)
    cluster = drv.cluster_size or 0
    for ext in merge_extents(drv.block_status(start, drv.size - start)):
        step = cluster if ext.compressed and cluster else span
        end = ext.start + ext.length
        if not step or (ext.start // step == (end - 1) // step and not ext.compressed):
            yield ext
            continue
        pos = ext.start
        while pos < end:
            cut = min(end, (pos // step + 1) * step)
            if span:
                cut = min(cut, (pos // span + 1) * span)
            yield ext.clipped(pos, cut) if (pos, cut) != (ext.start, end) else ext
            pos = cut


def refuse_source_as_target(target: str, sources, prefix: str) -> None:
    """Refuse to write into a file that is also being read (a source image or
    one of its backing files): creating it would truncate the data first.

    qemu-img refuses this through its image locks; the report is the same.
    """
    import os
    try:
        st = os.stat(target)
    except OSError:
        return
    mine = (st.st_dev, st.st_ino)
    for src in sources:
        for node in src.chain():
            try:
                other = os.stat(node.filename)
            except OSError:
                continue
            if (other.st_dev, other.st_ino) == mine:
                raise Reported(f'{prefix}Failed to get "write" lock\n'
                               f"Is another process using the image [{target}]?")
