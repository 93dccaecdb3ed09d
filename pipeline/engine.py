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
  no ReLU (``engine: auto``, or ``statistics`` in the config, which `pipeline train` follows
  too).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from pipeline import closed_form, models, theory
from pipeline.config import TrainConfig
from pipeline.dataset import Dataset
from pipeline.errors import UserError
from pipeline.rows import Rows, Workspace, rows_times, transposed_times
from pipeline.train import (
    PATH_MAX_PARAMETERS,
    TrainResult,
    diverging,
    finish,
    resolve_device,
)

# Called with (trial index, epoch, train_loss, val_loss); returning True stops that trial.
TrialCallback = Callable[[int, int, float, "float | None"], bool]


def train_many(config: TrainConfig, train_set: Dataset, val_set: Dataset | None,
               lrs: Sequence[float], epochs: Sequence[int],
               on_epoch: TrialCallback | None = None, program: str | None = None,
               report_every: int = 1, kept: dict | None = None,
               paths: bool = False) -> list[TrainResult]:
    """Train one model per (lr, epochs) pair; their curves, as :func:`train.train` gives them.

    ``on_epoch`` is called for each trial still training at every ``report_every``-th epoch.
    ``kept``, one dict held across the calls of a sweep (the same rows, the same config but
    for lr and epochs), keeps what the rows give every batch: their tensors on the device, or
    their statistics, made once instead of once a batch (on a million rows, 0.1-0.3 s each).
    ``program``, ``loop`` or ``statistics``, overrides what the config's ``engine`` asks for.
    ``paths``: record each trial's parameters at every epoch, as :func:`train.train` does for
    a model small enough to draw (statistics only; a sweep never asks).
    """
    program = program or program_for(config, train_set.n_rows)
    device = resolve_device(config.device)
    dtype = torch.float64 if program == "statistics" else models.DTYPES[config.dtype]
    # Parameters kept in another dtype than the rows (param_dtype): the loop only.
    kept_in = models.DTYPES[config.param_dtype] if config.mixed else dtype
    torch.manual_seed(config.seed)
    weight, bias = models.init_parameters(train_set.features.shape[1],
                                          train_set.targets.shape[1], config)
    count = len(lrs)
    state = _Stacked(weight.to(device, kept_in).expand(count, -1, -1).clone(),
                     None if bias is None else bias.to(device, kept_in).expand(count, -1).clone(),
                     torch.tensor(lrs, dtype=kept_in, device=device), config)
    watch = _Stops(torch.tensor(list(epochs), device=device), on_epoch, report_every,
                   val_set is not None, models.DTYPES[config.dtype])
    path = None
    if program == "statistics":
        def statistics(rows):
            return closed_form.Statistics(rows, device, config)

        path = closed_form.descend(state, _derived(kept, "statistics", train_set, statistics),
                                   _derived(kept, "statistics", val_set, statistics), watch)
    else:
        def tensors(rows):
            return Rows(rows, device, dtype, config)

        _loop(state, _derived(kept, f"rows {dtype}", train_set, tensors),
              _derived(kept, f"rows {dtype}", val_set, tensors), watch)
    results = []
    for k, (train_curve, val_curve, diverged_at, stopped_at) in enumerate(watch.curves()):
        model = models.LinearRegressor(
            state.weight[k].to(models.DTYPES[config.dtype]),
            None if state.bias is None else state.bias[k].to(models.DTYPES[config.dtype]),
            config.activation)
        results.append(finish(TrainResult(
            model=model, device=device, train_loss=train_curve, val_loss=val_curve,
            diverged_at=diverged_at, stopped_at=stopped_at,
            parameter_path=_path(path(k), state) if paths and path is not None and sum(
                p.numel() for p in model.parameters()) <= PATH_MAX_PARAMETERS else [])))
    return results


def _path(thetas: torch.Tensor, state: _Stacked) -> list[list[float]]:
    """θ at every epoch, (epochs + 1, D, k), as :func:`train.train` lists a model's
    parameters: the weight (k, d) row by row, then the bias."""
    d = state.weight.shape[2]
    weight = thetas[:, :d, :].transpose(1, 2).flatten(1)
    parts = [weight] if state.bias is None else [weight, thetas[:, d, :]]
    return torch.cat(parts, dim=1).tolist()


