"""Datasets: built from an experiment's data recipe, split, and read back from files.

Every dataset is a pair of float64 arrays (features ``n × d``, targets ``n × k``) with column
names and, where the recipe knows them, the true weights and bias the targets were made from.
Training casts to its own dtype on its own device; the data here stay plain numpy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import os
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import numpy as np

from pipeline.config import CsvData, DataConfig, LineData, SyntheticData, TableData
from pipeline.errors import UserError

MEMINFO = Path("/proc/meminfo")
# Bytes held per generated value: the float64 itself, a second copy when the rows are split,
# and the training copy with its batches; a recipe that needs more than memory holds is refused.
BYTES_PER_VALUE = 3 * 8


class DataError(UserError):
    """A data file that cannot be used: missing, empty, malformed, or lacking columns."""


@dataclass(frozen=True)
class Scaler:
    """Standard scaling: ``(x - mean) / std`` per feature, with the training rows' statistics
    (a constant feature keeps std 1). A model trained on scaled rows is exported with it, so
    that it takes raw units."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, features: np.ndarray) -> Scaler:
        std = features.std(axis=0)
        return cls(features.mean(axis=0), np.where(std > 0, std, 1.0))

    def apply(self, features: np.ndarray) -> np.ndarray:
        return (features - self.mean) / self.std

    def undo(self, features: np.ndarray) -> np.ndarray:
        return features * self.std + self.mean


@dataclass(frozen=True)
class Dataset:
    features: np.ndarray
    targets: np.ndarray
    feature_names: tuple[str, ...]
    target_names: tuple[str, ...]
    true_weight: np.ndarray | None = None  # (k, d)
    true_bias: np.ndarray | None = None  # (k,)
    scaler: Scaler | None = None  # set when ``features`` are scaled: raw = scaler.undo(...)

    @property
    def n_rows(self) -> int:
        return self.features.shape[0]

    def rows(self, index: np.ndarray) -> Dataset:
        return dataclasses.replace(self, features=self.features[index], targets=self.targets[index])

    def frame(self):
        """Features then targets as one pandas DataFrame, named columns."""
        import pandas as pd

        columns = {name: self.features[:, i] for i, name in enumerate(self.feature_names)}
        columns.update({name: self.targets[:, i] for i, name in enumerate(self.target_names)})
        return pd.DataFrame(columns)

    def truth(self) -> dict | None:
        if self.true_weight is None:
            return None
        return {"weight": self.true_weight.tolist(), "bias": self.true_bias.tolist()}


def check(config: DataConfig, seed: int) -> Dataset | None:
    """Find what is wrong with a recipe before anything is tracked: the memory it needs, a CSV
    that cannot be read or lacks columns, a recipe with no rows. Returns the dataset where
    that meant building it (all but synthetic data, which is drawn later, or found cached)."""
    _check_fits_in_memory(config)
    return None if isinstance(config, SyntheticData) else build(config, seed)


def build(config: DataConfig, seed: int) -> Dataset:
    """Make the dataset a recipe describes; noise and random weights draw from ``seed``."""
    _check_fits_in_memory(config)
    if isinstance(config, TableData):
        dataset = _table(config)
    elif isinstance(config, LineData):
        dataset = _line(config, np.random.default_rng(seed))
    elif isinstance(config, SyntheticData):
        dataset = _synthetic(config, np.random.default_rng(seed))
    elif isinstance(config, CsvData):
        dataset = read_table(config.csv, config.features, config.targets)
    else:
        raise TypeError(f"unknown data config {config!r}")
    if dataset.n_rows == 0:
        raise DataError(f"the {config.source} recipe gives no rows; check its range or values")
    return dataset


def _table(config: TableData) -> Dataset:
    features = np.tile(np.asarray(config.features, dtype=np.float64), (config.repeat, 1))
    targets = np.tile(np.asarray(config.targets, dtype=np.float64), (config.repeat, 1))
    return Dataset(
        features,
        targets,
        config.feature_names or _names("x", features.shape[1]),
        config.target_names or _names("y", targets.shape[1]),
    )


