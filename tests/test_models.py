"""The two linear models: initialisation from the global RNG, forward pass, parameters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline import config, models
from pipeline.config import TrainConfig
from pipeline.models import BuiltinLinear, ManualLinear

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def train_config(name: str) -> TrainConfig:
    # By path, so the test does not depend on the working directory or $PIPELINE_EXPERIMENTS_DIR.
    return config.load(str(EXPERIMENTS / f"{name}.yaml")).train


def settings(**changes) -> TrainConfig:
    values = {"lr": 0.1, "epochs": 1, **changes}
    result = TrainConfig(**values)
    result.validate()
    return result


# --- initialisation -------------------------------------------------------------------------------


@pytest.mark.parametrize(("d", "k"), [(1, 1), (3, 2), (4, 2), (10, 3)])
def test_torch_init_draws_what_nn_linear_draws(d, k):
    # The builtin experiments promise nn.Linear's own starting point for a given seed.
    torch.manual_seed(11)
    model = models.build(d, k, settings(model="builtin"))
    torch.manual_seed(11)
    reference = nn.Linear(d, k)
    assert torch.equal(model.weight, reference.weight)
    assert torch.equal(model.bias, reference.bias)
    # Both consumed the same random numbers: the next draw agrees too.
    after_model = torch.rand(1)
    torch.manual_seed(11)
    nn.Linear(d, k)
    assert torch.equal(after_model, torch.rand(1))


@pytest.mark.parametrize(("d", "k"), [(3, 2), (4, 2)])
def test_float64_models_start_from_nn_linears_float32_draws(d, k):
    # Drawn as torch draws by default (float32), then cast, as the tutorials do.
    torch.manual_seed(11)
    model = models.build(d, k, settings(model="builtin", dtype="float64"))
    torch.manual_seed(11)
    reference = nn.Linear(d, k)
    assert model.weight.dtype == torch.float64
    assert torch.equal(model.weight, reference.weight.double())
    assert torch.equal(model.bias, reference.bias.double())


@pytest.mark.parametrize("activation", ["none", "relu"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_manual_and_builtin_models_agree_from_the_same_seed(activation, dtype):
    x = torch.randn(8, 3, dtype=models.DTYPES[dtype], generator=torch.Generator().manual_seed(0))
    outputs = {}
    for kind in ("manual", "builtin"):
        torch.manual_seed(5)
        model = models.build(3, 2, settings(model=kind, activation=activation, dtype=dtype))
        outputs[kind] = model(x).detach()
    assert outputs["manual"].shape == (8, 2)
    assert outputs["manual"].dtype == models.DTYPES[dtype]
    assert torch.equal(outputs["manual"], outputs["builtin"])


def test_line_fit_15pts_starts_from_the_tutorials_draw():
    # The tutorial calls torch.manual_seed(20), then w = torch.randn(1) and b = torch.zeros(1).
    torch.manual_seed(20)
    expected_w = torch.randn(1)
    torch.manual_seed(20)
    model = models.build(1, 1, train_config("line_fit_15pts"))
    assert isinstance(model, ManualLinear)
    assert model.weight.shape == (1, 1)
    assert torch.equal(model.weight.detach().reshape(1), expected_w)
    assert torch.equal(model.bias.detach(), torch.zeros(1))


def test_crop_yields_manual_draws_weight_then_bias():
    # w = torch.randn(2, 3) first, then b = torch.randn(2): the order decides every later number.
    torch.manual_seed(0)
    expected_w, expected_b = torch.randn(2, 3), torch.randn(2)
    torch.manual_seed(0)
    model = models.build(3, 2, train_config("crop_yields_manual"))
    assert torch.equal(model.weight.detach(), expected_w)
    assert torch.equal(model.bias.detach(), expected_b)


def test_numeric_init_fills_the_weight():
    model = models.build(1, 1, train_config("slope_only"))
    assert torch.equal(model.weight.detach(), torch.tensor([[-10.0]]))
    assert model.bias is None


@pytest.mark.parametrize(("spec", "check"), [("zeros", 0.0), (2.5, 2.5)])
def test_constant_inits(spec, check):
    weight, bias = models.init_parameters(3, 2, settings(weight_init=spec, bias_init=spec))
    assert weight.shape == (2, 3)
    assert bias.shape == (2,)
    assert torch.all(weight == check)
    assert torch.all(bias == check)


def test_init_dtype_follows_the_config():
    weight, bias = models.init_parameters(2, 1, settings(dtype="float64"))
    assert weight.dtype == torch.float64
    assert bias.dtype == torch.float64


# --- parameters and forward -----------------------------------------------------------------------


def test_manual_parameters_require_grad():
    model = models.build(3, 2, settings(model="manual"))
    params = model.parameters()
    assert len(params) == 2
    assert [tuple(p.shape) for p in params] == [(2, 3), (2,)]
    assert all(p.requires_grad and p.is_leaf for p in params)


def test_manual_gradients_reach_both_parameters():
    model = ManualLinear(torch.tensor([[2.0]]), torch.tensor([1.0]))
    model(torch.tensor([[3.0]])).sum().backward()
    # d(w*x + b)/dw = x, d/db = 1
    assert model.weight.grad.item() == 3.0
    assert model.bias.grad.item() == 1.0
    model.zero_grad()
    assert model.weight.grad is None
    assert model.bias.grad is None


@pytest.mark.parametrize("kind", ["manual", "builtin"])
def test_bias_init_none_means_no_bias(kind):
    model = models.build(2, 1, settings(model=kind, bias_init="none"))
    assert model.bias is None
    assert len(list(model.parameters())) == 1
    x = torch.tensor([[1.0, 2.0], [-3.0, 0.5]])
    assert torch.equal(model(x).detach(), (x @ model.weight.T).detach())


@pytest.mark.parametrize("cls", [ManualLinear, BuiltinLinear])
def test_relu_clamps_before_the_bias(cls):
    weight = torch.tensor([[1.0, -1.0]])
    bias = torch.tensor([-0.5])
    model = cls(weight, bias, activation="relu")
    x = torch.tensor([[1.0, 2.0], [3.0, 1.0]])
    # x @ w.T = [-1, 2]; clamp -> [0, 2]; + bias -> [-0.5, 1.5].
    # ReLU after the bias would give [0, 1.5] instead.
    expected = torch.tensor([[-0.5], [1.5]])
    assert torch.equal(model(x).detach(), expected)


@pytest.mark.parametrize("cls", [ManualLinear, BuiltinLinear])
def test_identity_activation_is_plain_affine(cls):
    model = cls(torch.tensor([[1.0, -1.0], [0.5, 2.0]]), torch.tensor([-0.5, 1.0]))
    x = torch.tensor([[1.0, 2.0], [3.0, 1.0]])
    # rows: [1-2-0.5, 0.5+4+1] and [3-1-0.5, 1.5+2+1]
    expected = torch.tensor([[-1.5, 5.5], [1.5, 4.5]])
    assert torch.equal(model(x).detach(), expected)


@pytest.mark.parametrize("activation", ["none", "relu"])
def test_builtin_parameters_are_weight_and_bias(activation):
    model = BuiltinLinear(torch.ones(2, 3), torch.zeros(2), activation=activation)
    shapes = sorted(tuple(p.shape) for p in model.parameters())
    assert shapes == [(2,), (2, 3)]
    assert model.bias.shape == (2,)


@pytest.mark.parametrize("activation", ["none", "relu"])
def test_manual_export_computes_the_same(activation):
    torch.manual_seed(1)
    model = models.build(3, 2, settings(model="manual", activation=activation))
    module = model.to_module()
    assert isinstance(module, nn.Module)
    x = torch.randn(5, 3)
    assert torch.equal(module(x).detach(), model(x).detach())