def program_for(config: TrainConfig, n_rows: int) -> str:
    """The program ``config.engine`` asks for: ``auto`` takes the statistics where they are
    exact (the config refuses ``statistics`` elsewhere)."""
    if config.engine == "auto":
        return ("statistics" if theory.exact_for(config, n_rows) and not config.mixed
                else "loop")
    return config.engine


def _derived(kept: dict | None, kind: str, rows: Dataset | None, make):
    """``make(rows)``, or what an earlier call made from the same rows (``None`` for none)."""
    if rows is None:
        return None
    if kept is None:
        return make(rows)
    key = (kind, id(rows))
    if key not in kept:
        kept[key] = (rows, make(rows))  # the rows are held too: their id stays theirs
    return kept[key][1]


def _loop(state: _Stacked, data: Rows, val: Rows | None, watch: _Stops) -> None:
    """Descend epoch by epoch; trials leave the batch when they stop (on the device: the
    host looks only at report epochs). A full batch is one pass an epoch: the losses that give
    the curve's point and the gradients of the next update (:meth:`Rows.full_pass`)."""
    def val_losses():
        return None if val is None else val.losses(state)

    if data.full:
        losses, gradients = data.full_pass(state)
        watch.observe(0, losses, val_losses())
        for epoch in range(1, watch.last + 1):
            if epoch % watch.report_every == 0 and not bool(watch.stepping.any()):
                break
            state.step(*gradients, watch.stepping_at(epoch))
            losses, gradients = data.full_pass(state)
            watch.observe(epoch, losses, val_losses())
        return
    watch.observe(0, data.losses(state), val_losses())
    for epoch in range(1, watch.last + 1):
        if epoch % watch.report_every == 0 and not bool(watch.stepping.any()):
            break
        mask = watch.stepping_at(epoch)
        for x, y in data.batches():
            data.step(state, data.residual(state, x, y), x, mask)
        watch.observe(epoch, data.losses(state), val_losses())


class _Stops:
    """The trials' curves, (epochs + 1, K) on the device, and where each one stops: its own
    epoch count, divergence (:func:`train.diverging`, applied to whole rows), or the callback
    (called at report epochs only)."""

    def __init__(self, limits: torch.Tensor, on_epoch: TrialCallback | None, report_every: int,
                 has_val: bool, dtype: torch.dtype) -> None:
        self.limits, self.on_epoch, self.report_every = limits, on_epoch, max(1, report_every)
        self.dtype = dtype  # the losses as a lone run computes them: beyond float32, inf
        self.last = int(limits.max()) if len(limits) else 0
        count, device = len(limits), limits.device
        try:
            self.train = torch.full((self.last + 1, count), float("nan"), dtype=torch.float64,
                                    device=device)
        except (RuntimeError, MemoryError):  # torch: "can't allocate memory"
            raise UserError(f"the loss curves of {count} trials of {self.last} epochs do not fit "
                            "in memory; ask for fewer epochs") from None
        self.val = self.train.clone() if has_val else None
        self.end = limits.clone()  # the last epoch of each curve
        self.diverged = torch.zeros(count, dtype=torch.bool, device=device)
        self.stopped = torch.zeros(count, dtype=torch.bool, device=device)
        self.stepping = torch.ones(count, dtype=torch.bool, device=device)

    def stepping_at(self, epoch: int) -> torch.Tensor:
        return self.stepping & (self.limits >= epoch)

    def observe(self, epoch: int, train: torch.Tensor, val: torch.Tensor | None) -> None:
        """One epoch's losses of every trial (those of stopped trials are dropped)."""
        self.observe_all(epoch, train[None], None if val is None else val[None])

    def observe_all(self, first: int, train: torch.Tensor, val: torch.Tensor | None) -> None:
        """Rows ``first, first + 1, ...`` of every trial's curves, as (epochs, K)."""
        rows = torch.arange(first, first + len(train), device=train.device)[:, None]
        live = (rows <= self.end) & ~self.diverged & ~self.stopped
        train = train.to(self.dtype).double()
        self.train[first:first + len(train)] = torch.where(live, train, float("nan"))
        if val is not None:
            val = val.to(self.dtype).double()
            self.val[first:first + len(train)] = torch.where(live, val, float("nan"))
        bad = live & diverging(train, self.train[0])
        hit = bad.any(0)  # no branch on it: the host waits for the device only at reports
        at = rows.expand_as(bad).masked_fill(~bad, self.last + 1).amin(0)
        self.end = torch.where(hit, at, self.end)
        self.diverged |= hit
        last = first + len(train) - 1
        for epoch in range(_next_multiple(max(first, 1), self.report_every), last + 1,
                           self.report_every):
            self._report(epoch)
        self.stepping = ~self.diverged & ~self.stopped & (self.end > last)

    def _report(self, epoch: int) -> None:
        if self.on_epoch is None:
            return
        # A trial that diverges at this epoch stops there without a report.
        due = ~self.stopped & torch.where(self.diverged, self.end > epoch, self.end >= epoch)
        train = self.train[epoch].tolist()
        val = None if self.val is None else self.val[epoch].tolist()
        for k in due.nonzero().flatten().tolist():
            if self.on_epoch(k, epoch, train[k], None if val is None else val[k]):
                self.stopped[k] = True
                self.end[k] = epoch

    def curves(self):
        """Each trial's (train curve, val curve, diverged_at, stopped_at)."""
        train = self.train.T.tolist()
        val = None if self.val is None else self.val.T.tolist()
        for k, end in enumerate(self.end.tolist()):
            yield (train[k][:end + 1], [] if val is None else val[k][:end + 1],
                   end if bool(self.diverged[k]) else None,
                   end if bool(self.stopped[k]) else None)


