"""Format drivers, their registry and format probing.

Each format lives in its own module or package under ``imagetools.formats``
and exposes ``DRIVER``, a :class:`~imagetools.formats.base.Driver` subclass
with ``format_name`` and the class method ``probe(header: bytes, filename:
str) -> int`` (0: not this format; higher: more certain, as QEMU's probe
scores). :func:`drivers` discovers them all, so adding a format never means
editing a shared list.

Formats QEMU 7.2 recognises but qimg cannot open yet (qcow, qed, vdi, vmdk,
vpc, vhdx, parallels, bochs, cloop, dmg, luks) live in :mod:`.foreign` as
probe-only drivers (``can_open = False``); a module may expose several such
drivers as ``DRIVERS`` (a tuple) instead of one ``DRIVER``.

Start-up cost matters (``qimg info`` must start nearly as fast as Python), so
:func:`driver` and :func:`probe` import only what they need: probing uses the
light :mod:`.magic` table and imports just the winning format's module.

API:

``driver(name) -> type[Driver]``  the driver for ``-f NAME``; raises
    ImageError ``Unknown driver 'NAME'`` for names QEMU does not know either
``probe(header, filename) -> str``  the format name qemu-img 7.2 would
    guess for a file starting with ``header`` ("raw" when nothing matches)
``drivers() -> dict``  every driver by name (imports every format module)
``PROBE_SIZE``  how many leading bytes probing looks at (QEMU: 2048)
"""

from __future__ import annotations

import sys

from imagetools.formats.base import Driver, Extent

__all__ = ["Driver", "Extent", "drivers", "driver", "probe", "PROBE_SIZE"]

#: bytes read for probing; shorter files are padded with zeros as QEMU does
PROBE_SIZE = 2048

_DRIVERS: dict[str, type[Driver]] | None = None

#: format name -> module holding its driver (without importing everything)
_MODULE_OF = {name: name for name in ("raw", "qcow2", "qcow", "qed", "vdi", "vpc", "vhdx",
                                      "vmdk", "parallels", "bochs", "cloop", "dmg")}


def drivers() -> dict[str, type[Driver]]:
    """Every format driver by its name (``"raw"``, ``"qcow2"``, ...)."""
    global _DRIVERS
    if _DRIVERS is None:
        import pkgutil
        found: dict[str, type[Driver]] = {}
        for info in pkgutil.iter_modules(__path__):
            if info.name in ("base", "magic"):
                continue
            module = _import(info.name)
            one = getattr(module, "DRIVER", None)
            many = getattr(module, "DRIVERS", ())
            for drv in ((one,) if one is not None else ()) + tuple(many):
                found[drv.format_name] = drv
        _DRIVERS = found
    return _DRIVERS


def driver(name: str) -> type[Driver]:
    """The driver class for format ``name`` (-f / -O), importing only its module."""
    from imagetools.errors import ImageError

    module_name = _MODULE_OF.get(name)
    if module_name is None:
        from imagetools.formats.magic import FOREIGN_FORMATS
        module_name = "foreign" if name in FOREIGN_FORMATS else None
    if module_name is not None:
        module = _import(module_name)
        one = getattr(module, "DRIVER", None)
        if one is not None and one.format_name == name:
            return one
        for drv in getattr(module, "DRIVERS", ()):
            if drv.format_name == name:
                return drv
    found = drivers().get(name)
    if found is None:
        raise ImageError(f"Unknown driver '{name}'")
    return found


def _import(name: str):
    """``imagetools.formats.<name>`` (plain __import__: importlib's own
    import costs start-up time that ``qimg info`` should not pay)."""
    full = f"{__name__}.{name}"
    __import__(full)
    return sys.modules[full]


def probe(header: bytes, filename: str) -> str:
    """The format qemu-img 7.2 would detect; "raw" when nothing claims the file."""
    from imagetools.formats.magic import probe_format
    return probe_format(header, filename)
