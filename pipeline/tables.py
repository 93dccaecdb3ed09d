"""Datasets in files: CSV or Parquet read with every check a user's file needs (a folder, no
permission, empty, a repeated header, text or missing cells, missing columns), and the
Parquet-plus-schema form `pipeline generate` writes and reads back."""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from pathlib import Path

import numpy as np

from pipeline.dataset import DataError, Dataset
from pipeline.errors import first_line


def read_table(path: str | Path, features: tuple[str, ...], targets: tuple[str, ...]) -> Dataset:
    """Read a CSV or Parquet file and pick the named feature and target columns."""
    frame = read_frame(path)
    missing = [c for c in (*features, *targets) if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: no column named {', '.join(missing)} (has: {listing(frame)})")
    return Dataset(
        numeric_matrix(frame, features, path),
        numeric_matrix(frame, targets, path),
        tuple(features),
        tuple(targets),
    )


# Table formats read as CSV they would give misleading errors ("no data rows").
OTHER_FORMATS = (".json", ".jsonl", ".ndjson", ".xlsx", ".xls", ".ods", ".feather", ".orc",
                 ".h5", ".hdf5", ".pkl", ".pickle", ".npy", ".npz")


COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zip", ".tar")  # pandas opens these itself


def read_frame(path: str | Path):
    """A CSV or Parquet file as a DataFrame; in a CSV only an empty cell counts as missing."""
    import pandas as pd

    path = Path(path).absolute()  # errors say exactly where they looked
    check_readable(path)
    if path.suffix.lower() in OTHER_FORMATS:
        raise DataError(f"{path}: is a {path.suffix} file; give the rows as CSV or Parquet")
    try:
        if path.suffix.lower() == ".parquet":
            frame = pd.read_parquet(path)
            header = list(frame.columns)
        else:
            # pandas renames a repeated name (a, a -> a, a.1), so the header is read as a row.
            header = pd.read_csv(path, header=None, nrows=1, dtype=str, keep_default_na=False)
            header = header.iloc[0].tolist()
            # "NaN" or "NA" stays text, so the error can quote it; only "" becomes missing.
            # index_col=False: rows longer than the header are an error, not an index that
            # shifts every value one column along.
            if len(header) == 1:
                _check_no_blank_rows(path, header[0])
            with warnings.catch_warnings():
                warnings.simplefilter("error", pd.errors.ParserWarning)
                frame = pd.read_csv(path, keep_default_na=False, na_values=[""],
                                    index_col=False)
    except pd.errors.ParserWarning:
        raise DataError(f"{path}: its data rows have more fields than its header "
                        f"({len(header)} columns)") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty") from None
    except OSError as err:
        raise _file_error(path, err) from None
    except EOFError:  # gzip, bz2, lzma
        raise DataError(f"{path}: cannot be read: the compressed file ends early") from None
    except ImportError as err:  # .zst without zstandard: "`Import zstandard` failed. ..."
        package = err.name or next(iter(re.findall(r"`Import (\w+)`", str(err))), "a")
        advice = "decompress it first" if path.suffix.lower() in COMPRESSED else "install it"
        raise DataError(f"{path}: cannot be read: pandas needs the {package} package for "
                        f"{path.suffix} files, which is not installed; {advice}") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{path}: cannot be read as a table ({first})") from None
    for i, name in enumerate(header):
        if name != "" and name in header[:i]:
            raise DataError(f"{path}: the header names column {name} more than once")
    if frame.empty:
        raise DataError(f"{path}: the file has no data rows")
    return frame


def _check_no_blank_rows(path: Path, column: str) -> None:
    """In a one-column file a blank line is an empty cell, not nothing: pandas skips it, and
    the rows after it would no longer line up with the file's. Blank lines before the header
    or after the last row are the file's edges."""
    with open(path, encoding="utf-8-sig", errors="replace") as handle:
        lines = [line.strip() for line in handle]
    filled = [i for i, line in enumerate(lines) if line]
    if len(filled) < 2:
        return
    for row, line in enumerate(lines[filled[0] + 1:filled[-1]], start=1):
        if not line:
            raise DataError(f"{path}: column {column} holds a non-numeric or missing value "
                            f"(an empty cell) in data row {row}")


def check_readable(path: Path) -> None:
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not a CSV or Parquet file")
    if not path.is_file():
        raise DataError(f"{path}: {'not a regular file' if path.exists() else 'no such file'}")


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

    kinds = [frame[column].dtype for column in columns]
    if all(pd.api.types.is_numeric_dtype(kind) and kind.kind != "b" for kind in kinds):
        # Columns of numbers: one conversion, one look for NaN and inf (a cell at a time only
        # to name a bad one, below).
        matrix = np.array(frame[list(columns)].to_numpy(dtype=np.float64, na_value=np.nan),
                          order="C")  # rows contiguous and writable, as training reads them
        if np.isfinite(matrix).all():
            return matrix
    matrix = np.empty((len(frame), len(columns)), dtype=np.float64)
    for j, column in enumerate(columns):
        kind = kinds[j]
        if kind.kind in "mM" or isinstance(kind, pd.PeriodDtype):  # pandas would give nanoseconds
            raise DataError(f"{path}: column {column} holds dates or times ({kind}), not "
                            "numbers; convert it to a number first")
        if kind.kind == "b":  # pandas reads True/False as bool, which converts to 1 and 0
            raise DataError(f"{path}: column {column} holds true/false values, not numbers; "
                            "write them as 1 and 0")
        values = pd.to_numeric(frame[column], errors="coerce")
        matrix[:, j] = values.to_numpy(dtype=np.float64, na_value=np.nan)
        bad = ~np.isfinite(matrix[:, j])  # text, an empty cell, NaN or inf
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raw = frame[column].iloc[row]
            empty = pd.api.types.is_scalar(raw) and pd.isna(raw)  # a list cell is no scalar
            shown = "an empty cell" if empty else f"'{raw}'"
            raise DataError(
                f"{path}: column {column} holds a non-numeric or missing value "
                f"({shown}) in data row {row + 1}"
            )
    return matrix


def listing(frame) -> str:
    """A table's column names, for a message: quoted where spaces around a name, or none at
    all, would not show."""
    names = [str(c) for c in frame.columns]
    return ", ".join(repr(n) if n != n.strip() or not n else n for n in names) or "no columns"


def write(dataset: Dataset, folder: Path) -> Path:
    """Write ``data.parquet`` and ``schema.json`` (column roles, and the true weights where
    the recipe knows them) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    dataset.frame().to_parquet(folder / "data.parquet", index=False)
    schema = {"features": list(dataset.feature_names), "targets": list(dataset.target_names)}
    if truth := dataset.truth():
        schema["truth"] = truth
    (folder / "schema.json").write_text(json.dumps(schema, indent=2))
    return folder


def _schema(path: Path) -> dict:
    """schema.json, with its column lists checked."""
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:  # not JSON, not UTF-8, unreadable
        raise DataError(f"{path}: not readable as a dataset's schema ({first_line(err)})") from None
    for role in ("features", "targets"):
        names = schema.get(role) if isinstance(schema, dict) else None
        if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
            raise DataError(f"{path}: {role!r} must list the column names, got {names!r}")
    truth = schema.get("truth")
    if truth is not None and not (isinstance(truth, dict) and {"weight", "bias"} <= set(truth)):
        raise DataError(f"{path}: 'truth' must hold the true 'weight' and 'bias'")
    return schema


def read(folder: Path) -> Dataset:
    """Read back what :func:`write` wrote."""
    schema_file = folder / "schema.json"
    if not schema_file.is_file():
        raise DataError(f"{folder}: not a dataset written by `pipeline generate` (no schema.json)")
    schema = _schema(schema_file)
    dataset = read_table(folder / "data.parquet", schema["features"], schema["targets"])
    if truth := schema.get("truth"):
        dataset = dataclasses.replace(
            dataset, true_weight=np.array(truth["weight"]), true_bias=np.array(truth["bias"])
        )
    return dataset
