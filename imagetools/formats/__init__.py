"""Format drivers and their registry.

Each format lives in its own module or package under ``imagetools.formats``
and exposes ``DRIVER``, a :class:`~imagetools.formats.base.Driver` subclass
with ``format_name`` and the class method ``probe(header: bytes, filename:
str) -> int`` (0: not this format; higher: more certain, as QEMU's probe
scores). :func:`drivers` discovers them all, so adding a format never means
editing a shared list.
"""

from __future__ import annotations

import importlib
import pkgutil

from imagetools.formats.base import Driver, Extent

__all__ = ["Driver", "Extent", "drivers"]

_DRIVERS: dict[str, type[Driver]] | None = None


def drivers() -> dict[str, type[Driver]]:
    """Every format driver by its name (``"raw"``, ``"qcow2"``, ...)."""
    global _DRIVERS
    if _DRIVERS is None:
        found: dict[str, type[Driver]] = {}
        for info in pkgutil.iter_modules(__path__):
            if info.name == "base":
                continue
            module = importlib.import_module(f"{__name__}.{info.name}")
            driver = getattr(module, "DRIVER", None)
            if driver is not None:
                found[driver.format_name] = driver
        _DRIVERS = found
    return _DRIVERS
