"""Experiment configs: one commented YAML file per experiment, loaded into frozen dataclasses.

A config file holds the training settings at its top level and the data recipe under ``data:``::

    description: One line shown by `pipeline experiments`.
    seed: 20
    model: manual
    lr: 1.0e-2
    epochs: 11
    data:
      source: table
      features: [[3.3], [4.4]]
      targets: [[1.7], [2.76]]

Values are checked once, here: unknown keys and values of the wrong type are rejected with a
message that names the key. ``--set key=value`` overrides use the same checks (``lr=0.05``,
``data.noise=0.2``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from pipeline.errors import UserError, first_line

EXPERIMENTS_ENV = "PIPELINE_EXPERIMENTS_DIR"
INIT_NAMES = ("torch", "randn", "rand", "zeros")


class ConfigError(UserError):
    """A config file or override that does not fit the schema."""


# --- data recipes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TableData:
    """Rows written out in the config, as a tutorial lists them."""

    features: tuple[tuple[float, ...], ...]
    targets: tuple[tuple[float, ...], ...]
    feature_names: tuple[str, ...] = ()
    target_names: tuple[str, ...] = ()
    repeat: int = 1
    source: str = "table"

    def validate(self) -> None:
        _check_matrix("data.features", self.features)
        _check_matrix("data.targets", self.targets)
        if len(self.features) != len(self.targets):
            raise ConfigError(
                f"data.features has {len(self.features)} rows but data.targets has "
                f"{len(self.targets)}"
            )
        _check_names("data.feature_names", self.feature_names, len(self.features[0]))
        _check_names("data.target_names", self.target_names, len(self.targets[0]))
        _check_positive("data.repeat", self.repeat)


@dataclass(frozen=True)
class LineData:
    """y = x·weight + bias (+ noise) on a grid of x, the tutorials' hand-made lines."""

    weight: float
    bias: float = 0.0
    x: tuple[float, ...] = ()
    x_range: tuple[float, ...] = ()
    x_divisor: float = 1.0
    noise: float = 0.0
    source: str = "line"

    def validate(self) -> None:
        if bool(self.x) == bool(self.x_range):
            raise ConfigError("data needs exactly one of data.x (values) or data.x_range")
        if self.x_range and (len(self.x_range) != 3 or self.x_range[2] == 0):
            raise ConfigError("data.x_range must be [start, stop, step] with a non-zero step")
        if not all(map(math.isfinite, self.x_range)):
            raise ConfigError(f"data.x_range must hold finite numbers, got {list(self.x_range)}")
        if not (math.isfinite(self.x_divisor) and self.x_divisor != 0):
            raise ConfigError(
                f"data.x_divisor must be a finite non-zero number, got {self.x_divisor}"
            )
        _check_finite("data.weight", self.weight)
        _check_finite("data.bias", self.bias)
        _check_non_negative("data.noise", self.noise)


@dataclass(frozen=True)
class SyntheticData:
    """N rows × D features × K targets from known random weights, for scaling up."""

    n_rows: int = 1000
    n_features: int = 3
    n_targets: int = 1
    noise: float = 0.1
    weight_scale: float = 1.0
    source: str = "synthetic"

    def validate(self) -> None:
        for key in ("n_rows", "n_features", "n_targets"):
            _check_positive(f"data.{key}", getattr(self, key))
        _check_non_negative("data.noise", self.noise)
        _check_non_negative("data.weight_scale", self.weight_scale)


@dataclass(frozen=True)
class CsvData:
    """A user's CSV file, read with pandas; the named columns become features and targets."""

    csv: str
    features: tuple[str, ...]
    targets: tuple[str, ...]
    source: str = "csv"

    def validate(self) -> None:
        if not self.features or not self.targets:
            raise ConfigError("data.features and data.targets must each name at least one column")
        _check_unique("data.features", self.features)
        _check_unique("data.targets", self.targets)
        if both := [name for name in self.features if name in self.targets]:
            raise ConfigError(
                f"column {both[0]} is in both data.features and data.targets; "
                "a column is either a feature or a target"
            )


