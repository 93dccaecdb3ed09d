"""The two linear models: ``manual`` (raw tensors, as the tutorials teach) and ``builtin``.

Both compute ``act(x @ weight.T) + bias`` with ``act`` the identity or ReLU (``clamp(min=0)``),
and share one small interface: ``parameters()``, ``forward(x)`` (also ``model(x)``),
``zero_grad()``, ``weight``/``bias`` and ``to_module()`` (an ``nn.Module`` fit to export).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.config import TrainConfig

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def init_parameters(
    n_features: int, n_targets: int, config: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Draw weight ``(k, d)`` then bias ``(k,)`` from the global RNG, in that order.

    ``torch`` is ``nn.Linear``'s own scheme (uniform on ±1/sqrt(d)), drawn identically, so a
    builtin model and a manual one with the same seed start from the same point.

    Draws are made in float32, torch's default, and then cast: the tutorials draw their
    parameters that way even when they compute in float64 (tutorial 004's ``w1.double()``).
    """
    weight, bias = _draw_float32(n_features, n_targets, config)
    dtype = DTYPES[config.param_dtype or config.dtype]
    return weight.to(dtype), None if bias is None else bias.to(dtype)


def _draw_float32(n_features: int, n_targets: int, config: TrainConfig):
    dtype = torch.float32
    weight = _draw(config.weight_init, (n_targets, n_features), dtype)
    if config.weight_init == "torch":
        # Exactly nn.Linear.reset_parameters: the same calls give the same bits in any dtype.
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if not config.has_bias:
        return weight, None
    bias = _draw(config.bias_init, (n_targets,), dtype)
    if config.bias_init == "torch":
        bound = 1 / math.sqrt(n_features)
        nn.init.uniform_(bias, -bound, bound)
    return weight, bias


def _draw(spec: str | float, shape: tuple[int, ...], dtype) -> torch.Tensor:
    if spec == "torch":
        return torch.empty(shape, dtype=dtype)  # filled by the caller, as nn.Linear does
    if spec == "randn":
        return torch.randn(shape, dtype=dtype)
    if spec == "rand":
        return torch.rand(shape, dtype=dtype)
    if spec == "zeros":
        return torch.zeros(shape, dtype=dtype)
    return torch.full(shape, float(spec), dtype=dtype)


def linear_forward(x, weight, bias, activation: str, elementwise: bool = False):
    """``act(x @ weight.T) + bias`` in ``x``'s dtype (parameters kept in another are cast, as
    tutorial 004 writes ``X.mm(w1.double())``; their gradients come back in their own).

    ``elementwise``: ``x * weight.T`` for one feature, as tutorials 000 and 003 write it; the
    same values, but autograd sums the weight's gradient over the rows in torch's order, not
    the matrix product's."""
    return linear_parts(x, weight, bias, activation, elementwise)[0]


def linear_parts(x, weight, bias, activation: str, elementwise: bool = False):
    """(:func:`linear_forward`, the pre-activation ``x @ weight.T`` it was computed from)."""
    pre = x * weight.to(x.dtype).T if elementwise else x @ weight.to(x.dtype).T
    out = pre.clamp(min=0) if activation == "relu" else pre
    return (out if bias is None else out + bias.to(x.dtype)), pre


class ManualLinear:
    """Weight and bias as plain tensors with ``requires_grad``; no ``nn`` machinery."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, activation: str = "none",
                 computes_in: torch.dtype | None = None, elementwise: bool = False):
        self.weight = weight.requires_grad_()
        self.bias = None if bias is None else bias.requires_grad_()
        self.activation = activation
        self.computes_in = computes_in or weight.dtype  # the rows' dtype (see param_dtype)
        self.elementwise = elementwise  # x * w (config `product`)

    def parameters(self) -> list[torch.Tensor]:
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_forward(x, self.weight, self.bias, self.activation, self.elementwise)

    __call__ = forward

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def to(self, device: torch.device) -> ManualLinear:
        with torch.no_grad():
            weight = self.weight.detach().to(device)
            bias = None if self.bias is None else self.bias.detach().to(device)
        return ManualLinear(weight, bias, self.activation, self.computes_in, self.elementwise)

    def to_module(self) -> nn.Module:
        """The model as it predicts: its parameters in the dtype it computes in."""
        return LinearRegressor(self.weight.detach().to(self.computes_in),
                               None if self.bias is None else self.bias.to(self.computes_in),
                               self.activation)


class LinearRegressor(nn.Module):
    """The manual model's export form: its learned tensors as an ``nn.Module``."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, activation: str = "none"
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_forward(x, self.weight, self.bias, self.activation)

    def to_module(self) -> nn.Module:
        return self


class Standardized(nn.Module):
    """A model trained on standard-scaled features, taking raw ones: ``model((x - mean) / std)``.
    The statistics are buffers, so they travel inside the exported program.

    Raw features are taken, and scaled, in float64 as training scaled them, then cast to the
    model's ``dtype``: cast first, a timestamp near 1.7e9 loses 7 bits in float32, and a
    feature beyond float32's range could not be taken at all."""

    def __init__(self, model: nn.Module, mean, std, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float64))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(((x.to(torch.float64) - self.mean) / self.std).to(self.dtype))


class BuiltinLinear(nn.Module):
    """``nn.Linear``, with ReLU applied before the bias where the experiment asks for it."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, activation: str = "none"
    ) -> None:
        super().__init__()
        n_targets, n_features = weight.shape
        inner_bias = bias is not None and activation == "none"
        # skip_init: the parameters come from init_parameters, so nn.Linear draws nothing.
        self.linear = nn.utils.skip_init(
            nn.Linear, n_features, n_targets, bias=inner_bias, dtype=weight.dtype
        )
        self.activation = nn.ReLU() if activation == "relu" else nn.Identity()
        self.offset = None
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            if inner_bias:
                self.linear.bias.copy_(bias)
            elif bias is not None:
                self.offset = nn.Parameter(bias.detach().clone())

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias if self.offset is None else self.offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.activation(self.linear(x))
        return out if self.offset is None else out + self.offset

    def to_module(self) -> nn.Module:
        return self


def build(n_features: int, n_targets: int, config: TrainConfig):
    """A fresh model of the configured kind, initialised from the global RNG."""
    weight, bias = init_parameters(n_features, n_targets, config)
    if config.model == "manual":
        return ManualLinear(weight, bias, config.activation, DTYPES[config.dtype],
                            config.product == "elementwise")
    return BuiltinLinear(weight, bias, config.activation)
