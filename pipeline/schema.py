"""The values an experiment config holds, as YAML writes them, and the one-line errors.

Every part of a config (:mod:`pipeline.config`, :mod:`pipeline.recipes`) is a :class:`Schema`:
frozen, no unknown keys, and a value that does not fit is a :class:`ConfigError` with one line
naming its key, never pydantic's report of every field. ``Number``, ``Integer`` and ``Flag``
take what YAML 1.1 leaves as text (``1e-5``, ``"true"``); :func:`must` adds a check in words.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable
from typing import Annotated, Any, ClassVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Strict,
    ValidationError,
)

from pipeline.errors import UserError

if typing.TYPE_CHECKING:
    from typing_extensions import Self


class ConfigError(UserError):
    """A config file or override that does not fit the schema."""


# --- values as YAML writes them -----------------------------------------------------------------


def _number(value: Any) -> Any:
    if isinstance(value, str):
        try:  # YAML 1.1 reads 1e-5 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    return value


def _integer(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    number = _number(value)  # 2.0, or 1e3, which YAML 1.1 also leaves as a string
    return int(number) if isinstance(number, float) and number.is_integer() else value


def _flag(value: Any) -> Any:
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


# Strict, so that true is no number and 2.5 no integer; the validators above take what YAML
# writes loosely.
Number = Annotated[float, Strict(), BeforeValidator(_number)]
Integer = Annotated[int, Strict(), BeforeValidator(_integer)]
Flag = Annotated[bool, Strict(), BeforeValidator(_flag)]


def must(test: Callable[[Any], bool], phrase: str) -> AfterValidator:
    """A check on a value, reported as ``<key> <phrase>, got <value>`` when it fails."""

    def check(value: Any) -> Any:
        if not test(value):
            raise ValueError(f"{phrase}, got {_shown(value)}" if isinstance(value, str) else
                             f"{phrase}, got {value}")
        return value

    return AfterValidator(check)


Count = Annotated[Integer, must(lambda n: n >= 1, "must be >= 1")]
# Each epoch is a point of a run's loss curves, held in memory and logged to MLflow: a million
# takes minutes to log; a hundred million would not fit in memory.
EPOCHS_MAX = 1_000_000
Epochs = Annotated[Count, must(lambda n: n <= EPOCHS_MAX,
                               f"must be at most {EPOCHS_MAX:,} (one loss-curve point each)")]
Finite = Annotated[Number, must(math.isfinite, "must be finite")]
NonNegative = Annotated[Number, must(lambda x: math.isfinite(x) and x >= 0,
                                     "must be a finite number >= 0")]
Seed = Annotated[Integer, must(lambda n: 0 <= n < 2**32,  # numpy's and Optuna's generators
                               "must lie in [0, 2**32)")]


class Schema(BaseModel):
    """A part of a config: frozen, no unknown keys, checked when built."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    prefix: ClassVar[str] = ""  # how messages name this part's keys: "data.", "sweep."
    keys_beside: ClassVar[tuple[str, ...]] = ()  # other keys at this level of a file

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as err:
            raise ConfigError(_one_line(err, type(self))) from None

    @classmethod
    def key(cls, field: str) -> str:
        return cls.prefix + field

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes``, checked again (pydantic's ``model_copy`` checks nothing)."""
        return type(self)(**{**dict(self), **changes})


EXPECTED = {"int": "an integer", "float": "a number", "bool": "true or false",
            "string": "a string", "tuple": "a list", "none": "null"}


def _one_line(err: ValidationError, part: type[Schema]) -> str:
    """pydantic's complaints as the one line a user needs, naming the key: an unknown key first,
    then a missing one, then the first value that does not fit (``data.noise must be a number,
    got 'loud'``)."""
    errors = err.errors()
    if unknown := sorted(str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden"):
        known = sorted(set(part.model_fields) | set(part.keys_beside))
        return f"unknown key {part.key(unknown[0])} (known keys: {', '.join(known)})"
    if missing := [str(e["loc"][0]) for e in errors if e["type"] == "missing"]:
        return f"missing key {part.key(missing[0])}"
    first = errors[0]
    if not first["loc"]:  # a check across fields (a ValueError), which names its keys itself
        return str(first["ctx"]["error"])
    field, value = str(first["loc"][0]), first["input"]
    key = part.key(field) + "".join(f"[{i}]" for i in first["loc"][1:] if isinstance(i, int))
    if first["type"] == "value_error":  # a check on the field, which says what it must be
        return f"{key} {first['ctx']['error']}"
    annotation = part.model_fields[field].annotation
    if first["type"] == "literal_error":
        return (f"{key} must be one of {', '.join(typing.get_args(annotation))}, "
                f"got {_shown(value)}")
    # A type's name; each member of a union (a number or a name) says its own.
    types = [e["type"].split("_")[0] for e in errors if e["loc"][0] == first["loc"][0]]
    if not all(name in EXPECTED for name in types):
        return f"{key}: {first['msg']}"
    expected = " or ".join(dict.fromkeys(EXPECTED[name] for name in types))
    if type(None) in typing.get_args(annotation) and len(first["loc"]) == 1:
        expected += " or null"
    return f"{key} must be {expected}, got {_shown(value)}"


def _shown(value: Any, limit: int = 80) -> str:
    """A value as an error quotes it, cut short: a line, not a page."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