def _line(config: LineData, rng: np.random.Generator) -> Dataset:
    if config.x:
        x = np.asarray(config.x, dtype=np.float64)
    else:
        x = np.arange(*config.x_range, dtype=np.float64)
    x = x / config.x_divisor
    y = config.weight * x + config.bias
    if config.noise:
        y = y + config.noise * rng.standard_normal(x.shape)
    return Dataset(
        x[:, None],
        y[:, None],
        ("x",),
        ("y",),
        true_weight=np.array([[config.weight]]),
        true_bias=np.array([config.bias]),
    )


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


def _check_fits_in_memory(config: DataConfig) -> None:
    """Refuse, before allocating anything, a generated recipe too large for this machine."""
    planned = _planned_shape(config)
    available = available_memory()
    if planned is None or available is None:
        return
    (n, d, k), key = planned
    needed = BYTES_PER_VALUE * (n * (d + k) + k * (d + 1))  # rows, then weights and bias
    if needed > available:
        raise DataError(
            f"{config.source} data of {n} × {d} → {k} needs about {_size(needed)} of memory; "
            f"this machine has {_size(available)} available; lower {key}"
        )


def _planned_shape(config: DataConfig) -> tuple[tuple[int, int, int], str] | None:
    """(rows, features, targets) a recipe will generate, and the key that sets its size."""
    if isinstance(config, SyntheticData):
        shape = (config.n_rows, config.n_features, config.n_targets)
        largest = ("n_rows", "n_features", "n_targets")[shape.index(max(shape))]
        return shape, f"data.{largest}"
    if isinstance(config, TableData):
        rows = config.repeat * len(config.features)
        return (rows, len(config.features[0]), len(config.targets[0])), "data.repeat"
    if isinstance(config, LineData) and config.x_range:
        start, stop, step = config.x_range
        count = (stop - start) / step
        if not math.isfinite(count):  # a span too wide for a float to count
            raise DataError(f"data.x_range {list(config.x_range)} gives too many rows to count")
        return (max(0, math.ceil(count)), 1, 1), "data.x_range"
    return None  # a CSV is as large as its file; listed x values are already in memory


def available_memory() -> int | None:
    """Bytes of memory free for new data: MemAvailable, else physical memory, else unknown."""
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # the kernel writes kB meaning KiB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def _size(count: int) -> str:
    """Bytes in decimal units, one decimal: 9_600_000_000_000 -> ``9.6 TB``."""
    units = ("bytes", "kB", "MB", "GB", "TB", "PB")
    for power, unit in enumerate(units):
        if count < 1000 ** (power + 1):
            return f"{Decimal(count).scaleb(-3 * power):.1f} {unit}"
    return f"{Decimal(count).scaleb(-3 * len(units)):,.1f} EB"


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
        n_val = max(1, round(n * val_fraction))
        if n_val >= n:
            raise DataError(f"val_fraction {val_fraction} leaves no training rows out of {n}")
        order = np.random.default_rng(seed).permutation(n)
        train_set, val_set = dataset.rows(np.sort(order[n_val:])), dataset.rows(
            np.sort(order[:n_val]))
    if scale == "none":
        return train_set, val_set
    scaler = Scaler.fit(train_set.features)

    def scaled(part: Dataset) -> Dataset:
        return dataclasses.replace(part, features=scaler.apply(part.features), scaler=scaler)

    return scaled(train_set), None if val_set is None else scaled(val_set)


# --- files --------------------------------------------------------------------------------------


