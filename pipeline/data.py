"""Datasets built from an experiment's data recipe, split, and named by their content.

Every dataset is a pair of float64 arrays (features ``n × d``, targets ``n × k``) with column
names and, where the recipe knows them, the true weights and bias the targets were made from.
Training casts to its own dtype on its own device; the data here stay plain numpy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np

from pipeline import memory
from pipeline.dataset import DataError, Dataset, Scaler  # noqa: F401  (data.Dataset, ...)
from pipeline.recipes import CsvData, DataConfig, LineData, SyntheticData, TableData
from pipeline.tables import _file_error, check_readable, read_table


def check(config: DataConfig, seed: int, val_fraction: float = 0.0) -> Dataset | None:
    """Find what is wrong with a recipe before anything is tracked: the memory it needs, a CSV
    that cannot be read or lacks columns, a recipe with no rows, a split that leaves no
    training rows. Returns the dataset where that meant building it (all but synthetic data,
    which is drawn later, or found cached)."""
    memory.check_fits(config)
    if isinstance(config, SyntheticData):
        _validation_rows(config.n_rows, val_fraction)
        return None
    dataset = build(config, seed)
    _validation_rows(dataset.n_rows, val_fraction)
    return dataset


def build(config: DataConfig, seed: int) -> Dataset:
    """Make the dataset a recipe describes; noise and random weights draw from ``seed``."""
    memory.check_fits(config)
    if isinstance(config, TableData):
        dataset = _table(config)
    elif isinstance(config, LineData):
        dataset = _line(config, seed)
    elif isinstance(config, SyntheticData):
        dataset = _synthetic(config, np.random.default_rng(seed))
    elif isinstance(config, CsvData):
        dataset = read_table(config.csv, config.features, config.targets)
    else:
        raise TypeError(f"unknown data config {config!r}")
    if dataset.n_rows == 0:
        raise DataError(f"the {config.source} recipe gives no rows; check its range or values")
    for role, values in (("features", dataset.features), ("targets", dataset.targets)):
        if not np.isfinite(values).all():
            raise DataError(f"the {config.source} recipe gives {role} that are inf or NaN; "
                            "check its values")
    where = f"{Path(config.csv).absolute()}: " if isinstance(config, CsvData) else ""
    _check_magnitude(dataset, where)
    return dataset


def _check_magnitude(dataset: Dataset, where: str) -> None:
    """Refuse a column whose sum of squares overflows float64: no loss, gradient or theory can
    be computed on it (a CSV cell of 1e308 is a finite number, but not one to train on)."""
    for values, names in ((dataset.features, dataset.feature_names),
                          (dataset.targets, dataset.target_names)):
        if (found := _overflowing(values, "float64")) is not None:
            column, row = found
            raise DataError(
                f"{where}column {names[column]} holds values too large to train on "
                f"({values[row, column]:g} in data row {row + 1}): the sum of their squares "
                "overflows; rescale the column")


def check_dtype_range(dataset: Dataset, dtype: str, scaled: bool) -> None:
    """Refuse a column whose sum of squares overflows ``dtype``, the dtype training computes
    in: the loss (a sum of squared residuals, which start near the targets) is inf from the
    first epoch whatever the learning rate, and so is the gradient of a feature that large
    (float32 holds sums up to about 3.4e38). Scaled features are no larger than the square
    root of the row count, so only the targets count then."""
    columns = [(dataset.targets, dataset.target_names, "")]
    if not scaled:
        columns.insert(0, (dataset.features, dataset.feature_names, ", set scale=standard"))
    for values, names, scale in columns:
        if (found := _overflowing(values, dtype)) is not None:
            column, row = found
            raise DataError(
                f"column {names[column]}: the sum of its squares overflows {dtype}, the dtype "
                f"training computes in (its largest value: {values[row, column]:g}, data row "
                f"{row + 1}); rescale the column{scale} or set dtype=float64")


def _overflowing(values: np.ndarray, dtype: str) -> tuple[int, int] | None:
    """The first column whose sum of squares ``dtype`` cannot hold, and its largest value's
    row; None where every column's fits."""
    with np.errstate(over="ignore", invalid="ignore"):
        squares = np.einsum("ij,ij->j", values, values)
    fits = squares <= np.finfo(dtype).max  # inf and NaN do not
    if fits.all():
        return None
    column = int(np.flatnonzero(~fits)[0])
    return column, int(np.abs(values[:, column]).argmax())


