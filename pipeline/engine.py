"""Many trials trained as one program: the same data, seed and batch order, different lr and epochs.

    results = train_many(config, train_set, val_set, lrs=[1e-3, 3e-3], epochs=[50, 80])

The K models' parameters are stacked along a leading trial dimension and updated together with
a vector of learning rates; each trial stops at its own epoch count, or earlier when the
callback says so (the pruner) or it diverges (the rule :func:`train.diverging` applies to
`pipeline train` too). Every trial starts from the parameters a lone `pipeline train` with the
same seed draws and sees the same batches, so its curve is that run's, to float rounding.

Two programs:

- ``loop``: the tutorials' gradient descent, vectorised over trials: any model, full batch or
  shuffled mini-batches, mean or summed squared error, ReLU included. Gradients are the squared
  error's, written out (what autograd and ``torch.optim.SGD`` compute).
- ``statistics``: full-batch descent on a linear model needs only X̃ᵀX̃, X̃ᵀY and YᵀY (X̃ is X
  with a column of ones). They are computed once, in float64; then an epoch costs O(D²·K)
  whatever the number of rows, and the curves are exact. Used where it is exact: full batch,
  no ReLU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from pipeline import models
from pipeline.config import TrainConfig
from pipeline.data import Dataset
from pipeline.train import TrainResult, batches, diverging, finish, resolve_device

# Called with (trial index, epoch, train_loss, val_loss); returning True stops that trial.
TrialCallback = Callable[[int, int, float, "float | None"], bool]


def exact_from_statistics(config: TrainConfig, n_rows: int) -> bool:
    """Whether the ``statistics`` program computes what the loop does."""
    full_batch = config.batch_size is None or config.batch_size >= n_rows
    return full_batch and config.activation == "none"


def train_many(config: TrainConfig, train_set: Dataset, val_set: Dataset | None,
               lrs: Sequence[float], epochs: Sequence[int],
               on_epoch: TrialCallback | None = None, program: str = "auto") -> list[TrainResult]:
    """Train one model per (lr, epochs) pair; their curves, as :func:`train.train` gives them."""
    if program == "auto":
        program = "statistics" if exact_from_statistics(config, train_set.n_rows) else "loop"
    device = resolve_device(config.device)
    dtype = torch.float64 if program == "statistics" else models.DTYPES[config.dtype]
    torch.manual_seed(config.seed)
    weight, bias = models.init_parameters(train_set.features.shape[1],
                                          train_set.targets.shape[1], config)
    count = len(lrs)
    state = _Stacked(weight.to(device, dtype).expand(count, -1, -1).clone(),
                     None if bias is None else bias.to(device, dtype).expand(count, -1).clone(),
                     torch.tensor(lrs, dtype=dtype, device=device), config)
    data = _Data.of(train_set, device, dtype, program, config)
    val = None if val_set is None else _Data.of(val_set, device, dtype, program, config)
    results = [TrainResult(model=None, device=device) for _ in range(count)]
    limits = torch.tensor(list(epochs), device=device)
    active = torch.ones(count, dtype=torch.bool, device=device)
    active &= ~_record(results, 0, state, data, val, active, on_epoch)
    for epoch in range(1, int(max(epochs)) + 1):
        stepping = active & (limits >= epoch)
        if not stepping.any():
            break
        data.descend(state, stepping, config)
        active = stepping & ~_record(results, epoch, state, data, val, stepping, on_epoch)
    for k, result in enumerate(results):
        result.model = models.LinearRegressor(
            state.weight[k].to(models.DTYPES[config.dtype]),
            None if state.bias is None else state.bias[k].to(models.DTYPES[config.dtype]),
            config.activation)
    return [finish(result) for result in results]


def _record(results, epoch, state, data, val, mask, on_epoch) -> torch.Tensor:
    """Append the epoch's losses of the trials in ``mask``; which of them stop here."""
    train_loss = data.losses(state).tolist()
    val_loss = val.losses(state).tolist() if val is not None else None
    stops = []
    for k, result in enumerate(results):
        if not mask[k]:
            stops.append(False)
            continue
        value = train_loss[k]
        result.train_loss.append(value)
        if val_loss is not None:
            result.val_loss.append(val_loss[k])
        if diverging(value, result.train_loss[0]):
            result.diverged_at = epoch
            stops.append(True)
        elif on_epoch is not None and on_epoch(k, epoch, value,
                                                None if val_loss is None else val_loss[k]):
            result.stopped_at = epoch
            stops.append(True)
        else:
            stops.append(False)
    return torch.tensor(stops, dtype=torch.bool, device=mask.device)


