"""Logged models in use: parse a model URI, load the model safely, predict a table of rows.

    pipeline predict --model models:/crop_yields_builtin@champion --input rows.csv

Models are stored in torch.export (``pt2``) form, which loads without unpickling. A model stored
as a pickle (``model.pth``, which can run arbitrary code when loaded) is refused unless the user
says otherwise with ``--allow-pickle``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline import data
from pipeline.errors import UserError

PREDICT_CHUNK_ROWS = 1 << 16
URI_FORMS = "models:/NAME@ALIAS, models:/NAME/VERSION, models:/m-<id>, runs:/<run id>/PATH"
_REGISTERED = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")
_LOGGED = re.compile(r"^models:/m-[0-9a-f]+$")
_RUN = re.compile(r"^runs:/[0-9a-f]+/.+$")


class ModelError(UserError):
    """A model URI that does not parse, names nothing, or points at files that do not load."""


@dataclass
class LoadedModel:
    uri: str
    module: torch.nn.Module
    feature_names: tuple[str, ...]
    target_names: tuple[str, ...]
    dtype: torch.dtype
    device: torch.device

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Predictions as float64, in chunks so that millions of rows fit in memory."""
        outputs = []
        with torch.no_grad():
            for start in range(0, len(features), PREDICT_CHUNK_ROWS):
                chunk = torch.as_tensor(features[start:start + PREDICT_CHUNK_ROWS],
                                        dtype=self.dtype, device=self.device)
                outputs.append(self.module(chunk).double().cpu().numpy())
        return np.concatenate(outputs) if outputs else np.empty((0, len(self.target_names)))

    def parameters(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Weight and bias of the linear model, whichever of the two kinds it is."""
        state = {name.rsplit(".", 1)[-1]: value
                 for name, value in self.module.state_dict().items()}
        weight = state["weight"].double().cpu().numpy()
        bias = state.get("bias", state.get("offset"))
        return weight, None if bias is None else bias.double().cpu().numpy()


def check_uri(uri: str) -> None:
    """Refuse a URI that is none of the forms below (or an existing local folder)."""
    if _REGISTERED.match(uri) or _LOGGED.match(uri) or _RUN.match(uri):
        return
    local = uri.removeprefix("file://")
    if "://" not in local and ":/" not in local and Path(local).is_dir():
        return
    raise ModelError(f"model URI {uri!r} does not parse; use {URI_FORMS} or a model folder")


def _check_registered(uri: str) -> None:
    """Name the missing part (model, alias or version) instead of MLflow's longer error."""
    match = _REGISTERED.match(uri)
    if not match:
        return
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    name = match["name"]
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise ModelError(f"no registered model named {name!r} (see `pipeline models`)") from None
    try:
        if match["alias"]:
            client.get_model_version_by_alias(name, match["alias"])
        else:
            client.get_model_version(name, match["version"])
    except MlflowException:
        what = f"alias {match['alias']!r}" if match["alias"] else f"version {match['version']}"
        raise ModelError(f"registered model {name!r} has no {what}") from None


def load(uri: str, device: torch.device | None = None, allow_pickle: bool = False) -> LoadedModel:
    """Load a logged pytorch model with its feature and target names."""
    import mlflow
    import mlflow.pytorch
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    check_uri(uri)
    _check_registered(uri)
    device = device or torch.device("cpu")
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri)
        meta = Model.load(local)
        _check_not_pickled(Path(local), meta, uri, allow_pickle)
        if allow_pickle:
            os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "true"
        module = mlflow.pytorch.load_model(local)
    except (MlflowException, OSError, RuntimeError) as err:
        message = (getattr(err, "message", None) or str(err) or type(err).__name__)
        raise ModelError(f"cannot load model {uri}: {message.strip().splitlines()[0]}") from None
    module = module.to(device)
    inputs = meta.signature.inputs.inputs if meta.signature else []
    dtype = getattr(torch, str(inputs[0].type)) if inputs else torch.float32
    metadata = meta.metadata or {}
    n_features = inputs[0].shape[-1] if inputs else None
    features = tuple(metadata.get("feature_names") or _names("x", n_features))
    targets = tuple(metadata.get("target_names") or ())
    return LoadedModel(uri, module, features, targets, dtype, device)


def _check_not_pickled(local: Path, meta, uri: str, allow_pickle: bool) -> None:
    flavor = meta.flavors.get("pytorch")
    if flavor is None:
        raise ModelError(f"cannot load model {uri}: it has no pytorch flavor")
    if not allow_pickle and not (local / flavor["model_data"] / "model.pt2").is_file():
        raise ModelError(f"model {uri} is stored as a pickle, which can run code when loaded; "
                         "pass --allow-pickle if you trust its source")


def _names(prefix: str, count: int | None) -> tuple[str, ...]:
    if not count:
        raise ModelError("the model records neither feature names nor an input signature")
    return (prefix,) if count == 1 else tuple(f"{prefix}{i}" for i in range(count))


def read_features(path: str | Path, feature_names: tuple[str, ...]) -> np.ndarray:
    """The model's feature columns from a CSV, by name; missing or extra columns are refused."""
    frame = data.read_frame(path)
    columns = [str(c) for c in frame.columns]
    missing = [name for name in feature_names if name not in columns]
    extra = [name for name in columns if name not in feature_names]
    expected = ", ".join(feature_names)
    if missing:
        raise data.DataError(
            f"{path}: no column named {', '.join(missing)} (the model takes {expected})")
    if extra:
        raise data.DataError(
            f"{path}: unexpected column {', '.join(extra)} (the model takes {expected})")
    return data.numeric_matrix(frame, feature_names, path)


def prediction_frame(predictions: np.ndarray, target_names: tuple[str, ...]):
    import pandas as pd

    names = target_names or tuple(f"prediction{i}" for i in range(predictions.shape[1]))
    return pd.DataFrame(predictions, columns=list(names))
