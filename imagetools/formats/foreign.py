"""Formats QEMU 7.2 knows that qimg recognises but cannot open yet.

Each is a probe-only driver (``can_open = False``): probing names the format
correctly (so ``qimg info x.vdi`` does not mistake it for raw and nobody
writes into it as raw), and opening or creating it gives one clear error.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from typing import Any

from imagetools.errors import ImageOpenError, UnsupportedError
from imagetools.formats import magic
from imagetools.formats.base import Driver


class ForeignDriver(Driver):
    """A format qimg can name but not read or write."""

    can_open = False

    @classmethod
    def probe(cls, header: bytes, filename: str) -> int:
        return magic.score(cls.format_name, header, filename)

    @classmethod
    def open(cls, filename: str, *, read_only: bool = True, force_share: bool = False,
             probed: bool = False) -> Driver:
        raise ImageOpenError(filename, f"The '{cls.format_name}' image format is not "
                             "supported by qimg yet")

    @classmethod
    def create(cls, filename: str, size: int, options: dict[str, Any]) -> None:
        raise UnsupportedError(f"Creating '{cls.format_name}' images is not supported by "
                               "qimg yet")


def _make(name: str, backing: bool) -> type[ForeignDriver]:
    return type(f"{name.capitalize()}Driver", (ForeignDriver,),
                {"format_name": name, "supports_backing": backing,
                 "__doc__": f"Probe-only driver for {name} images."})


DRIVERS = tuple(_make(name, name in ("qcow", "qed", "vmdk"))
                for name in magic.FOREIGN_FORMATS)
