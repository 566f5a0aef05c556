"""Type and range checks of config fields, read off the dataclasses' annotations.

A field's annotation says what it accepts: ``int``, ``float``, ``bool``, ``str``, a ``Literal``
of choices, ``X | None`` for an optional value, ``tuple[...]`` of those (``tuple[X, ...]``: any length), a nested config
dataclass, or any of them wrapped in ``Annotated[..., Range(...)]`` for bounds. ``coerce``
checks one value (an ``int`` is accepted for a ``float`` field and converted; a ``bool`` is
never a number; floats must be finite); ``check_fields`` walks a whole config. Every failure is
a one-line ``ValueError`` naming the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal


@dataclass(frozen=True)
class Range:
    """Bounds of a number: any of ``ge`` (>=), ``gt`` (>), ``le`` (<=), ``lt`` (<)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def holds(self, v: float) -> bool:
        return ((self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt))

    def describe(self) -> str:
        low = f">= {self.ge:g}" if self.ge is not None else f"> {self.gt:g}" if self.gt is not None else None
        high = f"<= {self.le:g}" if self.le is not None else f"< {self.lt:g}" if self.lt is not None else None
        if low and high:
            left = "[" if self.ge is not None else "("
            right = "]" if self.le is not None else ")"
            return f"in {left}{self.ge if self.ge is not None else self.gt:g}, " \
                   f"{self.le if self.le is not None else self.lt:g}{right}"
        return low or high or ""


PosInt = Annotated[int, Range(ge=1)]
NonNegInt = Annotated[int, Range(ge=0)]
Seed = Annotated[int, Range(ge=0, lt=2**31)]
PosFloat = Annotated[float, Range(gt=0)]
NonNegFloat = Annotated[float, Range(ge=0)]
Fraction = Annotated[float, Range(gt=0, lt=1)]


def _describe(hint: Any) -> str:
    """What a hint accepts, in words: 'an integer >= 1', "one of 'a', 'b'", ..."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        base, rng = args[0], next((a for a in args[1:] if isinstance(a, Range)), None)
        return _describe(base) + (f" {rng.describe()}" if rng else "")
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return " or ".join(_describe(a) for a in rest) + " (or unset)"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return "a list of values, each " + _describe(args[0])
        if len(set(args)) == 1:
            return f"a list of {len(args)} values, each " + _describe(args[0])
        return "a list of [" + ", ".join(_describe(a) for a in args) + "]"
    return {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint)))


class _Mismatch(Exception):
    pass


def _coerce(value: Any, hint: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        out = _coerce(value, args[0])
        for rng in (a for a in args[1:] if isinstance(a, Range)):
            if not rng.holds(out):
                raise _Mismatch
        return out
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, a)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        raise _Mismatch
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis and isinstance(value, (list, tuple)):  # any length
            return tuple(_coerce(v, args[0]) for v in value)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise _Mismatch
        return tuple(_coerce(v, a) for v, a in zip(value, args))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise _Mismatch
    if hint is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        raise _Mismatch
    return value  # an annotation this module does not know: accepted as is


def coerce(name: str, value: Any, hint: Any) -> Any:
    """``value`` checked against ``hint`` (ints become floats for float fields), or a
    ``ValueError`` saying ``name=value`` and what the field accepts."""
    try:
        return _coerce(value, hint)
    except _Mismatch:
        pass
    allowed = _describe(hint)
    extra = ""
    if isinstance(value, str):
        try:
            float(value)
            extra = " (write numbers without quotes)"
        except ValueError:
            pass
    elif isinstance(value, float) and "integer" in allowed and value.is_integer():
        extra = f" (write {int(value)}, without a decimal point or exponent)"
    shown = repr(value) if not isinstance(value, bool) else str(value).lower()
    raise ValueError(f"{name}={shown} is not allowed: it must be {allowed}{extra}")


@functools.lru_cache(maxsize=None)
def field_hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of a config dataclass, ``Annotated`` bounds included."""
    return typing.get_type_hints(cls, include_extras=True)


def check_fields(obj: Any, where: str = "") -> None:
    """Check (and normalise in place) every field of a config dataclass tree."""
    hints = field_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check_fields(value, f"{where}{f.name}.")
        else:
            setattr(obj, f.name, coerce(f"{where}{f.name}", value, hints[f.name]))
