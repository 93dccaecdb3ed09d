"""Experiment configs: one commented YAML file per experiment, built into frozen pydantic models.

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

Building a config checks it, so an invalid one cannot exist: unknown keys, values of the wrong
type and values out of range raise :class:`ConfigError` with one line that names the key.
``--set key=value`` overrides (``lr=0.05``, ``data.noise=0.2``) meet the same checks. Finding,
reading and overriding files is :mod:`pipeline.experiment_files`; its functions answer here too.
The ``data:`` recipes are :mod:`pipeline.recipes`.
"""

from __future__ import annotations

import json
import math
import typing
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from pipeline.experiment_files import (  # noqa: F401  (re-exported: configs.available() etc.)
    EXPERIMENTS_ENV,
    apply_overrides,
    available,
    experiments_dir,
    kind_of,
    parse_overrides,
    read_raw,
)
from pipeline.recipes import DATA_SOURCES, DataConfig
from pipeline.schema import (  # noqa: F401  (ConfigError re-exported)
    ConfigError,
    Epochs,
    Flag,
    Integer,
    Number,
    Schema,
    Seed,
    must,
)
from pipeline.sweep_settings import EpochsRange, LrRange

# --- training -----------------------------------------------------------------------------------

INIT_NAMES = ("torch", "randn", "rand", "zeros")
FLOAT32_MAX = 3.4028234663852886e38


def _init(names: tuple[str, ...]) -> AfterValidator:
    """A starting value, or the name of a way to draw one."""

    def check(value: float | str) -> float | str:
        if isinstance(value, str) and value not in names:
            raise ValueError(f"must be a number or one of {', '.join(names)}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"must be finite, got {value}")
        if isinstance(value, float) and abs(value) > FLOAT32_MAX:
            # Drawn in float32, as the tutorials draw them (see models.init_parameters).
            raise ValueError(f"must lie within float32's range (±{FLOAT32_MAX:.4g}), "
                             f"got {value:g}")
        return value

    return AfterValidator(check)


# A number is tried first, so 1e-3 (a string to YAML 1.1) is the number it reads as.
WeightInit = Annotated[Number | str, Field(union_mode="left_to_right"), _init(INIT_NAMES)]
BiasInit = Annotated[Number | str, Field(union_mode="left_to_right"), _init(INIT_NAMES + ("none",))]


class TrainConfig(Schema):
    """How the model is built and fitted; the part of an experiment the train stage sees."""

    # Its keys sit at a file's top level, beside these.
    keys_beside: ClassVar[tuple[str, ...]] = ("data", "description", "sweep", "val_fraction")

    lr: Annotated[Number, must(lambda x: math.isfinite(x) and x > 0,
                               "must be a finite number > 0")]
    epochs: Epochs
    model: Literal["manual", "builtin"] = "manual"
    weight_init: WeightInit = "torch"
    bias_init: BiasInit = "torch"
    activation: Literal["none", "relu"] = "none"
    # How a manual model multiplies the rows by its weight: matmul, x @ w.T (tutorials 001,
    # 004); elementwise, x * w, for one feature (tutorials 000, 003). The predictions are the
    # same; the weight's gradient sums the rows in another order, so each form reproduces its
    # tutorial's numbers to the bit. The builtin model is nn.Linear whatever this says.
    product: Literal["matmul", "elementwise"] = "matmul"
    gradient: Literal["autograd", "analytic"] = "autograd"
    loss: Literal["mean", "sum"] = "mean"
    batch_size: Annotated[Integer, must(lambda n: n >= 1,
                                        "must be >= 1 (or null for full batch)")] | None = None
    shuffle: Flag = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "float64"] = "float32"
    # The dtype the parameters are kept and updated in, where it is not ``dtype`` (the rows',
    # and the forward pass's): tutorial 004 keeps float32 parameters and computes in float64
    # (``X.mm(w1.double())``), so their gradients come back as float32. Manual models.
    param_dtype: Literal["float32", "float64"] | None = None
    seed: Seed = 0
    # standard: features to zero mean, unit variance (training rows' stats)
    scale: Literal["none", "standard"] = "none"
    # How descent runs. auto: `pipeline train` and `run` the tutorials' loop; sweeps from
    # sufficient statistics where that is exact (full batch, no ReLU), else the loop. loop:
    # the loop everywhere. statistics: the closed form everywhere (full batch, no ReLU only).
    engine: Literal["auto", "loop", "statistics"] = "auto"

    @field_validator("batch_size", mode="before")
    @classmethod
    def _none_spelled_out(cls, value: Any) -> Any:
        """``batch_size=none`` as Python spells it: YAML reads only null and ~ as null."""
        return None if isinstance(value, str) and value.lower() in ("none", "null", "~") else value

    @model_validator(mode="after")
    def _gradient_fits_model(self) -> TrainConfig:
        if self.gradient == "analytic" and self.model != "manual":
            raise ValueError("gradient: analytic is a manual-model option; use model=manual")
        return self

    @model_validator(mode="after")
    def _scale_keeps_the_model(self) -> TrainConfig:
        if self.scale == "standard" and self.bias_init == "none":
            raise ValueError("scale: standard centres the features, which gives the exported "
                             "model an intercept that bias_init: none leaves out; use "
                             "scale=none, or a bias")
        return self

    @model_validator(mode="after")
    def _param_dtype_fits(self) -> TrainConfig:
        if self.param_dtype in (None, self.dtype):
            return self
        if self.model != "manual":
            raise ValueError("param_dtype is a manual-model option (nn.Linear keeps its "
                             "parameters in dtype); use model=manual")
        if self.engine == "statistics":
            raise ValueError(f"engine: statistics keeps no parameters in {self.param_dtype} "
                             f"beside {self.dtype} rows (param_dtype); use engine=loop or auto")
        return self

    @property
    def mixed(self) -> bool:
        """Parameters in another dtype than the rows (see ``param_dtype``)."""
        return self.param_dtype not in (None, self.dtype)

    @model_validator(mode="after")
    def _statistics_fit_descent(self) -> TrainConfig:
        if self.engine != "statistics":
            return self
        why = (f"activation: {self.activation}" if self.activation != "none" else
               f"batch_size: {self.batch_size}" if self.batch_size is not None else None)
        if why:
            raise ValueError(f"engine: statistics is exact only for full-batch descent on a "
                             f"linear model (batch_size: null, activation: none), not with "
                             f"{why}; use engine=loop or auto")
        return self

    @property
    def has_bias(self) -> bool:
        return self.bias_init != "none"


