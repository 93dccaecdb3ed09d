"""The one squared-error function, on numpy arrays and torch tensors."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.loss import squared_error

PRED = [[1.0, 2.0], [3.0, 5.0]]
TARGET = [[0.0, 2.0], [1.0, 1.0]]  # errors 1, 0, 2, 4: squares 1, 0, 4, 16


@pytest.mark.parametrize("kind", [np.array, torch.tensor])
def test_mean_and_sum_over_every_element(kind):
    assert float(squared_error(kind(PRED), kind(TARGET))) == 21 / 4
    assert float(squared_error(kind(PRED), kind(TARGET), "sum")) == 21


@pytest.mark.parametrize("kind", [np.array, torch.tensor])
def test_one_value_per_model(kind):
    preds = kind([PRED, TARGET])  # two models: the first errs, the second is exact
    values = squared_error(preds, kind(TARGET), "mean", models=True)
    assert [float(v) for v in values] == [21 / 4, 0.0]
    assert [float(v) for v in squared_error(preds, kind(TARGET), "sum", models=True)] == [21, 0]


def test_only_the_tracking_registry_and_serving_layers_import_mlflow():
    allowed = {"registry.py", "serving.py", "model_uris.py", "model_format.py", "pyfunc_model.py"}
    package = Path(__file__).parent.parent / "pipeline"
    for path in sorted(package.rglob("*.py")):
        if path.parent.name == "tracking":
            continue  # the tracking package is MLflow's layer
        tree = ast.parse(path.read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                    if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module}
        assert "mlflow" not in imported or path.name in allowed, path.name
