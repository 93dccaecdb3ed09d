"""Evaluation: error metrics, the closed-form least-squares optimum, and the gap to it.

Pure functions on arrays; :func:`evaluate` returns a ``dict[str, float]`` ready to log.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.dataset import Dataset
from pipeline.loss import squared_error


def regression_metrics(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """MSE, RMSE and MAE over every element; R² averaged over the target columns."""
    error = pred - target
    mse = float(squared_error(pred, target))
    centred = target - target.mean(axis=0)
    total = np.sum(centred**2, axis=0)
    residual = np.sum(error**2, axis=0)
    # A constant target column has no variance to explain: R² is 1 for a perfect fit, else 0.
    r2_columns = np.where(total > 0, 1 - residual / np.where(total > 0, total, 1), 0.0)
    r2_columns = np.where((total == 0) & (residual == 0), 1.0, r2_columns)
    return {
        "mse": mse,
        "rmse": float(np.sqrt(mse)),
        "mae": float(np.mean(np.abs(error))),
        "r2": float(np.mean(r2_columns)),
    }


def least_squares(
    features: np.ndarray, targets: np.ndarray, fit_bias: bool = True
) -> tuple[np.ndarray, np.ndarray | None]:
    """The closed-form optimum of mean squared error for ``x @ weight.T + bias``.

    Solved with ``torch.linalg.lstsq`` in float64 on the CPU (the GELSD driver copes with
    rank-deficient data, such as repeated rows). With a bias, on centred columns: beside a
    column of ones, features far from zero (timestamps near 1.7e9) make a matrix so
    ill-conditioned that GELSD drops the bias direction.
    """
    x = torch.as_tensor(features, dtype=torch.float64)
    y = torch.as_tensor(targets, dtype=torch.float64)
    if not fit_bias:
        return torch.linalg.lstsq(x, y, driver="gelsd").solution.T.numpy(), None  # (k, d)
    x_mean, y_mean = x.mean(dim=0), y.mean(dim=0)
    weight = torch.linalg.lstsq(x - x_mean, y - y_mean, driver="gelsd").solution.T  # (k, d)
    return weight.numpy(), (y_mean - weight @ x_mean).numpy()


def predict_linear(features: np.ndarray, weight: np.ndarray, bias: np.ndarray | None):
    out = features @ weight.T
    return out if bias is None else out + bias


def evaluate(
    predictions: np.ndarray, dataset: Dataset, fit_bias: bool = True
) -> dict[str, float]:
    """Metrics of ``predictions`` on ``dataset``, the least-squares optimum and the gap to it.

    ``optimality_gap`` is the model's MSE minus the optimum's on the same rows: how far
    gradient descent stopped from the best any linear model can do here.
    """
    metrics = regression_metrics(predictions, dataset.targets)
    weight, bias = least_squares(dataset.features, dataset.targets, fit_bias)
    optimum = regression_metrics(predict_linear(dataset.features, weight, bias), dataset.targets)
    metrics["optimum_mse"] = optimum["mse"]
    metrics["optimality_gap"] = metrics["mse"] - optimum["mse"]
    return metrics


def parameter_errors(
    weight: np.ndarray, bias: np.ndarray | None, dataset: Dataset
) -> dict[str, float]:
    """Distance of learned parameters from the true ones, where the data's recipe knows them."""
    if dataset.true_weight is None:
        return {}
    errors = {"weight_error": float(np.linalg.norm(weight - dataset.true_weight))}
    if bias is not None:
        errors["bias_error"] = float(np.linalg.norm(bias - dataset.true_bias))
    return errors