def run_name(config: TrainConfig) -> str:
    """What the MLflow UI lists for a training run, e.g. ``builtin lr=1e-05 epochs=100``."""
    return f"{config.model} lr={config.lr:g} epochs={config.epochs}"


# --- sweeps and the whole experiment ------------------------------------------------------------


class SweepConfig(Schema):
    """The search space of `pipeline sweep`: lr log-uniform, epochs an integer range."""

    prefix: ClassVar[str] = "sweep."

    lr: LrRange = None
    epochs: EpochsRange = None


class Experiment(Schema):
    """One experiment: its data recipe, how to train on it, the validation split, the sweep."""

    name: str
    # The experiment's note in MLflow, which holds at most 20,000 characters with what the
    # runs add to it.
    description: Annotated[str, must(lambda text: len(text) <= 10_000,
                                     "must be at most 10,000 characters")] = ""
    data: DataConfig = Field(discriminator="source")
    train: TrainConfig
    val_fraction: Annotated[Number, must(lambda x: 0 <= x < 1, "must lie in [0, 1)")] = 0.0
    sweep: SweepConfig = SweepConfig()

    @model_validator(mode="after")
    def _product_fits_data(self) -> Experiment:
        train, features = self.train, self.data.columns_in
        if train.model == "manual" and train.product == "elementwise" and features != 1:
            raise ValueError(f"product: elementwise multiplies one feature by its weight "
                             f"(x * w), but the data have {features}; use product=matmul")
        return self

    @property
    def seed(self) -> int:
        return self.train.seed

    def params(self) -> dict[str, Any]:
        """The resolved config flattened to ``key -> value``, as logged to MLflow."""
        flat: dict[str, Any] = dict(self.train)
        flat["val_fraction"] = self.val_fraction
        flat.update({f"data.{key}": value for key, value in self.data})
        flat.update({f"sweep.{key}": tuple(value) for key, value in self.sweep if value})
        return flat


def build(name: str, raw: dict[str, Any]) -> Experiment:
    """Turn a parsed YAML mapping (as :func:`read_raw` gives it) into an :class:`Experiment`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"experiment {name!r}: the file must hold a mapping of keys to values, "
                          f"got {kind_of(raw)}")
    train = _keys_as_text(raw)
    top = {key: train.pop(key) for key in ("description", "val_fraction") if key in train}
    data, sweep = train.pop("data", None), train.pop("sweep", None) or {}
    if not isinstance(data, dict):
        raise ConfigError("data: missing, or not a mapping (give data.source and its fields)")
    source = data.get("source", "csv" if "csv" in data else None)
    if not isinstance(source, str) or source not in DATA_SOURCES:
        raise ConfigError(f"data.source must be one of {', '.join(DATA_SOURCES)}, got {source!r}")
    if not isinstance(sweep, dict):
        raise ConfigError("sweep: expected a mapping")
    return Experiment(name=name, data=DATA_SOURCES[source](**_keys_as_text(data)),
                      train=TrainConfig(**train), sweep=SweepConfig(**_keys_as_text(sweep)),
                      **top)


def _keys_as_text(raw: dict) -> dict[str, Any]:
    return {str(key): value for key, value in raw.items()}  # YAML reads `1: x` with an int key


def to_raw(experiment: Experiment) -> dict[str, Any]:
    """The plain mapping :func:`build` turns back into ``experiment`` (lists, not tuples)."""
    raw = experiment.train.model_dump()
    raw["description"] = experiment.description
    raw["val_fraction"] = experiment.val_fraction
    raw["data"] = experiment.data.model_dump()
    raw["sweep"] = {key: value for key, value in experiment.sweep.model_dump().items() if value}
    return json.loads(json.dumps(raw))


def load(name_or_path: str, overrides: typing.Iterable[str] = ()) -> Experiment:
    """Read an experiment by name (from :func:`experiments_dir`) or path, apply overrides."""
    name, raw = read_raw(name_or_path)
    return build(name, apply_overrides(raw, parse_overrides(overrides)))


def with_train(experiment: Experiment, **changes: Any) -> Experiment:
    """A copy of ``experiment`` with training settings replaced (and checked again)."""
    return experiment.replace(train=experiment.train.replace(**changes))
