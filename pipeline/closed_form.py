"""The ``statistics`` program of :mod:`pipeline.engine`: full-batch gradient descent on the
squared error of a linear model, every epoch of every trial at once, from X̃ᵀX̃, X̃ᵀY and YᵀY.

``state`` and ``watch`` are the engine's stacked trials and their curves: this module reads
``state.weight``, ``state.bias`` and ``state.lrs`` and writes the final parameters back, and
gives ``watch`` each block of epochs' losses. The engine makes each set of rows'
:class:`Statistics` once for a whole sweep.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.config import TrainConfig
from pipeline.dataset import Dataset

if TYPE_CHECKING:
    from pipeline.engine import _Stacked, _Stops


def _on(array: np.ndarray, like):
    """``array`` where ``like`` lives: itself for numpy, a copy on the device for a tensor."""
    return array if isinstance(like, np.ndarray) else torch.as_tensor(array, device=like.device)


def _offsets(head: np.ndarray) -> np.ndarray:
    """The columns' means in the rows ``head``, where they are farther from zero than the
    columns spread (elsewhere 0: summing about zero then loses at most a bit, and the rows
    need no pass to shift them)."""
    mean = head.mean(0)
    return np.where(np.abs(mean) > head.std(0), mean, 0.0)


class Statistics:
    """X̃ᵀX̃ and X̃ᵀY in float64, and the loss and gradient at any parameters. On the CPU they
    come from one symmetric product of [X 1 Y] per block of rows (BLAS syrk, half a general
    product's work), in one pass over the data.

    With a bias, the rows are summed about a shift (the first block's column means, for
    columns farther from zero than they spread): a model's residuals are the same for X - mx
    and Y - my once the bias takes mx·w - my, so losses come from moments of the size of the
    data's spread, not of its distance from zero.
    Summed unshifted, a loss near its minimum is a difference of terms like YᵀY: targets near
    1e9 left an error of 1e-16·YᵀY, larger than the loss itself."""

    ROWS = 1 << 13  # rows cast to float64 at a time: the block stays in cache

    def __init__(self, dataset: Dataset, device, config: TrainConfig) -> None:
        features, targets = dataset.features, dataset.targets
        (n, d), k = features.shape, targets.shape[1]
        self.has_bias = config.has_bias
        self.scale = 1.0 / targets.size if config.loss == "mean" else 1.0
        first = slice(0, min(n, self.ROWS))
        shift_x, shift_y = ((_offsets(features[first]), _offsets(targets[first]))
                            if self.has_bias else (np.zeros(d), np.zeros(k)))
        moments = torch.zeros(d + 1 + k, d + 1 + k, dtype=torch.float64, device=device)
        block = torch.empty(min(n, self.ROWS), d + 1 + k, dtype=torch.float64, device=device)
        if device.type == "cpu":
            moments, block = moments.numpy(), block.numpy()  # numpy's a.T @ a calls syrk
        shift = _on(np.concatenate([shift_x, [0.0], shift_y]), block)  # the ones stay ones
        shifted = bool(shift_x.any() or shift_y.any())
        block[:, d] = 1.0
        for start in range(0, n, self.ROWS):
            rows = block[:min(self.ROWS, n - start)]
            rows[:, :d] = _on(features[start:start + self.ROWS], block)
            rows[:, d + 1:] = _on(targets[start:start + self.ROWS], block)
            if shifted:
                rows -= shift  # contiguous, in cache: one pass
            moments += rows.T @ rows
        size = d + self.has_bias
        moments = torch.as_tensor(moments, device=device)
        # The shifted moments: G' = X̃'ᵀX̃', C' = X̃'ᵀY', Y'ᵀY'.
        self._gram, self._cross = moments[:size, :size], moments[:size, d + 1:]
        self._y_square = moments[d + 1:, d + 1:].trace()
        # θ' = Aθ - e_b·myᵀ gives X̃θ - Y = X̃'θ' - Y' (A adds mx·w to the bias row).
        self._a = torch.eye(size, dtype=torch.float64, device=device)
        if self.has_bias:
            self._a[d, :d] = torch.as_tensor(shift_x, device=device)
        self._shift_y = torch.as_tensor(shift_y, device=device)
        # The moments descent moves by, unshifted: X̃ = X̃'A, so X̃ᵀX̃ = AᵀG'A, and
        # X̃ᵀY = Aᵀ(C' + X̃'ᵀ1·myᵀ).
        self.gram = self._a.T @ self._gram @ self._a
        ones = self._gram[:, d:d + 1] if self.has_bias else torch.zeros_like(self._cross[:, :1])
        self.cross = self._a.T @ (self._cross + ones * self._shift_y[None, :])

    def _shifted(self, theta: torch.Tensor) -> torch.Tensor:
        shifted = self._a @ theta
        if self.has_bias:
            shifted[-1] -= self._shift_y
        return shifted

    def loss_at(self, theta: torch.Tensor) -> torch.Tensor:
        """The loss of parameters ``theta`` (D, k) on these rows."""
        shifted = self._shifted(theta)
        return self.scale * ((shifted * (self._gram @ shifted)).sum()
                             - 2 * (self._cross * shifted).sum() + self._y_square)

    def gradient_at(self, theta: torch.Tensor) -> torch.Tensor:
        """The loss's gradient at ``theta`` (D, k), with respect to ``theta``."""
        return 2 * self.scale * self._a.T @ (self._gram @ self._shifted(theta) - self._cross)

    def theta(self, state: _Stacked) -> torch.Tensor:
        """Parameters as (K, d+1, k): weight transposed, bias as the last row."""
        theta = state.weight.transpose(1, 2)
        return torch.cat([theta, state.bias[:, None, :]], dim=1) if self.has_bias else theta

    def set_theta(self, state: _Stacked, theta: torch.Tensor) -> None:
        d = state.weight.shape[2]
        state.weight.copy_(theta[:, :d, :].transpose(1, 2))
        if self.has_bias:
            state.bias.copy_(theta[:, d, :])


def descend(state: _Stacked, stats: Statistics, v: Statistics | None, watch: _Stops):
    """Full-batch descent on the squared error, every epoch of every trial at once.

    In the eigenbasis of G = X̃ᵀX̃ (G = QΛQᵀ, z = Qᵀθ, c = QᵀX̃ᵀY) an update of the loop,
    θ ← θ - 2s·lr·(Gθ - X̃ᵀY), moves each coordinate on its own: z_i ← z*_i + r_i·(z_i - z*_i)
    with z*_i = c_i/λ_i and r_i = 1 - 2s·lr·λ_i. So after t epochs z_i = z*_i + r_iᵗ·e_i
    (e = z0 - z*) and the loss is L* + s·Σ λ_i·e_i²·r_i²ᵗ: the loop's curve, in O(D·K) per
    epoch after one eigendecomposition. Directions with λ_i = 0 (to rounding: collinear
    columns) do not move. Returns ``path(trial)``: that trial's θ at every epoch.
    """
    device = state.lrs.device
    lam, q = torch.linalg.eigh(stats.gram)
    moving = lam > lam.max().clamp(min=0) * 1e-12
    safe = torch.where(moving, lam, torch.ones_like(lam))
    # (D, k): every trial starts from the same parameters (a copy: set_theta writes them).
    theta0 = stats.theta(state)[0].clone()
    z0 = q.T @ theta0
    c = q.T @ stats.cross
    z_star = torch.where(moving[:, None], c / safe[:, None], z0)
    e = torch.where(moving[:, None], z0 - z_star, torch.zeros_like(z0))
    r = 1 - 2 * stats.scale * state.lrs[:, None] * lam[None, :]  # (K, D)
    # The loss at z* + rᵗ∘e: the loss at z* (from the shifted moments) + Σ_i λ_i·|e_i|²·r_i²ᵗ.
    theta_star = q @ z_star
    at_rest = stats.loss_at(theta_star)
    weight = stats.scale * lam * e.square().sum(1)  # (D,)
    val = None
    if v is not None:
        val = (v.scale, q.T @ v.gram @ q, v.loss_at(theta_star), q.T @ v.gradient_at(theta_star))

    def losses(epochs: torch.Tensor):
        # The constants cancel where the data fit a line exactly: the rounding of yᵀY would
        # leave losses of -1e-14 where the loop, summing squares, ends at 0 or just above.
        powers = r[None] ** epochs.double()[:, None, None]  # (T, K, D)
        train = (at_rest + (powers.square() * weight).sum(-1)).clamp_(min=0)
        if val is None:
            return train, None
        scale, gram, rest, slope = val
        moved = powers[..., None] * e  # (T, K, D, k)
        quadratic = torch.einsum("tKik,ij,tKjk->tK", moved, gram, moved)
        return train, (rest + (slope * moved).sum((-2, -1)) + scale * quadratic).clamp_(min=0)

    size = len(lam) * z0.shape[1] * len(r)
    chunk = max(1, (1 << 22) // max(1, size))  # epochs per block: ~32 MiB of (T, K, D, k)
    for first in range(0, watch.last + 1, chunk):
        watch.observe_all(first, *losses(torch.arange(
            first, min(first + chunk, watch.last + 1), device=device)))
    # θ_t = θ0 + Q((rᵗ - 1)∘e): at epoch 0 exactly θ0, where Q(z* + rᵗ∘e) rounds it.
    ends = r ** watch.end.double()[:, None]  # (K, D)
    stats.set_theta(state, theta0 + q @ ((ends - 1)[..., None] * e))

    def path(trial: int) -> torch.Tensor:
        """The trial's parameters at every epoch of its curve, (epochs + 1, D, k)."""
        epochs = torch.arange(int(watch.end[trial]) + 1, device=device, dtype=torch.float64)
        return theta0 + q @ ((r[trial] ** epochs[:, None] - 1)[..., None] * e)

    return path
