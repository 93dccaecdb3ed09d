"""What theory says about the learning rate, before any trial runs.

For full-batch gradient descent on squared error, the loss is quadratic in the parameters
θ = (weight, bias):  L(θ) = c·‖X̃θ - y‖² with X̃ = [X, 1] and c = 1/(n·k) for the mean, 1 for the
sum. Its Hessian H = 2c·X̃ᵀX̃ is constant, so each step multiplies the error θ - θ* by (I - lr·H):

- descent converges only for lr < 2/λ_max (the largest stable learning rate);
- the fastest constant rate is lr = 2/(λ_min + λ_max), where the slowest and fastest directions
  contract equally, by (κ - 1)/(κ + 1) per step with κ = λ_max/λ_min;
- the loss it converges to is the least-squares optimum, in closed form.

Mini-batches and a ReLU change the picture (noisier steps, a piecewise-linear model), so for them
these numbers are a guide rather than a guarantee.
"""

from __future__ import annotations

import numpy as np

from pipeline.dataset import Dataset
from pipeline.evaluate import least_squares, predict_linear
from pipeline.loss import squared_error


def learning_rates(dataset: Dataset, fit_bias: bool, reduction: str) -> dict[str, float]:
    """Hessian eigenvalues, the stable and the best constant lr, and the optimum loss."""
    x = dataset.features
    n, k = dataset.targets.shape
    gram = x.T @ x
    if fit_bias:  # X̃ = [X 1] without copying X: its Gram matrix bordered by the column sums
        sums = x.sum(axis=0)
        gram = np.block([[gram, sums[:, None]], [sums[None, :], np.array([[float(n)]])]])
    scale = 2.0 / (n * k) if reduction == "mean" else 2.0
    eigenvalues = np.linalg.eigvalsh(scale * gram)
    lambda_max = float(eigenvalues[-1])
    # A direction of zero curvature (collinear columns) never moves, whatever the rate: the
    # rate that is best for the others comes from the smallest curvature that is not zero.
    curved = eigenvalues[eigenvalues > lambda_max * 1e-12]
    lambda_min = float(max(eigenvalues[0], 0.0))
    lambda_curved = float(curved[0]) if len(curved) else 0.0
    optimum = optimum_loss(dataset, fit_bias, reduction)
    return {
        "hessian_lambda_min": lambda_min,
        "hessian_lambda_max": lambda_max,
        "lr_max_stable": 2.0 / lambda_max,
        "lr_best_constant": 2.0 / (lambda_curved + lambda_max),
        "optimum_loss": optimum,
    }


def optimum_loss(dataset: Dataset, fit_bias: bool, reduction: str) -> float:
    """The lowest loss any linear model reaches on these rows: least squares on them."""
    weight, bias = least_squares(dataset.features, dataset.targets, fit_bias)
    return float(squared_error(predict_linear(dataset.features, weight, bias), dataset.targets,
                               reduction))


def range_notes(lr: tuple[float, float], rates: dict[str, float]) -> list[str]:
    """What a sweep's lr range leaves out that theory says matters."""
    best, edge = rates["lr_best_constant"], rates["lr_max_stable"]
    if lr[0] <= best <= lr[1]:
        return []
    where = "above" if best > lr[1] else "below"
    return [f"warning: theory's best constant lr {best:.4g} lies {where} the lr range "
            f"[{lr[0]:.3g}, {lr[1]:.3g}] (largest stable lr {edge:.4g}); the best lr found "
            "will sit at the range's edge: widen it with --lr-range"]


def exact_for(config, n_rows: int) -> bool:
    """Whether these numbers are exact for ``config`` (full-batch descent, no ReLU) rather than
    a guide; also where sweeps may run the closed form (:mod:`pipeline.engine`)."""
    full_batch = config.batch_size is None or config.batch_size >= n_rows
    return full_batch and config.activation == "none"


def default_lr_range(rates: dict[str, float]) -> tuple[float, float]:
    """Three decades below the stability edge, up to the edge itself."""
    return rates["lr_max_stable"] * 1e-3, rates["lr_max_stable"]
