"""Logged models in use: load a model safely, predict a table of rows by column name.

    pipeline predict --model models:/crop_yields_builtin@champion --input rows.csv

Models are stored in torch.export (``pt2``) form, which loads without unpickling. A model folder
that MLflow would load through a pickle (a ``model.pth``, a pickled pyfunc) or through code of its
own is refused unless the user says otherwise with ``--allow-pickle``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline import data, model_format, tables
from pipeline.errors import UserError, first_line
from pipeline.model_uris import ModelError, check_registered, check_uri

PICKLE_ENV = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"
PREDICT_CHUNK_ROWS = 1 << 16


@dataclass
class LoadedModel:
    module: torch.nn.Module
    feature_names: tuple[str, ...]
    target_names: tuple[str, ...]
    dtype: torch.dtype
    device: torch.device

    @property
    def output_dtype(self) -> torch.dtype:
        """The dtype of the predictions: the parameters' (a model that scales its features
        takes them in float64 and may compute in float32)."""
        return next((p.dtype for p in self.module.parameters()), self.dtype)

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Predictions as float64, in chunks so that millions of rows fit in memory; rows
        whose prediction overflows the model's dtype are refused. Each row's values are
        stored together, as the pyfunc face stores them: a product's rounding depends on the
        layout, and a row's prediction is then the same to the bit on every path."""
        outputs = []
        with torch.no_grad():
            for start in range(0, len(features), PREDICT_CHUNK_ROWS):
                chunk = torch.as_tensor(
                    np.ascontiguousarray(features[start:start + PREDICT_CHUNK_ROWS]),
                    dtype=self.dtype, device=self.device)
                outputs.append(self.module(chunk).double().cpu().numpy())
        predicted = (np.concatenate(outputs) if outputs
                     else np.empty((0, len(self.target_names))))
        if not np.isfinite(predicted).all():
            row = int(np.flatnonzero(~np.isfinite(predicted).all(axis=1))[0])
            raise data.DataError(
                f"the prediction for data row {row + 1} overflows the model's numbers: its "
                "inputs are too large for it")
        return predicted

    def parameters(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Weight and bias of the linear model, whichever of the two kinds it is, in the
        units of the raw features (a model trained on scaled ones has its scaling folded in:
        exact without a ReLU)."""
        state = {name.rsplit(".", 1)[-1]: value.double().cpu().numpy()
                 for name, value in self.module.state_dict().items()}
        weight = state["weight"]
        bias = state.get("bias", state.get("offset"))
        if "mean" in state and "std" in state:
            weight = weight / state["std"]
            bias = (0.0 if bias is None else bias) - weight @ state["mean"]
        return weight, bias


PICKLE_HINT = "`pipeline predict --allow-pickle` skips these checks, for a source you trust"


def load(uri: str, device: torch.device | None = None, allow_pickle: bool = False,
         refusal_hint: str = PICKLE_HINT) -> LoadedModel:
    """Load a logged model with its feature and target names, refusing unsafe folders.

    Without ``allow_pickle`` the folder must pass :func:`model_format.check_safe`, and MLflow's
    own pickle permission is turned off while it loads (so it checks the ``pt2`` archive too).
    ``refusal_hint`` ends the message of a refused folder: what the user can do about it.
    """
    import mlflow
    import mlflow.pytorch
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    check_uri(uri)
    check_registered(uri)
    device = device or torch.device("cpu")
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
        meta = Model.load(str(local))
        model_format.check_pytorch(meta)
        if not allow_pickle:
            model_format.check_safe(local, meta)
        with _pickle_permission(allow_pickle), _quiet("torch.export"):
            module = mlflow.pytorch.load_model(str(local))
        features, targets = _names_of(meta)
    except model_format.UnsafeModel as err:
        raise ModelError(f"refusing to load model {uri}: {err}; {refusal_hint}") from None
    except model_format.DamagedModel as err:
        raise ModelError(f"cannot load model {uri}: {err}") from None
    except UserError:
        raise
    except MlflowException as err:
        raise ModelError(f"cannot load model {uri}: {first_line(err)}") from None
    except Exception as err:  # noqa: BLE001  (a malformed folder fails in many ways)
        raise ModelError(f"cannot load model {uri}: {type(err).__name__}: "
                         f"{first_line(err)}") from None
    module = module.to(device)
    return LoadedModel(module, features, targets, _input_dtype(meta, module), device)


def _input_dtype(meta, module: torch.nn.Module) -> torch.dtype:
    """The dtype the program takes its features in: the one its pyfunc face records (float64
    for a model with its scaling inside), else its parameters'."""
    pyfunc = (meta.flavors or {}).get("python_function") or {}
    config = pyfunc.get("config") if isinstance(pyfunc, dict) else None  # its model_config
    recorded = config.get("dtype") if isinstance(config, dict) else None
    if recorded in ("float32", "float64"):
        return getattr(torch, recorded)
    return next((p.dtype for p in module.parameters()), torch.float32)


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Hold back a library's warnings for a block: torch logs a whole traceback as warnings
    when it cannot read an archive, before the error that is reported in one line."""
    import logging

    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


@contextlib.contextmanager
def _pickle_permission(allowed: bool) -> Iterator[None]:
    """Set MLflow's pickle permission for one load, then put the environment back as it was."""
    before = os.environ.get(PICKLE_ENV)
    os.environ[PICKLE_ENV] = "true" if allowed else "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(PICKLE_ENV, None)
        else:
            os.environ[PICKLE_ENV] = before


def _names_of(meta) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Feature and target names from a column-based signature, else from the metadata that
    models logged before the signature carried names hold."""
    signature = meta.signature
    if signature is not None and signature.inputs.has_input_names():
        targets = signature.outputs.input_names() if signature.outputs else []
        return tuple(signature.inputs.input_names()), tuple(targets)
    metadata = meta.metadata or {}
    inputs = signature.inputs.inputs if signature else []
    n_features = inputs[0].shape[-1] if inputs else None
    features = tuple(metadata.get("feature_names") or _names("x", n_features))
    return features, tuple(metadata.get("target_names") or ())


def _names(prefix: str, count: int | None) -> tuple[str, ...]:
    if not count:
        raise ModelError("the model records neither feature names nor an input signature")
    return (prefix,) if count == 1 else tuple(f"{prefix}{i}" for i in range(count))


def read_features(path: str | Path, model: LoadedModel) -> np.ndarray:
    """The model's feature columns from a CSV, by name; missing or extra columns are refused,
    and so are values the model's dtype cannot hold."""
    features = _named_columns(path, model.feature_names)
    check_range(features, model.feature_names, model.dtype, f"{path}: ")
    return features


def check_range(values: np.ndarray, names: tuple[str, ...], dtype: torch.dtype,
                where: str = "") -> None:
    """Refuse values beyond what ``dtype`` holds: cast, they would become inf, and so would
    every prediction made from them."""
    limit = torch.finfo(dtype).max
    if not len(values) or limit >= np.finfo(values.dtype).max:
        return
    if values.max() <= limit and values.min() >= -limit:  # no copy of the values to look
        return
    beyond = np.abs(values) > limit
    if beyond.any():
        row, column = np.argwhere(beyond)[0]
        raise data.DataError(
            f"{where}column {names[column]} holds {values[row, column]:g} in data row "
            f"{row + 1}, beyond the model's {str(dtype).removeprefix('torch.')} range "
            f"(±{limit:.3g}); rescale it")


def _named_columns(path: str | Path, feature_names: tuple[str, ...]) -> np.ndarray:
    frame = tables.read_frame(path)
    columns = [str(c) for c in frame.columns]
    missing = [name for name in feature_names if name not in columns]
    extra = [name for name in columns if name not in feature_names]
    expected = ", ".join(feature_names)
    if missing:
        raise data.DataError(f"{path}: no column named {', '.join(missing)} (the model "
                             f"takes {expected}; the file has {tables.listing(frame)})")
    if extra:
        raise data.DataError(
            f"{path}: unexpected column {', '.join(extra)} (the model takes {expected})")
    return tables.numeric_matrix(frame, feature_names, path)


def prediction_frame(predictions: np.ndarray, target_names: tuple[str, ...]):
    import pandas as pd

    names = target_names or tuple(f"prediction{i}" for i in range(predictions.shape[1]))
    return pd.DataFrame(predictions, columns=list(names))