DataConfig = TableData | LineData | SyntheticData | CsvData
DATA_SOURCES: dict[str, type] = {
    "table": TableData,
    "line": LineData,
    "synthetic": SyntheticData,
    "csv": CsvData,
}


# --- training -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """How the model is built and fitted; the part of an experiment the train stage sees."""

    lr: float
    epochs: int
    model: str = "manual"
    weight_init: float | str = "torch"
    bias_init: float | str = "torch"
    activation: str = "none"
    gradient: str = "autograd"
    loss: str = "mean"
    batch_size: int | None = None
    shuffle: bool = False
    device: str = "auto"
    dtype: str = "float32"
    seed: int = 0
    scale: str = "none"  # standard: features to zero mean, unit variance (training rows' stats)

    def validate(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a finite number > 0, got {self.lr}")
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        _check_seed("seed", self.seed)
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(
                f"batch_size must be >= 1 (or null for full batch), got {self.batch_size}"
            )
        _check_choice("model", self.model, ("manual", "builtin"))
        _check_choice("activation", self.activation, ("none", "relu"))
        _check_choice("gradient", self.gradient, ("autograd", "analytic"))
        _check_choice("loss", self.loss, ("mean", "sum"))
        _check_choice("device", self.device, ("auto", "cpu", "cuda"))
        _check_choice("dtype", self.dtype, ("float32", "float64"))
        _check_choice("scale", self.scale, ("none", "standard"))
        _check_init("weight_init", self.weight_init)
        _check_init("bias_init", self.bias_init, allow_none=True)
        if self.gradient == "analytic" and self.model != "manual":
            raise ConfigError("gradient: analytic is a manual-model option; use model=manual")

    @property
    def has_bias(self) -> bool:
        return self.bias_init != "none"


def run_name(config: TrainConfig) -> str:
    """What the MLflow UI lists for a training run, e.g. ``builtin lr=1e-05 epochs=100``."""
    return f"{config.model} lr={config.lr:g} epochs={config.epochs}"


# --- sweeps -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepConfig:
    """The search space of `pipeline sweep`: lr log-uniform, epochs an integer range."""

    lr: tuple[float, ...] = ()
    epochs: tuple[int, ...] = ()

    def validate(self) -> None:
        if self.lr:
            low, high = _check_range("sweep.lr", self.lr)
            if low <= 0:
                raise ConfigError(f"sweep.lr must lie above 0, got [{low}, {high}]")
        if self.epochs:
            low, high = _check_range("sweep.epochs", self.epochs)
            if low < 1:
                raise ConfigError(f"sweep.epochs must start at 1 or more, got [{low}, {high}]")


@dataclass(frozen=True)
class SweepSettings:
    """How `pipeline sweep` runs: trial count, storage, workers, sampler, pruner, ranges."""

    n_trials: int
    storage: str = "optuna.journal"
    study_name: str | None = None
    workers: int = 1
    timeout: float | None = None
    sampler: str = "tpe"
    pruner: str = "median"
    seed: int | None = None
    log_models: str = "best"
    lr_range: tuple[float, float] | None = None
    epochs_range: tuple[int, int] | None = None
    batch: int = 8

    def validate(self) -> None:
        if self.batch < 1:
            raise ConfigError(f"--batch must be >= 1, got {self.batch}")
        if self.n_trials < 1:
            raise ConfigError(f"--n-trials must be >= 1, got {self.n_trials}")
        if self.workers < 0:
            raise ConfigError(f"--workers must be >= 0 (0: print the worker command), "
                              f"got {self.workers}")
        if self.timeout is not None and not self.timeout > 0:
            raise ConfigError(f"--timeout must be > 0 seconds, got {self.timeout}")
        if self.seed is not None:
            _check_seed("--seed", self.seed)
        SweepConfig(lr=self.lr_range or (), epochs=self.epochs_range or ()).validate()


# --- the whole experiment -----------------------------------------------------------------------


@dataclass(frozen=True)
class Experiment:
    name: str
    description: str
    data: DataConfig
    train: TrainConfig
    val_fraction: float = 0.0
    sweep: SweepConfig = field(default_factory=SweepConfig)

    @property
    def seed(self) -> int:
        return self.train.seed

    def params(self) -> dict[str, Any]:
        """The resolved config flattened to ``key -> value``, as logged to MLflow."""
        flat: dict[str, Any] = dataclasses.asdict(self.train)
        flat["val_fraction"] = self.val_fraction
        for key, value in dataclasses.asdict(self.data).items():
            flat[f"data.{key}"] = value
        for key, value in dataclasses.asdict(self.sweep).items():
            if value:
                flat[f"sweep.{key}"] = value
        return flat


TOP_LEVEL_KEYS = {"description", "val_fraction", "data", "sweep"}


def to_raw(experiment: Experiment) -> dict[str, Any]:
    """The plain mapping :func:`build` turns back into ``experiment`` (lists, not tuples)."""
    import json

    raw: dict[str, Any] = dataclasses.asdict(experiment.train)
    raw["description"] = experiment.description
    raw["val_fraction"] = experiment.val_fraction
    raw["data"] = dataclasses.asdict(experiment.data)
    raw["sweep"] = {k: v for k, v in dataclasses.asdict(experiment.sweep).items() if v}
    return json.loads(json.dumps(raw))


def build(name: str, raw: dict[str, Any]) -> Experiment:
    """Turn a parsed YAML mapping into a validated :class:`Experiment`."""
    if not isinstance(raw, dict):
        raise ConfigError(
            f"experiment {name!r}: the file must hold a mapping of keys to values, got {_kind(raw)}"
        )
    raw = dict(raw)
    description = _coerce(raw.pop("description", ""), str, "description")
    val_fraction = _coerce(raw.pop("val_fraction", 0.0), float, "val_fraction")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    data = _build_data(raw.pop("data", None))
    sweep = _build_dataclass(SweepConfig, raw.pop("sweep", None) or {}, prefix="sweep.")
    train = _build_dataclass(TrainConfig, raw, prefix="")
    for part in (data, train, sweep):
        part.validate()
    return Experiment(name, description, data, train, val_fraction, sweep)


def _build_data(raw: Any) -> DataConfig:
    if not isinstance(raw, dict):
        raise ConfigError("data: missing, or not a mapping (give data.source and its fields)")
    raw = dict(raw)
    source = raw.get("source", "csv" if "csv" in raw else None)
    if source not in DATA_SOURCES:
        raise ConfigError(f"data.source must be one of {', '.join(DATA_SOURCES)}, got {source!r}")
    raw["source"] = source
    return _build_dataclass(DATA_SOURCES[source], raw, prefix="data.")


def _build_dataclass(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.')}: expected a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        known = ", ".join(sorted(set(fields) | (TOP_LEVEL_KEYS if not prefix else set())))
        raise ConfigError(f"unknown key {prefix}{unknown[0]} (known keys: {known})")
    values = {}
    for name, f in fields.items():
        if name in raw:
            values[name] = _coerce(raw[name], hints[name], prefix + name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing key {prefix}{name}")
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against a type hint, converting where YAML's reading is loose."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        expected = " or ".join(_type_name(a) for a in typing.get_args(hint))
        raise ConfigError(f"{key} must be {expected}, got {value!r}")
    if hint is type(None):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        raise ConfigError(f"{key} must be null, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (item_hint, _) = typing.get_args(hint)
        return tuple(_coerce(item, item_hint, f"{key}[{i}]") for i, item in enumerate(value))
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                try:  # 1e3, which YAML 1.1 leaves as a string
                    number = float(value)
                except ValueError:
                    number = math.nan
                if math.isfinite(number) and number.is_integer():
                    return int(number)
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:  # YAML 1.1 reads 1e-5 (no dot) as a string
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r}")
    raise TypeError(f"no coercion for {hint!r}")  # a bug in the schema, not user input


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(
        hint, str(hint)
    )


def _kind(value: Any) -> str:
    """What a parsed YAML value is, in words: ``[1, 2]`` -> ``a list``."""
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    if value is None or type(value) in (int, float, str, bool):
        return _type_name(type(value))
    return f"a {type(value).__name__}"  # a date, which YAML reads from 2024-01-01


# --- loading and overrides ----------------------------------------------------------------------


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
    import yaml

    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        known = available()
        if name_or_path not in known:
            names = ", ".join(known) or "none found"
            raise ConfigError(f"unknown experiment {name_or_path!r} (known: {names})")
        path = known[name_or_path]
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({first_line(err)})") from None
    if raw is None:  # an empty file: build() then names the first missing key
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: the file must hold a mapping of keys to values, got {_kind(raw)}"
        )
    data = raw.get("data")
    if isinstance(data, dict) and isinstance(data.get("csv"), str):
        # A CSV named in a config file lives beside it, wherever the command runs from
        # (one given with --set data.csv=... is taken from the current folder).
        data["csv"] = str((path.parent / Path(data["csv"]).expanduser()).absolute())
    return path.stem, raw


def parse_overrides(assignments: typing.Iterable[str]) -> list[tuple[str, Any]]:
    """``["lr=0.05", "data.noise=0.2 epochs=3"]`` -> ``[("lr", 0.05), ...]``.

    Each item may hold several space-separated assignments (MLproject passes one string).
    """
    import yaml

    parsed = []
    for item in assignments:
        for assignment in item.split():
            key, sep, text = assignment.partition("=")
            if not sep or not key:
                raise ConfigError(f"override {assignment!r} must look like key=value")
            try:
                value = yaml.safe_load(text) if text else ""
            except yaml.YAMLError:
                value = text
            parsed.append((key, value))
    return parsed


def apply_overrides(raw: dict[str, Any], overrides: list[tuple[str, Any]]) -> dict[str, Any]:
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
                    f"{section}: expected a mapping, got {_kind(merged[section])}, "
                    f"so {key} cannot be set"
                )
            merged[section][leaf] = value
        else:
            merged[key] = value
    return merged


def load(name_or_path: str, overrides: typing.Iterable[str] = ()) -> Experiment:
    """Read an experiment by name (from :func:`experiments_dir`) or path, apply overrides."""
    name, raw = read_raw(name_or_path)
    return build(name, apply_overrides(raw, parse_overrides(overrides)))


def with_train(experiment: Experiment, **changes: Any) -> Experiment:
    """A copy of ``experiment`` with training settings replaced (and checked again)."""
    train = dataclasses.replace(experiment.train, **changes)
    train.validate()
    return dataclasses.replace(experiment, train=train)


# --- small checks -------------------------------------------------------------------------------


def _check_matrix(key: str, rows: tuple[tuple[float, ...], ...]) -> None:
    if not rows or not rows[0]:
        raise ConfigError(f"{key} must hold at least one row of numbers")
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise ConfigError(f"{key}: every row must have the same length, got {sorted(widths)}")


def _check_names(key: str, names: tuple[str, ...], width: int) -> None:
    if names and len(names) != width:
        raise ConfigError(f"{key} names {len(names)} columns but the data has {width}")


def _check_unique(key: str, names: tuple[str, ...]) -> None:
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(f"{key} lists column {name} more than once")


def _check_seed(key: str, value: int) -> None:
    if not 0 <= value < 2**32:  # what numpy's and Optuna's generators accept
        raise ConfigError(f"{key} must lie in [0, 2**32), got {value}")


def _check_positive(key: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{key} must be >= 1, got {value}")


def _check_non_negative(key: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"{key} must be a finite number >= 0, got {value}")


def _check_finite(key: str, value: float) -> None:
    if not math.isfinite(value):
        raise ConfigError(f"{key} must be finite, got {value}")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {value!r}")


def _check_init(key: str, value: str | float, allow_none: bool = False) -> None:
    names = INIT_NAMES + (("none",) if allow_none else ())
    if isinstance(value, str) and value not in names:
        raise ConfigError(f"{key} must be a number or one of {', '.join(names)}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} must be finite, got {value}")


def _check_range(key: str, bounds: tuple) -> tuple:
    if len(bounds) != 2:
        raise ConfigError(f"{key} must be [low, high], got {list(bounds)}")
    low, high = bounds
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise ConfigError(f"{key} must be a non-empty range [low, high], got [{low}, {high}]")
    return low, high