def column_names(config: DataConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The feature and target names a recipe's dataset has, without building it."""
    if isinstance(config, TableData):
        return (config.feature_names or _names("x", len(config.features[0])),
                config.target_names or _names("y", len(config.targets[0])))
    if isinstance(config, LineData):
        return ("x",), ("y",)
    if isinstance(config, SyntheticData):
        return _names("x", config.n_features), _names("y", config.n_targets)
    return tuple(config.features), tuple(config.targets)


def check_columns(config: DataConfig, dataset: Dataset, source: str, experiment: str) -> None:
    """Refuse a dataset (``source``: where it came from) whose columns are not the recipe's:
    it was made for another experiment, and training on it would record the wrong data."""
    features, targets = column_names(config)
    if (tuple(dataset.feature_names), tuple(dataset.target_names)) != (features, targets):
        raise DataError(
            f"{source} has columns {', '.join(dataset.feature_names)} -> "
            f"{', '.join(dataset.target_names)} but {experiment} expects {', '.join(features)} "
            f"-> {', '.join(targets)}; was it generated for another experiment?")


def _table(config: TableData) -> Dataset:
    features = np.tile(np.asarray(config.features, dtype=np.float64), (config.repeat, 1))
    targets = np.tile(np.asarray(config.targets, dtype=np.float64), (config.repeat, 1))
    return Dataset(
        features,
        targets,
        config.feature_names or _names("x", features.shape[1]),
        config.target_names or _names("y", targets.shape[1]),
    )


def _line(config: LineData, seed: int) -> Dataset:
    if config.built_with == "torch":
        x, y = _line_in_torch(config, seed)
    else:
        if config.x:
            x = np.asarray(config.x, dtype=np.float64)
        else:
            x = np.arange(*config.x_range, dtype=np.float64)
        x = x / config.x_divisor
        y = config.weight * x + config.bias
        if config.noise:
            y = y + config.noise * np.random.default_rng(seed).standard_normal(x.shape)
    return Dataset(
        x[:, None],
        y[:, None],
        ("x",),
        ("y",),
        true_weight=np.array([[config.weight]]),
        true_bias=np.array([config.bias]),
    )


def _line_in_torch(config: LineData, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``X = torch.arange(...)``, ``Y = w * X + b + noise * torch.randn(X.size())``, in float32
    as torch's tutorials compute them (float64 holds those values exactly)."""
    import torch

    start, stop, step = config.x_range or (0, 0, 1)
    if config.x:
        x = torch.tensor(config.x, dtype=torch.float32)
    elif (stop - start) / step <= 0:  # no rows, which torch.arange refuses to say
        x = torch.empty(0)
    else:
        x = torch.arange(start, stop, step, dtype=torch.float32)
    x = x / config.x_divisor
    y = config.weight * x + config.bias
    if config.noise:
        generator = torch.Generator().manual_seed(seed)  # torch.manual_seed's draws, no more
        y = y + config.noise * torch.randn(x.size(), generator=generator)
    return x.double().numpy(), y.double().numpy()


def _synthetic(config: SyntheticData, rng: np.random.Generator) -> Dataset:
    n, d, k = config.n_rows, config.n_features, config.n_targets
    weight = config.weight_scale * rng.standard_normal((k, d))
    bias = config.weight_scale * rng.standard_normal(k)
    features = rng.standard_normal((n, d))
    targets = features @ weight.T + bias
    if config.noise:
        targets += config.noise * rng.standard_normal((n, k))
    return Dataset(
        features, targets, _names("x", d), _names("y", k), true_weight=weight, true_bias=bias
    )


def _names(prefix: str, count: int) -> tuple[str, ...]:
    return (prefix,) if count == 1 else tuple(f"{prefix}{i}" for i in range(count))


def split(dataset: Dataset, val_fraction: float, seed: int,
          scale: str = "none") -> tuple[Dataset, Dataset | None]:
    """Hold out ``val_fraction`` of the rows (a seeded shuffle) for validation; with
    ``scale="standard"`` both parts are scaled by the training rows' statistics (what the
    model trains on; evaluation reads raw rows, as the exported model does)."""
    if val_fraction <= 0:
        train_set, val_set = dataset, None
    else:
        n = dataset.n_rows
        n_val = _validation_rows(n, val_fraction)
        order = np.random.default_rng(seed).permutation(n)
        train_set, val_set = dataset.rows(np.sort(order[n_val:])), dataset.rows(
            np.sort(order[:n_val]))
    return scaled(train_set, val_set, scale)


def scaled(train_set: Dataset, val_set: Dataset | None,
           scale: str) -> tuple[Dataset, Dataset | None]:
    """Both parts of a split scaled by the training rows' statistics (``scale="standard"``),
    or as they are."""
    if scale == "none":
        return train_set, val_set
    scaler = Scaler.fit(train_set.features)

    def apply(part: Dataset) -> Dataset:
        return dataclasses.replace(part, features=scaler.apply(part.features), scaler=scaler)

    return apply(train_set), None if val_set is None else apply(val_set)


def _validation_rows(n: int, val_fraction: float) -> int:
    """How many of ``n`` rows a split holds out; refused where none would be left to train."""
    if val_fraction <= 0:
        return 0
    n_val = max(1, round(n * val_fraction))
    if n_val >= n:
        raise DataError(f"val_fraction {val_fraction} leaves no training rows out of {n}")
    return n_val


def draws_random_numbers(config: DataConfig) -> bool:
    """Whether the recipe's rows depend on the seed."""
    return isinstance(config, (LineData, SyntheticData))


# The version of the rows the recipes make. A change to the code that gives other rows for the
# same recipe and seed (or splits them, or reads a CSV, otherwise) bumps it: cached data and
# resumable studies keyed on the old rows then stop matching. tests/test_data.py pins the rows
# each recipe gives, a split and a CSV's reading, so such a change does not go unnoticed; any
# other change leaves the keys, the cache and the studies alone.
ROWS_VERSION = 1


def content_key(config: DataConfig, seed: int) -> str:
    """A digest of everything that decides the data: the recipe, the seed, the version of the
    code that makes rows, and the file.

    Generating again with the same key would give the same rows, so the key names a cache entry.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps(config.model_dump(), sort_keys=True).encode())
    if draws_random_numbers(config):
        digest.update(str(seed).encode())
    digest.update(f"rows v{ROWS_VERSION}".encode())
    if isinstance(config, CsvData):
        path = Path(config.csv).absolute()
        check_readable(path)
        try:
            digest.update(path.read_bytes())
        except OSError as err:
            raise _file_error(path, err) from None
    return digest.hexdigest()
