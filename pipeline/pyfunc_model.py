"""The pyfunc face of a logged pipeline model: the exported program, fed its columns by name.

MLflow copies this file into every model the pipeline logs ("models from code") and runs it when
``mlflow.pyfunc.load_model`` or ``mlflow models serve`` loads the model, so it imports nothing
from the pipeline package. Before ``predict`` is called MLflow has matched the request's columns
to the signature by name and put them in training order; this class casts them to the model's
dtype and runs the ``torch.export`` program, which ``mlflow.pytorch.load_model`` reads too.
MLflow checks the program's archive for pickles only where pickles are refused; this model
refuses them unless ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION`` is set.
"""

import os
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel

CHUNK_ROWS = 1 << 16  # rows per forward pass, so millions of rows fit in memory
PICKLE_ENV = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"


class ExportedProgram(PythonModel):
    def load_context(self, context) -> None:
        # The program lives in the model's artifacts folder, which is also what the model's
        # ``pytorch`` flavor points at: load it through that flavor, pickle checks included.
        model_root = Path(context.artifacts["program"]).parent.parent
        self.program = _load_program(str(model_root))
        config = context.model_config
        self.features = list(config["features"])
        self.targets = list(config["targets"])
        self.dtype = config["dtype"]

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        if isinstance(model_input, pd.DataFrame):
            values = model_input[self.features].to_numpy(dtype=np.float64)
            index = model_input.index
        else:
            values = np.asarray(model_input, dtype=np.float64)
            index = None
        # inf, NaN, or beyond what the model's dtype holds (cast, it would become inf): no
        # number to predict from.
        bad = ~(np.abs(values) <= np.finfo(self.dtype).max)
        if bad.any():
            row, column = np.argwhere(bad)[0] if values.ndim == 2 else (0, 0)
            _refuse(f"column {self.features[column]} holds {values[row, column]:g} in row "
                    f"{row + 1}: not a finite number the model's {self.dtype} holds")
        # Rows stored together, as `pipeline predict` passes them: a product's rounding
        # depends on the layout, and each row's prediction is then the same on every path.
        values = np.ascontiguousarray(values, dtype=self.dtype)
        outputs = []
        with torch.no_grad():
            for start in range(0, len(values), CHUNK_ROWS):
                chunk = torch.tensor(values[start:start + CHUNK_ROWS])
                outputs.append(self.program(chunk).double().numpy())
        predicted = np.concatenate(outputs) if outputs else np.empty((0, len(self.targets)))
        if not np.isfinite(predicted).all():  # inputs near float32's limit overflow the output
            row = int(np.flatnonzero(~np.isfinite(predicted).all(axis=1))[0])
            _refuse(f"the prediction for row {row + 1} overflows the model's numbers: its "
                    "inputs are too large for this model")
        return pd.DataFrame(predicted, columns=self.targets, index=index)


def _load_program(model_root: str):
    """The program through the ``pytorch`` flavor, pickles refused (so MLflow checks the
    archive for them) unless the user set ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION``."""
    if PICKLE_ENV in os.environ:
        return mlflow.pytorch.load_model(model_root)
    os.environ[PICKLE_ENV] = "false"
    try:
        return mlflow.pytorch.load_model(model_root)
    finally:
        os.environ.pop(PICKLE_ENV, None)


def _refuse(message: str) -> None:
    """An input the model cannot answer: a 400 with this message from `mlflow models serve`
    (a plain ValueError would be a 500 that hides it in a stack trace)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    raise MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


mlflow.models.set_model(ExportedProgram())