class _Stacked:
    """K models' weights (K, k, d), biases (K, k) and learning rates (K,)."""

    def __init__(self, weight, bias, lrs, config: TrainConfig) -> None:
        self.weight, self.bias, self.lrs = weight, bias, lrs
        self.relu = config.activation == "relu"
        self.clamp = config.model == "manual"  # clamp(min=0) passes a gradient at 0, ReLU not

    def predict(self, x: torch.Tensor):
        pre = torch.einsum("nd,Kkd->Knk", x, self.weight)
        out = pre.clamp(min=0) if self.relu else pre
        return (out if self.bias is None else out + self.bias[:, None, :]), pre

    def step(self, grad_weight, grad_bias, mask) -> None:
        rate = torch.where(mask, self.lrs, torch.zeros_like(self.lrs))
        self.weight -= rate[:, None, None] * grad_weight
        if self.bias is not None:
            self.bias -= rate[:, None] * grad_bias


class _Data:
    @staticmethod
    def of(dataset: Dataset, device, dtype, program: str, config: TrainConfig):
        if program == "statistics":
            return _Statistics(dataset, device, config)
        return _Rows(dataset, device, dtype, config)


class _Rows(_Data):
    """The rows themselves, on the device once; descent over full or mini-batches."""

    def __init__(self, dataset: Dataset, device, dtype, config: TrainConfig) -> None:
        self.x = torch.as_tensor(dataset.features, dtype=dtype, device=device)
        self.y = torch.as_tensor(dataset.targets, dtype=dtype, device=device)
        self.reduction = config.loss
        size = config.batch_size or self.x.shape[0]
        self.full = size >= self.x.shape[0] and not config.shuffle
        self.config = config

    def losses(self, state: _Stacked) -> torch.Tensor:
        residual = state.predict(self.x)[0] - self.y
        squared = residual.square().flatten(1)
        return squared.mean(1) if self.reduction == "mean" else squared.sum(1)

    def descend(self, state: _Stacked, mask, config: TrainConfig) -> None:
        # The batches a lone run's DataLoader gives, drawn from the same global generator.
        for x, y in [(self.x, self.y)] if self.full else batches(self.x, self.y, self.config):
            pred, pre = state.predict(x)
            residual = pred - y
            scale = 2.0 / residual[0].numel() if self.reduction == "mean" else 2.0
            d_out = scale * residual
            d_pre = d_out
            if state.relu:
                d_pre = d_out * ((pre >= 0) if state.clamp else (pre > 0))
            state.step(torch.einsum("Knk,nd->Kkd", d_pre, x), d_out.sum(1), mask)


class _Statistics(_Data):
    """X̃ᵀX̃, X̃ᵀY and YᵀY in float64: the loss and its gradient for any parameters."""

    def __init__(self, dataset: Dataset, device, config: TrainConfig) -> None:
        x = torch.as_tensor(dataset.features, dtype=torch.float64, device=device)
        y = torch.as_tensor(dataset.targets, dtype=torch.float64, device=device)
        self.has_bias = config.has_bias
        if self.has_bias:
            x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=device)], dim=1)
        self.gram, self.cross, self.y_square = x.T @ x, x.T @ y, y.square().sum()
        self.scale = 1.0 / y.numel() if config.loss == "mean" else 1.0

    def _theta(self, state: _Stacked) -> torch.Tensor:
        """Parameters as (K, d+1, k): weight transposed, bias as the last row."""
        theta = state.weight.transpose(1, 2)
        return torch.cat([theta, state.bias[:, None, :]], dim=1) if self.has_bias else theta

    def losses(self, state: _Stacked) -> torch.Tensor:
        theta = self._theta(state)
        quadratic = torch.einsum("Kik,ij,Kjk->K", theta, self.gram, theta)
        linear = torch.einsum("Kik,ik->K", theta, self.cross)
        return self.scale * (quadratic - 2 * linear + self.y_square)

    def descend(self, state: _Stacked, mask, config: TrainConfig) -> None:
        grad = 2 * self.scale * (torch.einsum("ij,Kjk->Kik", self.gram, self._theta(state))
                                 - self.cross)
        d = state.weight.shape[2]
        state.step(grad[:, :d, :].transpose(1, 2), grad[:, d, :] if self.has_bias else None,
                   mask)
