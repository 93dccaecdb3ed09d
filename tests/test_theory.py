"""Theory: the Hessian of squared error, the stable and the best constant lr, the optimum loss.

Each answer is computed here independently: by hand on a three-point line, by torch autograd's
Hessian of the loss, by numpy's least squares, and by iterating gradient descent itself.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import config, data, theory
from pipeline.data import Dataset

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"

# y = [1, 2, 4] at x = [0, 1, 2]: no line passes through all three points.
X3 = np.array([[0.0], [1.0], [2.0]])
Y3 = np.array([[1.0], [2.0], [4.0]])


def dataset(features, targets) -> Dataset:
    features = np.asarray(features, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64)
    names = tuple(f"x{i}" for i in range(features.shape[1]))
    return Dataset(features, targets, names, tuple(f"y{i}" for i in range(targets.shape[1])))


def built(name: str) -> Dataset:
    exp = config.load(str(EXPERIMENTS / f"{name}.yaml"))
    return data.build(exp.data, exp.seed)


def autograd_hessian(features, targets, fit_bias: bool, reduction: str) -> np.ndarray:
    """The Hessian of the training loss in every parameter (weights, then biases), by autograd."""
    x = torch.as_tensor(features, dtype=torch.float64)
    y = torch.as_tensor(targets, dtype=torch.float64)
    k, d = y.shape[1], x.shape[1]

    def loss(theta):
        weight = theta[: k * d].reshape(k, d)
        out = x @ weight.T
        if fit_bias:
            out = out + theta[k * d:]
        squared = (out - y) ** 2
        return squared.mean() if reduction == "mean" else squared.sum()

    theta = torch.zeros(k * d + (k if fit_bias else 0), dtype=torch.float64)
    return torch.autograd.functional.hessian(loss, theta).numpy()


def lstsq_optimum(features, targets, fit_bias: bool, reduction: str) -> float:
    x = np.hstack([features, np.ones((len(features), 1))]) if fit_bias else features
    solution = np.linalg.lstsq(x, targets, rcond=None)[0]
    squared = (x @ solution - targets) ** 2
    return float(squared.mean() if reduction == "mean" else squared.sum())


def spectral_radius(hessian: np.ndarray, lr: float) -> float:
    """How much one gradient step at ``lr`` multiplies the worst error direction by."""
    step = np.eye(len(hessian)) - lr * hessian
    return float(np.max(np.abs(np.linalg.eigvals(step))))


# --- by hand --------------------------------------------------------------------------------------


def test_three_points_with_bias_mean_by_hand():
    # X̃ᵀX̃ = [[5, 3], [3, 3]]: eigenvalues 4 ± √10; the mean over 3 rows gives H = (2/3)·X̃ᵀX̃.
    rates = theory.learning_rates(dataset(X3, Y3), fit_bias=True, reduction="mean")
    assert rates["hessian_lambda_max"] == pytest.approx(2 / 3 * (4 + math.sqrt(10)), rel=1e-12)
    assert rates["hessian_lambda_min"] == pytest.approx(2 / 3 * (4 - math.sqrt(10)), rel=1e-12)
    assert rates["lr_max_stable"] == pytest.approx(3 / (4 + math.sqrt(10)), rel=1e-12)
    # λ_min + λ_max = (2/3)·trace = 16/3, so the best rate is 2 / (16/3).
    assert rates["lr_best_constant"] == pytest.approx(3 / 8, rel=1e-12)
    # Best line y = 1.5x + 5/6: residuals 1/6, -1/3, 1/6; squared 1/36 + 4/36 + 1/36 = 1/6.
    assert rates["optimum_loss"] == pytest.approx(1 / 18, rel=1e-12)


def test_three_points_with_bias_sum_by_hand():
    # Summed error: H = 2·X̃ᵀX̃, n·k = 3 times the mean's Hessian, so every rate is a third.
    rates = theory.learning_rates(dataset(X3, Y3), fit_bias=True, reduction="sum")
    assert rates["hessian_lambda_max"] == pytest.approx(2 * (4 + math.sqrt(10)), rel=1e-12)
    assert rates["hessian_lambda_min"] == pytest.approx(2 * (4 - math.sqrt(10)), rel=1e-12)
    assert rates["lr_max_stable"] == pytest.approx(1 / (4 + math.sqrt(10)), rel=1e-12)
    assert rates["lr_best_constant"] == pytest.approx(1 / 8, rel=1e-12)
    assert rates["optimum_loss"] == pytest.approx(1 / 6, rel=1e-12)


@pytest.mark.parametrize(("reduction", "curvature", "optimum"), [("mean", 10 / 3, 1 / 3),
                                                                 ("sum", 10.0, 1.0)])
def test_three_points_without_bias_by_hand(reduction, curvature, optimum):
    # w·x alone: Σx² = 5, one eigenvalue 2·5/3 (mean) or 2·5 (sum); λ_min = λ_max.
    # The best slope Σxy/Σx² = 10/5 = 2 misses only the first point, by 1.
    rates = theory.learning_rates(dataset(X3, Y3), fit_bias=False, reduction=reduction)
    assert rates["hessian_lambda_max"] == pytest.approx(curvature, rel=1e-12)
    assert rates["hessian_lambda_min"] == pytest.approx(curvature, rel=1e-12)
    assert rates["lr_max_stable"] == pytest.approx(2 / curvature, rel=1e-12)
    # With one direction the best rate is half the edge: it lands on the optimum in one step.
    assert rates["lr_best_constant"] == pytest.approx(1 / curvature, rel=1e-12)
    assert rates["optimum_loss"] == pytest.approx(optimum, rel=1e-12)


def test_two_targets_mean_divides_by_every_element():
    # Two target columns double the elements the mean divides by: half the curvature of one.
    one = theory.learning_rates(dataset(X3, Y3), fit_bias=True, reduction="mean")
    two = theory.learning_rates(dataset(X3, np.hstack([Y3, -Y3])), fit_bias=True,
                                reduction="mean")
    assert two["hessian_lambda_max"] == pytest.approx(one["hessian_lambda_max"] / 2, rel=1e-12)
    assert two["lr_max_stable"] == pytest.approx(2 * one["lr_max_stable"], rel=1e-12)
    # The mirrored column fits exactly as badly: the mean squared error is unchanged.
    assert two["optimum_loss"] == pytest.approx(1 / 18, rel=1e-12)


def test_exact_line_has_zero_optimum():
    rates = theory.learning_rates(built("line_2x_plus_1"), fit_bias=True, reduction="mean")
    assert rates["optimum_loss"] == pytest.approx(0.0, abs=1e-20)


# --- against autograd, numpy and gradient descent -------------------------------------------------


CASES = [
    pytest.param("line_fit_15pts", True, id="line_fit_15pts"),
    pytest.param("crop_yields_manual", True, id="crop_yields_manual"),
    pytest.param("slope_only", False, id="slope_only-no_bias"),
    pytest.param("synthetic", True, id="synthetic-2targets"),
    pytest.param("synthetic", False, id="synthetic-2targets-no_bias"),
]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(("name", "fit_bias"), CASES)
def test_rates_match_the_eigenvalues_of_the_autograd_hessian(name, fit_bias, reduction):
    dataset_ = built(name)
    hessian = autograd_hessian(dataset_.features, dataset_.targets, fit_bias, reduction)
    eigenvalues = np.linalg.eigvalsh(hessian)
    rates = theory.learning_rates(dataset_, fit_bias, reduction)
    assert rates["hessian_lambda_max"] == pytest.approx(eigenvalues[-1], rel=1e-9)
    assert rates["hessian_lambda_min"] == pytest.approx(eigenvalues[0], rel=1e-6,
                                                        abs=1e-9 * eigenvalues[-1])
    assert rates["lr_max_stable"] == pytest.approx(2 / eigenvalues[-1], rel=1e-9)
    assert rates["lr_best_constant"] == pytest.approx(
        2 / (eigenvalues[0] + eigenvalues[-1]), rel=1e-9)
    expected = lstsq_optimum(dataset_.features, dataset_.targets, fit_bias, reduction)
    assert rates["optimum_loss"] == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_sum_rates_are_mean_rates_divided_by_the_element_count():
    dataset_ = built("synthetic")  # 2000 rows × 2 targets
    mean = theory.learning_rates(dataset_, True, "mean")
    total = theory.learning_rates(dataset_, True, "sum")
    count = dataset_.targets.size
    assert count == 4000
    assert total["hessian_lambda_max"] == pytest.approx(count * mean["hessian_lambda_max"])
    assert total["lr_max_stable"] == pytest.approx(mean["lr_max_stable"] / count)
    assert total["lr_best_constant"] == pytest.approx(mean["lr_best_constant"] / count)
    assert total["optimum_loss"] == pytest.approx(count * mean["optimum_loss"])


@pytest.mark.parametrize(("name", "fit_bias"), CASES[:3])
def test_the_edge_separates_contraction_from_growth(name, fit_bias):
    dataset_ = built(name)
    hessian = autograd_hessian(dataset_.features, dataset_.targets, fit_bias, "mean")
    rates = theory.learning_rates(dataset_, fit_bias, "mean")
    assert spectral_radius(hessian, 0.99 * rates["lr_max_stable"]) < 1
    assert spectral_radius(hessian, 1.01 * rates["lr_max_stable"]) > 1


@pytest.mark.parametrize(("name", "fit_bias"), CASES[:3])
def test_the_best_constant_rate_contracts_fastest(name, fit_bias):
    dataset_ = built(name)
    hessian = autograd_hessian(dataset_.features, dataset_.targets, fit_bias, "mean")
    rates = theory.learning_rates(dataset_, fit_bias, "mean")
    best = spectral_radius(hessian, rates["lr_best_constant"])
    kappa = rates["hessian_lambda_max"] / rates["hessian_lambda_min"]
    assert best == pytest.approx((kappa - 1) / (kappa + 1), abs=1e-9)
    for factor in (0.9, 0.99, 1.01, 1.1):
        assert spectral_radius(hessian, factor * rates["lr_best_constant"]) > best


def test_gradient_descent_reaches_the_optimum_loss():
    # Plain numpy descent on the three points at the best rate ends at theory's optimum.
    rates = theory.learning_rates(dataset(X3, Y3), fit_bias=True, reduction="mean")
    x = np.hstack([X3, np.ones((3, 1))])
    theta = np.zeros((2, 1))
    for _ in range(200):
        theta -= rates["lr_best_constant"] * 2 / 3 * x.T @ (x @ theta - Y3)
    np.testing.assert_allclose(theta.ravel(), [1.5, 5 / 6], rtol=1e-10)
    assert np.mean((x @ theta - Y3) ** 2) == pytest.approx(rates["optimum_loss"], rel=1e-10)


def test_default_lr_range_spans_three_decades_below_the_edge():
    rates = theory.learning_rates(dataset(X3, Y3), fit_bias=False, reduction="mean")
    low, high = theory.default_lr_range(rates)
    assert high == pytest.approx(0.6, rel=1e-12)  # 2 / (10/3)
    assert low == pytest.approx(6e-4, rel=1e-12)


# --- known problems -------------------------------------------------------------------------------


def test_best_rate_converges_when_a_direction_is_flat():
    # x is 2 on every row: x and the bias column are parallel; eigenvalues 0 and 10 (mean).
    flat = dataset([[2.0], [2.0], [2.0]], [[1.0], [2.0], [3.0]])
    rates = theory.learning_rates(flat, fit_bias=True, reduction="mean")
    assert rates["hessian_lambda_min"] == pytest.approx(0.0, abs=1e-12)
    assert rates["hessian_lambda_max"] == pytest.approx(10.0)
    x = np.hstack([flat.features, np.ones((3, 1))])
    theta = np.zeros((2, 1))
    for _ in range(100):
        theta -= rates["lr_best_constant"] * 2 / 3 * x.T @ (x @ theta - flat.targets)
    assert np.mean((x @ theta - flat.targets) ** 2) == pytest.approx(rates["optimum_loss"],
                                                                     rel=1e-6)
