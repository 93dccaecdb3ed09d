"""Evaluation: error metrics, the least-squares optimum, and the gap between a model and it."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from pipeline import config, data
from pipeline.evaluate import (
    evaluate,
    least_squares,
    parameter_errors,
    predict_linear,
    regression_metrics,
)
from pipeline.recipes import SyntheticData

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def built(name: str) -> data.Dataset:
    # By path, so the test does not depend on the working directory or $PIPELINE_EXPERIMENTS_DIR.
    exp = config.load(str(EXPERIMENTS / f"{name}.yaml"))
    return data.build(exp.data, exp.seed)


def synthetic(noise: float, seed: int = 0) -> data.Dataset:
    return data.build(SyntheticData(n_rows=40, n_features=3, n_targets=2, noise=noise), seed)


# --- metrics --------------------------------------------------------------------------------------


def test_regression_metrics_by_hand():
    target = np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 2.0], [4.0, 2.0]])
    pred = np.array([[1.0, 0.0], [3.0, 2.0], [2.0, 2.0], [4.0, 2.0]])
    # errors: column 0 [0, 1, -1, 0], column 1 [0, 2, 0, 0]
    # mse over all 8 elements: (1 + 1 + 4) / 8; mae: (1 + 1 + 2) / 8
    # R² column 0: 1 - 2/5 (target mean 2.5); column 1: 1 - 4/4 (mean 1); averaged.
    metrics = regression_metrics(pred, target)
    assert metrics["mse"] == pytest.approx(0.75, abs=1e-15)
    assert metrics["rmse"] == pytest.approx(math.sqrt(0.75), abs=1e-15)
    assert metrics["mae"] == pytest.approx(0.5, abs=1e-15)
    assert metrics["r2"] == pytest.approx(0.3, abs=1e-15)
    assert set(metrics) == {"mse", "rmse", "mae", "r2"}
    assert all(type(value) is float for value in metrics.values())


def test_perfect_predictions_score_r2_one():
    target = np.array([[1.0, -2.0], [2.0, 5.0], [7.0, 0.5]])
    metrics = regression_metrics(target.copy(), target)
    assert metrics == {"mse": 0.0, "rmse": 0.0, "mae": 0.0, "r2": 1.0}


def test_predicting_the_mean_scores_r2_zero():
    target = np.array([[1.0], [2.0], [6.0]])
    assert regression_metrics(np.full_like(target, 3.0), target)["r2"] == pytest.approx(0.0)


@pytest.mark.parametrize(("pred", "r2"), [(5.0, 1.0), (4.0, 0.0)])
def test_constant_target_column(pred, r2):
    # No variance to explain: a perfect fit scores 1, anything else 0 rather than -inf or nan.
    target = np.full((3, 1), 5.0)
    assert regression_metrics(np.full_like(target, pred), target)["r2"] == r2


# --- least squares --------------------------------------------------------------------------------


def test_least_squares_recovers_exact_weights_and_bias():
    dataset = synthetic(noise=0.0)
    weight, bias = least_squares(dataset.features, dataset.targets)
    assert weight.shape == (2, 3)
    assert bias.shape == (2,)
    np.testing.assert_allclose(weight, dataset.true_weight, atol=1e-10)
    np.testing.assert_allclose(bias, dataset.true_bias, atol=1e-10)


def test_least_squares_without_bias_recovers_exact_weights():
    rng = np.random.default_rng(1)
    features = rng.standard_normal((30, 4))
    true_weight = rng.standard_normal((3, 4))
    weight, bias = least_squares(features, features @ true_weight.T, fit_bias=False)
    assert bias is None
    assert weight.shape == (3, 4)
    np.testing.assert_allclose(weight, true_weight, atol=1e-10)


def test_least_squares_recovers_the_line_experiment():
    dataset = built("line_2x_plus_1")
    weight, bias = least_squares(dataset.features, dataset.targets)
    np.testing.assert_allclose(weight, [[2.0]], atol=1e-12)
    np.testing.assert_allclose(bias, [1.0], atol=1e-12)


@pytest.mark.parametrize("fit_bias", [True, False])
def test_least_squares_matches_numpy_on_noisy_data(fit_bias):
    dataset = synthetic(noise=0.5, seed=3)
    x = dataset.features
    if fit_bias:
        x = np.hstack([x, np.ones((x.shape[0], 1))])
    expected = np.linalg.lstsq(x, dataset.targets, rcond=None)[0].T  # (k, d[+1])
    weight, bias = least_squares(dataset.features, dataset.targets, fit_bias)
    if fit_bias:
        np.testing.assert_allclose(weight, expected[:, :-1], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(bias, expected[:, -1], rtol=1e-10, atol=1e-12)
    else:
        np.testing.assert_allclose(weight, expected, rtol=1e-10, atol=1e-12)


def test_least_squares_copes_with_repeated_rows():
    # crop_yields_builtin repeats its 5 rows three times: the optimum is that of the 5 rows.
    repeated = built("crop_yields_builtin")
    once = built("crop_yields_manual")
    weight, bias = least_squares(repeated.features, repeated.targets)
    weight_once, bias_once = least_squares(once.features, once.targets)
    np.testing.assert_allclose(weight, weight_once, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(bias, bias_once, rtol=1e-8, atol=1e-10)


# --- evaluate -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["synthetic", "crop_yields_manual", "slope_only"])
@pytest.mark.parametrize("draw", [0, 1, 2])
def test_optimality_gap_is_the_distance_to_the_least_squares_optimum(name, draw):
    # For any linear model θ the residual splits into the optimum's residual and X̃(θ - θ*),
    # which are orthogonal: the gap is ‖X̃(θ - θ*)‖² / (n·k), never negative.
    dataset = built(name)
    rng = np.random.default_rng(draw)
    k, d = dataset.targets.shape[1], dataset.features.shape[1]
    weight, bias = rng.standard_normal((k, d)), rng.standard_normal(k)
    predictions = predict_linear(dataset.features, weight, bias)
    metrics = evaluate(predictions, dataset)

    x = np.hstack([dataset.features, np.ones((dataset.n_rows, 1))])
    optimum = np.linalg.lstsq(x, dataset.targets, rcond=None)[0]  # (d + 1, k)
    optimum_mse = np.mean((x @ optimum - dataset.targets) ** 2)
    theta = np.vstack([weight.T, bias])
    distance = np.sum((x @ (theta - optimum)) ** 2) / dataset.targets.size
    mse = np.mean((predictions - dataset.targets) ** 2)
    assert metrics["mse"] == pytest.approx(mse, rel=1e-12)
    assert metrics["optimum_mse"] == pytest.approx(optimum_mse, rel=1e-9, abs=1e-12)
    assert metrics["optimality_gap"] == pytest.approx(mse - optimum_mse, rel=1e-9)
    assert metrics["optimality_gap"] == pytest.approx(distance, rel=1e-7)
    assert metrics["optimality_gap"] > 0  # a random draw is not the optimum


@pytest.mark.parametrize("name", ["synthetic", "crop_yields_manual", "slope_only"])
def test_optimality_gap_is_zero_at_the_optimum(name):
    dataset = built(name)
    weight, bias = least_squares(dataset.features, dataset.targets)
    metrics = evaluate(predict_linear(dataset.features, weight, bias), dataset)
    assert abs(metrics["optimality_gap"]) <= 1e-9


def test_optimum_without_bias_is_worse_on_data_with_a_bias():
    # line_2x_plus_1 has bias 1: a line through the origin cannot fit it exactly.
    dataset = built("line_2x_plus_1")
    with_bias = evaluate(dataset.targets.copy(), dataset, fit_bias=True)
    without_bias = evaluate(dataset.targets.copy(), dataset, fit_bias=False)
    assert with_bias["optimum_mse"] == pytest.approx(0.0, abs=1e-20)
    assert without_bias["optimum_mse"] > 0.01


# --- parameter errors -----------------------------------------------------------------------------


def test_parameter_errors_empty_without_truth():
    dataset = built("crop_yields_manual")
    assert dataset.true_weight is None
    assert parameter_errors(np.zeros((2, 3)), np.zeros(2), dataset) == {}


def test_parameter_errors_measure_distance_from_truth():
    dataset = built("line_2x_plus_1")  # weight [[2]], bias [1]
    errors = parameter_errors(np.array([[5.0]]), np.array([-3.0]), dataset)
    assert errors == {"weight_error": 3.0, "bias_error": 4.0}


def test_parameter_errors_without_learned_bias_report_only_the_weight():
    dataset = synthetic(noise=0.0)
    errors = parameter_errors(dataset.true_weight + 1.0, None, dataset)
    # Every one of the 2 × 3 entries is off by 1: Frobenius norm sqrt(6).
    assert errors == {"weight_error": pytest.approx(math.sqrt(6))}
