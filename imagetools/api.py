"""A small Python API over qimg's commands, for the backup client.

Each function does what the ``qimg`` command of the same name does, with
plain Python values in and out, and raises only
:class:`imagetools.errors.ImageError` (its message is the line qimg would
print). Nothing is printed.

``convert(sources, target, *, src_fmt=None, out_fmt="qcow2", compress=False,
options=None, progress=None) -> ConvertStats``
    Copy one or more images (concatenated) into a new image ``target``.
    ``options`` is a ``-o`` style string or a dict (``{"cluster_size":
    "64k"}``); ``progress(done_bytes, total_bytes)`` is called as data is
    copied (total is the bytes that hold data).

``compare(a, b, *, strict=False, fmt_a=None, fmt_b=None) -> CompareResult``
    ``result.identical``, ``result.mismatch_offset`` (sector-aligned, or
    None), ``result.size_mismatch``, ``result.exit_code`` (qemu-img's) and
    ``result.lines`` (the messages qemu-img would print).

``check(path, *, fmt=None) -> dict``
    qemu-img check's JSON members (``corruptions``, ``leaks``,
    ``check-errors``, ``image-end-offset``, ...; zero counters omitted) plus
    ``"messages"``: the per-cluster lines qemu-img prints on stderr.
    Formats without a check raise ImageError with ``exit_code`` 63.

``info(path, *, fmt=None, backing_chain=False) -> dict``
    qemu-img info's JSON object (or a list of them with ``backing_chain``).
"""

from __future__ import annotations

from typing import Any, Callable

from imagetools.errors import ImageError
from imagetools.ops.compare import CompareResult
from imagetools.ops.copy import ConvertStats

__all__ = ["convert", "compare", "check", "info", "ConvertStats", "CompareResult",
           "ImageError"]


def _option_string(options: str | dict[str, Any] | None) -> str | None:
    if options is None or isinstance(options, str):
        return options or None
    parts = []
    for name, value in options.items():
        if isinstance(value, bool):
            value = "on" if value else "off"
        parts.append(f"{name}={str(value).replace(',', ',,')}")
    return ",".join(parts) or None


def _guard(call: Callable[[], Any]) -> Any:
    """Run ``call`` so that only ImageError escapes."""
    try:
        return call()
    except ImageError:
        raise
    except OSError as err:
        raise ImageError(f"{err.filename or 'I/O'}: {err.strerror or err}") from err
    except (ValueError, TypeError, KeyError, IndexError) as err:
        raise ImageError(f"internal error: {type(err).__name__}: {err}") from err


def convert(sources: str | list[str], target: str, *, src_fmt: str | None = None,
            out_fmt: str = "qcow2", compress: bool = False,
            options: str | dict[str, Any] | None = None,
            progress: Callable[[int, int], None] | None = None,
            sparse_size: int = 4096, force_share: bool = False) -> ConvertStats:
    """Convert ``sources`` into a new image ``target`` (qemu-img convert)."""
    from imagetools.ops.copy import ConvertJob
    from imagetools.ops.copy import convert as run
    job = ConvertJob(sources=[sources] if isinstance(sources, str) else list(sources),
                     target=target, src_fmt=src_fmt, out_fmt=out_fmt, compress=compress,
                     options=_option_string(options), min_sparse=sparse_size // 512,
                     force_share=force_share)

    def byte_progress(done_sectors: int, total_sectors: int) -> None:
        if progress is not None:
            progress(done_sectors * 512, total_sectors * 512)

    return _guard(lambda: run(job, progress=byte_progress))


def compare(a: str, b: str, *, strict: bool = False, fmt_a: str | None = None,
            fmt_b: str | None = None, force_share: bool = False) -> CompareResult:
    """Compare the guest content of two images (qemu-img compare)."""
    from imagetools.ops.common import open_image
    from imagetools.ops.compare import compare_images

    def run() -> CompareResult:
        first = open_image(a, fmt_a, force_share=force_share, exit_code=2)
        try:
            second = open_image(b, fmt_b, force_share=force_share, exit_code=2)
            try:
                return compare_images(first, second, strict=strict, names=(a, b))
            finally:
                second.close()
        finally:
            first.close()

    return _guard(run)


def check(path: str, *, fmt: str | None = None, force_share: bool = False) -> dict[str, Any]:
    """Check an image for consistency (qemu-img check, detection only)."""
    from imagetools.ops.check import image_check
    from imagetools.ops.common import open_image

    def run() -> dict[str, Any]:
        drv = open_image(path, fmt, force_share=force_share)
        try:
            result = drv.check()
            report = image_check(result, path, drv.format_name)
            report["messages"] = [line.rstrip("\n") for line in
                                  (getattr(result, "messages", ()) or ())]
            return report
        finally:
            drv.close()

    return _guard(run)


def info(path: str, *, fmt: str | None = None, backing_chain: bool = False,
         force_share: bool = False) -> dict[str, Any] | list[dict[str, Any]]:
    """What ``qemu-img info --output=json`` reports, as Python values."""
    from imagetools.ops.info import collect

    def run():
        infos = collect(path, fmt, chain=backing_chain, force_share=force_share)
        return infos if backing_chain else infos[0]

    return _guard(run)