def _next_multiple(value: int, step: int) -> int:
    return -(-value // step) * step


class _Stacked:
    """K models' weights (K, k, d), biases (K, k) and learning rates (K,).

    Predictions are laid out (n, K, k), trials next to each other in every row, so the
    forward pass is one product ``x @ W.T`` with W the (K·k, d) stack and the gradient one
    product ``d.T @ x``: each reads x once for all K trials.
    """

    def __init__(self, weight, bias, lrs, config: TrainConfig) -> None:
        self.weight, self.bias, self.lrs = weight, bias, lrs
        self.relu = config.activation == "relu"
        # Autograd through the manual model's clamp(min=0) passes a gradient at 0; ReLU, and
        # the hand-written gradient, pass none there.
        self.clamp = config.model == "manual" and config.gradient == "autograd"

    def predict(self, x: torch.Tensor, space: Workspace):
        """(prediction, pre-activation), both (n, K, k) in ``space``; one tensor without ReLU."""
        count, k, d = self.weight.shape
        pre = space.get("pre", (len(x), count, k), x)
        rows_times(x, self.weight.to(x.dtype).reshape(count * k, d).T,
                   pre.view(len(x), count * k))
        out = torch.clamp(pre, min=0, out=space.get("out", pre.shape, x)) if self.relu else pre
        return (out if self.bias is None else out.add_(self.bias)), pre

    def gradients(self, d_out: torch.Tensor, pre: torch.Tensor, x: torch.Tensor):
        """The squared error's gradients from d(loss)/d(prediction) (n, K, k), which is
        overwritten with d(loss)/d(pre-activation)."""
        grad_bias = None if self.bias is None else d_out.sum(0)
        if self.relu:
            d_out.mul_(pre >= 0 if self.clamp else pre > 0)  # what a lone run's step passes
        count, k, d = self.weight.shape
        return transposed_times(d_out.view(len(x), count * k), x).view(count, k, d), grad_bias

    def step(self, grad_weight, grad_bias, mask) -> None:
        """Each trial's update, in the parameters' dtype (the gradients cast to it first, as
        autograd casts them where the parameters are kept in another dtype than the rows)."""
        rate = torch.where(mask, self.lrs, torch.zeros_like(self.lrs))
        self.weight -= rate[:, None, None] * grad_weight.to(self.weight.dtype)
        if self.bias is not None:
            self.bias -= rate[:, None] * grad_bias.to(self.bias.dtype)
