"""The rows of the ``loop`` program of :mod:`pipeline.engine`, on the device once, and the
passes over them: the trials' losses and the squared error's gradients.

``state`` is the engine's stacked trials: ``predict``, ``gradients`` and ``step`` are what this
module calls on it.

A full batch on the CPU is read once an epoch, not twice: each thread takes its share of the
rows in blocks small enough to stay in the cache from the forward product, which gives the
epoch's losses, to the gradient's product, which reads the same block again. Torch's BLAS runs
a tall product with a narrow side (rows x features, times a few trials) on one thread, at a
third to half of the memory's bandwidth. Split over the threads and fused block by block, an
epoch on 1,000,000 x 32 rows took 6.7 ms instead of 8.5 ms for one trial, 22 ms instead of
28 ms for eight (two reads of X: 4.7 ms), measured side by side on two cores.
"""

from __future__ import annotations

import functools
import math
from concurrent.futures import ThreadPoolExecutor

import torch

from pipeline.config import TrainConfig
from pipeline.dataset import Dataset
from pipeline.train import batches

SPLIT_ROWS = 1 << 16  # fewer rows: one product, the split gains nothing
BLOCK_BYTES = 4 << 20  # rows read together by a thread: cached between the two products


class Rows:
    """The rows themselves, on the device once; descent over full or mini-batches."""

    def __init__(self, dataset: Dataset, device, dtype, config: TrainConfig) -> None:
        self.x = torch.as_tensor(dataset.features, dtype=dtype, device=device)
        self.y = torch.as_tensor(dataset.targets, dtype=dtype, device=device)
        self.mean = config.loss == "mean"
        self.config = config
        size = config.batch_size or self.x.shape[0]
        self.full = size >= self.x.shape[0] and not config.shuffle
        self.spans = _spans(self.x)
        self.spaces = [Workspace() for _ in self.spans]
        self.space = self.spaces[0]

    def batches(self):
        """The batches a lone run's DataLoader gives, drawn from the same global generator."""
        return batches(self.x, self.y, self.config)

    def residual(self, state, x, y):
        """(prediction - y, pre-activation), both (n, K, k), in the workspace."""
        return _residual(state, x, y, self.space)

    def _losses(self, squares: torch.Tensor) -> torch.Tensor:
        return squares / (len(self.x) * self.y.shape[1]) if self.mean else squares

    def _scale(self, rows: int) -> float:
        return 2.0 / (rows * self.y.shape[1]) if self.mean else 2.0

    def losses(self, state) -> torch.Tensor:
        """Each trial's loss over all the rows."""
        return self._losses(_squares(self.residual(state, self.x, self.y)[0]))

    def full_pass(self, state):
        """Each trial's loss over all the rows and the gradients there, (grad weight, grad
        bias), from one read of the rows (a thread per span, block by block)."""
        if len(self.spans) == 1:
            squares, grad_weight, grad_bias = _span_pass(state, self.x, self.y, *self.spans[0],
                                                         self.space)
        else:
            parts = [future.result() for future in [
                _threads(len(self.spans)).submit(_span_pass, state, self.x, self.y, *span, space)
                for span, space in zip(self.spans, self.spaces, strict=True)]]
            squares, grad_weight, grad_bias = (
                None if part[0] is None else functools.reduce(torch.add, part)
                for part in zip(*parts, strict=True))
        scale = self._scale(len(self.x))
        return self._losses(squares), (scale * grad_weight,
                                       None if grad_bias is None else scale * grad_bias)

    def step(self, state, outputs, x, mask) -> None:
        """One update of every trial from a batch's (residual, pre-activation), consumed."""
        d_out, pre = outputs
        grad_weight, grad_bias = state.gradients(d_out, pre, x)
        scale = self._scale(len(x))  # on the gradients: one pass less
        state.step(scale * grad_weight, None if grad_bias is None else scale * grad_bias, mask)


def _residual(state, x, y, space):
    pred, pre = state.predict(x, space)
    # In place: the prediction is a fresh tensor, and where it is the pre-activation itself
    # (no ReLU) nothing reads that again.
    return pred.sub_(y[:, None, :]), pre


def _squares(residual: torch.Tensor) -> torch.Tensor:
    """Each trial's sum of squares of the residual (n, K, k), in float64. The norm reads the
    residual once and writes nothing; summed in float32 over several trials' columns it came
    out 3e-4 low on 400,000 rows, below the least-squares floor."""
    return torch.linalg.vector_norm(residual, dim=(0, 2), dtype=torch.float64).square()


def _span_pass(state, x, y, start: int, stop: int, rows: int, space):
    """Sums of squares and gradients (unscaled) over rows ``start:stop``, ``rows`` at a time."""
    total = None
    for first in range(start, stop, rows):
        block = slice(first, min(first + rows, stop))
        residual, pre = _residual(state, x[block], y[block], space)
        part = (_squares(residual), *state.gradients(residual, pre, x[block]))
        total = part if total is None else tuple(
            None if t is None else t.add_(p) for t, p in zip(total, part, strict=True))
    return total


def _spans(x: torch.Tensor) -> list[tuple[int, int, int]]:
    """(start, stop, rows per block) of each thread's share of a full batch's rows."""
    count = len(x)
    if x.device.type != "cpu" or count < SPLIT_ROWS:
        return [(0, count, max(count, 1))]
    threads = torch.get_num_threads()
    rows = max(1024, BLOCK_BYTES // (x.shape[1] * x.element_size()))
    share = math.ceil(count / threads)
    return [(start, min(start + share, count), rows) for start in range(0, count, share)]


@functools.cache
def _threads(count: int) -> ThreadPoolExecutor:
    """Threads for the spans; each runs torch on one thread of its own (a block is too small
    to share, and the spans already take every core)."""
    return ThreadPoolExecutor(count, thread_name_prefix="rows",
                              initializer=torch.set_num_threads, initargs=(1,))


def rows_times(x: torch.Tensor, matrix: torch.Tensor, out: torch.Tensor) -> None:
    """``out = x @ matrix``, x (n, d), matrix (d, m), out (n, m) contiguous; over many rows on
    the CPU, one batched product over a block of rows per thread."""
    blocks = _row_blocks(x)
    if blocks == 1:
        torch.mm(x, matrix, out=out)
        return
    whole = len(x) - len(x) % blocks
    torch.bmm(x[:whole].view(blocks, -1, x.shape[1]), matrix.expand(blocks, *matrix.shape),
              out=out[:whole].view(blocks, -1, out.shape[1]))
    torch.mm(x[whole:], matrix, out=out[whole:])


def transposed_times(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``a.T @ x``, a (n, m) and x (n, d) contiguous: (m, d), summed over the rows."""
    blocks = _row_blocks(x)
    if blocks == 1:
        return a.T @ x
    whole = len(x) - len(x) % blocks
    parts = torch.bmm(a[:whole].view(blocks, -1, a.shape[1]).transpose(1, 2),
                      x[:whole].view(blocks, -1, x.shape[1]))
    return parts.sum(0) + a[whole:].T @ x[whole:]


def _row_blocks(x: torch.Tensor) -> int:
    if x.device.type != "cpu" or len(x) < SPLIT_ROWS:
        return 1
    return torch.get_num_threads()


class Workspace:
    """Tensors reused from one batch to the next. A fresh tensor of tens of megabytes comes
    from the kernel as new pages, zeroed on first touch, every time: for a million rows and
    8 trials that was a third of an epoch."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        size = math.prod(shape)
        held = self.tensors.get(name)
        if held is None or held.numel() < size:
            held = self.tensors[name] = like.new_empty(size)
        return held[:size].view(shape)
