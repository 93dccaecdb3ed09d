"""Reading experiment configs: where the files live, how YAML values are read and checked, and
``--set`` overrides.

    experiments/line_fit_15pts.yaml    # found by name, or given as a path

A file is read into a plain mapping and overrides are merged into it; :mod:`pipeline.config`
builds the checked :class:`~pipeline.config.Experiment` from that mapping, out of parts that
share :class:`Schema`: frozen, no unknown keys, and a value that does not fit is a
:class:`ConfigError` with one line naming its key, never pydantic's report of every field.
"""

from __future__ import annotations

import functools
import math
import os
import re
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Strict,
    ValidationError,
)

from pipeline.errors import UserError, first_line

if typing.TYPE_CHECKING:
    from typing_extensions import Self

EXPERIMENTS_ENV = "PIPELINE_EXPERIMENTS_DIR"


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


# --- files and overrides ------------------------------------------------------------------------


def experiments_dir() -> Path:
    """Where experiment configs live: $PIPELINE_EXPERIMENTS_DIR, ./experiments, or the repo's."""
    if env := os.environ.get(EXPERIMENTS_ENV):
        return Path(env)
    local = Path("experiments")
    if local.is_dir():
        return local
    return Path(__file__).resolve().parent.parent / "experiments"


def available() -> dict[str, Path]:
    folder = experiments_dir()
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}


def read_raw(name_or_path: str) -> tuple[str, dict[str, Any]]:
    """The experiment's name (the file's stem) and the mapping its YAML file holds."""
    import yaml

    path = Path(name_or_path)
    known = available()
    if name_or_path in known and not path.suffix:
        path = known[name_or_path]
    elif path.suffix not in (".yaml", ".yml") and os.sep not in name_or_path:
        names = ", ".join(known) or "none found"
        raise ConfigError(f"unknown experiment {name_or_path!r} (known: {names})")
    elif not path.exists():
        raise ConfigError(f"no such experiment file {path.absolute()}")
    elif not path.is_file():
        raise ConfigError(f"{path.absolute()} is not a file")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_unique_key_loader())
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror or first_line(err)})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({first_line(err)})") from None
    except RecursionError:
        raise ConfigError(f"{path}: a value is nested too deeply to be a config") from None
    if raw is None:  # an empty file: building it then names the first missing key
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: the file must hold a mapping of keys to values, got {kind_of(raw)}"
        )
    data = raw.get("data")
    if isinstance(data, dict) and isinstance(data.get("csv"), str):
        # A CSV named in a config file lives beside it, wherever the command runs from
        # (one given with --set data.csv=... is taken from the current folder).
        data["csv"] = str((path.parent / Path(data["csv"]).expanduser()).absolute())
    return path.stem, raw


@functools.cache
def _unique_key_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        """YAML's safe loader, refusing a key written twice in one mapping (which YAML would
        otherwise settle silently, the last one winning)."""

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base`: its keys may be set again here, as YAML allows
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} appears twice", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return Loader


NEXT_ASSIGNMENT = re.compile(r"\s+(?=[^\s=\[\]{},]+=)")  # a space, then key=


def parse_overrides(assignments: typing.Iterable[str]) -> list[tuple[str, Any]]:
    """``["lr=0.05", "data.noise=0.2 epochs=3"]`` -> ``[("lr", 0.05), ...]``.

    Each item may hold several space-separated assignments (MLproject passes one string); an
    item splits only where a space comes before the next ``key=``, so values such as
    ``sweep.epochs=[5, 50]`` keep their spaces.
    """
    import yaml

    parsed = []
    for item in assignments:
        if not item.strip():
            continue
        for assignment in NEXT_ASSIGNMENT.split(item.strip()):
            key, sep, text = assignment.partition("=")
            if not sep or not key:
                raise ConfigError(f"override {assignment!r} must look like key=value")
            try:
                value = yaml.safe_load(text) if text else ""
            except yaml.YAMLError:
                value = text
            except RecursionError:
                raise ConfigError(f"override {key}: the value is nested too deeply") from None
            parsed.append((key, value))
    return parsed


def apply_overrides(raw: dict[str, Any], overrides: list[tuple[str, Any]]) -> dict[str, Any]:
    """A copy of ``raw`` with each ``(key, value)`` set; ``data.x`` and ``sweep.x`` reach in."""
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for key, value in overrides:
        section, _, leaf = key.rpartition(".")
        if section:
            if section not in ("data", "sweep"):
                raise ConfigError(f"unknown key {key} (sections: data., sweep.)")
            if merged.get(section) is None:
                merged[section] = {}
            if not isinstance(merged[section], dict):
                raise ConfigError(
                    f"{section}: expected a mapping, got {kind_of(merged[section])}, "
                    f"so {key} cannot be set"
                )
            merged[section][leaf] = value
        else:
            merged[key] = value
    return merged


def kind_of(value: Any) -> str:
    """What a parsed YAML value is, in words: ``[1, 2]`` -> ``a list``."""
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    if value is None:
        return "null"
    names = {int: "an integer", float: "a number", str: "a string", bool: "true/false"}
    return names.get(type(value), f"a {type(value).__name__}")  # a date, read from 2024-01-01
