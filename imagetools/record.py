"""Small mutable value classes without :mod:`dataclasses`.

``dataclasses`` imports inspect, ast, dis, tokenize and re: several
milliseconds of start-up that ``qimg convert`` and ``qimg compare`` would
pay on every run. :class:`Record` gives the part of ``@dataclass`` those
values use: a constructor taking the annotated fields positionally or by
keyword (class-level values are the defaults; a list default is copied per
instance), ``repr`` and ``==``.

    class Stats(Record):
        copied: int = 0
        names: list[str] = []
"""

from __future__ import annotations


class Record:
    """Base of a value class: its annotated class attributes are the fields."""

    __slots__ = ()
    _fields: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        inherited = tuple(f for base in cls.__mro__[1:] for f in getattr(base, "_fields", ()))
        own = tuple(name for name in cls.__dict__.get("__annotations__", {})
                    if name not in inherited and not name.startswith("_"))
        cls._fields = inherited + own

    def __init__(self, *args, **kwargs) -> None:
        fields = self._fields
        if len(args) > len(fields):
            raise TypeError(f"{type(self).__name__}() takes at most {len(fields)} "
                            f"positional arguments ({len(args)} given)")
        values = dict(zip(fields, args))
        for name, value in kwargs.items():
            if name not in fields:
                raise TypeError(f"{type(self).__name__}() got an unexpected keyword "
                                f"argument '{name}'")
            if name in values:
                raise TypeError(f"{type(self).__name__}() got multiple values for "
                                f"argument '{name}'")
            values[name] = value
        cls = type(self)
        for name in fields:
            if name in values:
                value = values[name]
            else:
                try:
                    value = getattr(cls, name)
                except AttributeError:
                    raise TypeError(f"{cls.__name__}() missing required argument "
                                    f"'{name}'") from None
                if isinstance(value, (list, dict, set)):
                    value = type(value)(value)
            setattr(self, name, value)

    def _values(self) -> tuple:
        return tuple(getattr(self, name) for name in self._fields)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._values() == other._values()

    __hash__ = None  # mutable, like a dataclass without frozen=True

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
        return f"{type(self).__name__}({inner})"