def read_table(path: str | Path, features: tuple[str, ...], targets: tuple[str, ...]) -> Dataset:
    """Read a CSV or Parquet file and pick the named feature and target columns."""
    frame = read_frame(path)
    missing = [c for c in (*features, *targets) if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: no column named {', '.join(missing)} (has: {_listing(frame)})")
    return Dataset(
        numeric_matrix(frame, features, path),
        numeric_matrix(frame, targets, path),
        tuple(features),
        tuple(targets),
    )


def read_frame(path: str | Path):
    """A CSV or Parquet file as a DataFrame; in a CSV only an empty cell counts as missing."""
    import pandas as pd

    path = Path(path).absolute()  # errors say exactly where they looked
    _check_readable(path)
    try:
        if path.suffix == ".parquet":
            frame = pd.read_parquet(path)
            header = list(frame.columns)
        else:
            # pandas renames a repeated name (a, a -> a, a.1), so the header is read as a row.
            header = pd.read_csv(path, header=None, nrows=1, dtype=str, keep_default_na=False)
            header = header.iloc[0].tolist()
            # "NaN" or "NA" stays text, so the error can quote it; only "" becomes missing.
            frame = pd.read_csv(path, keep_default_na=False, na_values=[""])
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty") from None
    except OSError as err:
        raise _file_error(path, err) from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{path}: cannot be read as a table ({first})") from None
    for i, name in enumerate(header):
        if name != "" and name in header[:i]:
            raise DataError(f"{path}: the header names column {name} more than once")
    if frame.empty:
        raise DataError(f"{path}: the file has no data rows")
    return frame


def _check_readable(path: Path) -> None:
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not a CSV or Parquet file")
    if not path.is_file():
        raise DataError(f"{path}: no such file")


def _file_error(path: Path, err: OSError) -> DataError:
    """The real reason a file could not be opened, not just "no such file"."""
    if isinstance(err, FileNotFoundError):
        return DataError(f"{path}: no such file")
    if isinstance(err, IsADirectoryError):
        return DataError(f"{path}: is a folder, not a CSV or Parquet file")
    if isinstance(err, PermissionError):
        return DataError(f"{path}: cannot be read: permission denied")
    return DataError(f"{path}: cannot be read: {(err.strerror or str(err)).lower()}")


def numeric_matrix(frame, columns: tuple[str, ...], path: str | Path) -> np.ndarray:
    """The named columns as float64, refusing text and missing values with the first bad cell."""
    import pandas as pd

    matrix = np.empty((len(frame), len(columns)), dtype=np.float64)
    for j, column in enumerate(columns):
        values = pd.to_numeric(frame[column], errors="coerce")
        matrix[:, j] = values.to_numpy(dtype=np.float64, na_value=np.nan)
        bad = ~np.isfinite(matrix[:, j])  # text, an empty cell, NaN or inf
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raw = frame[column].iloc[row]
            shown = "an empty cell" if pd.isna(raw) else f"'{raw}'"
            raise DataError(
                f"{path}: column {column} holds a non-numeric or missing value "
                f"({shown}) in data row {row + 1}"
            )
    return matrix


def _listing(frame) -> str:
    return ", ".join(map(str, frame.columns)) or "no columns"


def write(dataset: Dataset, folder: Path) -> Path:
    """Write ``data.parquet`` (and ``truth.json`` where known) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    dataset.frame().to_parquet(folder / "data.parquet", index=False)
    schema = {"features": list(dataset.feature_names), "targets": list(dataset.target_names)}
    if truth := dataset.truth():
        schema["truth"] = truth
    (folder / "schema.json").write_text(json.dumps(schema, indent=2))
    return folder


def read(folder: Path) -> Dataset:
    """Read back what :func:`write` wrote."""
    schema_file = folder / "schema.json"
    if not schema_file.is_file():
        raise DataError(f"{folder}: not a dataset written by `pipeline generate` (no schema.json)")
    schema = json.loads(schema_file.read_text())
    dataset = read_table(folder / "data.parquet", schema["features"], schema["targets"])
    if truth := schema.get("truth"):
        dataset = dataclasses.replace(
            dataset, true_weight=np.array(truth["weight"]), true_bias=np.array(truth["bias"])
        )
    return dataset


def content_key(config: DataConfig, seed: int) -> str:
    """A digest of everything that decides the data: the recipe, the seed, this code, the file.

    Generating again with the same key would give the same rows, so the key names a cache entry.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps(config.model_dump(), sort_keys=True).encode())
    if isinstance(config, (LineData, SyntheticData)):  # only these draw random numbers
        digest.update(str(seed).encode())
    digest.update(inspect.getsource(inspect.getmodule(content_key)).encode())
    if isinstance(config, CsvData):
        path = Path(config.csv).absolute()
        _check_readable(path)
        try:
            digest.update(path.read_bytes())
        except OSError as err:
            raise _file_error(path, err) from None
    return digest.hexdigest()
