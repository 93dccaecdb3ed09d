"""Data recipes: the ``data:`` section of an experiment config, one model per source.

    data:
      source: synthetic   # or table, line, csv
      n_rows: 1000

Each recipe checks what spans its fields (rows of one width, a column named once) and names
the key at fault; :mod:`pipeline.data` builds the rows a recipe describes.
"""

from __future__ import annotations

import math
from typing import Annotated, ClassVar, Literal

from pydantic import model_validator

from pipeline.schema import Count, Finite, NonNegative, Number, Schema, must


class DataRecipe(Schema):
    """What the data stage builds rows from; checks that span fields name their keys."""

    prefix: ClassVar[str] = "data."

    @property
    def columns_in(self) -> int:
        """How many features the rows have."""
        raise NotImplementedError


class TableData(DataRecipe):
    """Rows written out in the config, as a tutorial lists them."""

    features: tuple[tuple[Number, ...], ...]
    targets: tuple[tuple[Number, ...], ...]
    feature_names: tuple[str, ...] = ()
    target_names: tuple[str, ...] = ()
    repeat: Count = 1
    source: Literal["table"] = "table"

    @property
    def columns_in(self) -> int:
        return len(self.features[0]) if self.features else 0

    @model_validator(mode="after")
    def _rows_fit(self) -> TableData:
        for key, rows in (("data.features", self.features), ("data.targets", self.targets)):
            if not rows or not rows[0]:
                raise ValueError(f"{key} must hold at least one row of numbers")
            if len(widths := {len(row) for row in rows}) != 1:
                raise ValueError(
                    f"{key}: every row must have the same length, got {sorted(widths)}")
        if len(self.features) != len(self.targets):
            raise ValueError(f"data.features has {len(self.features)} rows but data.targets "
                              f"has {len(self.targets)}")
        for key, names, rows in (("data.feature_names", self.feature_names, self.features),
                                 ("data.target_names", self.target_names, self.targets)):
            if names and len(names) != len(rows[0]):
                raise ValueError(
                    f"{key} names {len(names)} columns but the data has {len(rows[0])}")
        _each_column_once(self.feature_names, self.target_names, "data.feature_names",
                          "data.target_names")
        return self


class LineData(DataRecipe):
    """y = x·weight + bias (+ noise) on a grid of x, the tutorials' hand-made lines."""

    weight: Finite
    bias: Finite = 0.0
    x: tuple[Number, ...] = ()
    x_range: tuple[Number, ...] = ()
    x_divisor: Annotated[Number, must(lambda x: math.isfinite(x) and x != 0,
                                      "must be a finite non-zero number")] = 1.0
    noise: NonNegative = 0.0
    # What makes the rows, as the tutorial makes them: numpy in float64, or torch in float32
    # (torch.arange, and noise from torch.randn seeded with the experiment's seed).
    built_with: Literal["numpy", "torch"] = "numpy"
    source: Literal["line"] = "line"

    @property
    def columns_in(self) -> int:
        return 1

    @model_validator(mode="after")
    def _one_grid(self) -> LineData:
        if bool(self.x) == bool(self.x_range):
            raise ValueError("data needs exactly one of data.x (values) or data.x_range")
        if self.x_range and (len(self.x_range) != 3 or self.x_range[2] == 0):
            raise ValueError("data.x_range must be [start, stop, step] with a non-zero step")
        if not all(map(math.isfinite, self.x_range)):
            raise ValueError(f"data.x_range must hold finite numbers, got {list(self.x_range)}")
        return self


class SyntheticData(DataRecipe):
    """N rows × D features × K targets from known random weights, for scaling up."""

    n_rows: Count = 1000
    n_features: Count = 3
    n_targets: Count = 1
    noise: NonNegative = 0.1
    weight_scale: NonNegative = 1.0
    source: Literal["synthetic"] = "synthetic"

    @property
    def columns_in(self) -> int:
        return self.n_features


class CsvData(DataRecipe):
    """A user's CSV file, read with pandas; the named columns become features and targets."""

    csv: str
    features: tuple[str, ...]
    targets: tuple[str, ...]
    source: Literal["csv"] = "csv"

    @property
    def columns_in(self) -> int:
        return len(self.features)

    @model_validator(mode="after")
    def _columns_once(self) -> CsvData:
        if not self.features or not self.targets:
            raise ValueError("data.features and data.targets must each name at least one column")
        _each_column_once(self.features, self.targets, "data.features", "data.targets")
        return self


def _each_column_once(features, targets, feature_key: str, target_key: str) -> None:
    """Every column named, once: a blank name, a name twice in a role, or in both roles, is
    refused."""
    for key, names in ((feature_key, features), (target_key, targets)):
        if blank := [i for i, name in enumerate(names) if not name.strip()]:
            raise ValueError(f"{key}[{blank[0]}] must be a name, got {names[blank[0]]!r}")
        if twice := [name for i, name in enumerate(names) if name in names[:i]]:
            raise ValueError(f"{key} lists column {twice[0]} more than once")
    if both := [name for name in features if name in targets]:
        raise ValueError(f"column {both[0]} is in both {feature_key} and {target_key}; "
                         "a column is either a feature or a target")


DataConfig = TableData | LineData | SyntheticData | CsvData
DATA_SOURCES: dict[str, type[DataRecipe]] = {
    "table": TableData,
    "line": LineData,
    "synthetic": SyntheticData,
    "csv": CsvData,
}
