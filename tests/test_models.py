"""The two linear models: initialisation from the global RNG, forward pass, parameters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline import config, models
from pipeline.config import TrainConfig
from pipeline.data import Dataset
from pipeline.models import BuiltinLinear, ManualLinear
from pipeline.train import train

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def train_config(name: str) -> TrainConfig:
    # By path, so the test does not depend on the working directory or $PIPELINE_EXPERIMENTS_DIR.
    return config.load(str(EXPERIMENTS / f"{name}.yaml")).train


def settings(**changes) -> TrainConfig:
    return TrainConfig(**{"lr": 0.1, "epochs": 1, **changes})  # checked as it is built


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


# Hand-checked: rows of x·Wᵀ are [5, -2.5] and [-2, -1.5]; the bias is [0.25, -1].
EXPORT_WEIGHT = [[1.0, -1.0, 2.0], [0.5, 0.0, -1.0]]
EXPORT_BIAS = [0.25, -1.0]
EXPORT_X = [[1.0, 2.0, 3.0], [-2.0, 1.0, 0.5]]
EXPORT_EXPECTED = {
    "none": [[5.25, -3.5], [-1.75, -2.5]],
    "relu": [[5.25, -1.0], [0.25, -1.0]],  # clamp(x·Wᵀ) first: [5, 0] and [0, 0]
}


@pytest.mark.parametrize("activation", ["none", "relu"])
def test_manual_export_computes_the_same(activation):
    model = ManualLinear(torch.tensor(EXPORT_WEIGHT), torch.tensor(EXPORT_BIAS), activation)
    module = model.to_module()
    assert isinstance(module, nn.Module)
    x = torch.tensor(EXPORT_X)
    expected = torch.tensor(EXPORT_EXPECTED[activation])
    assert torch.equal(module(x).detach(), expected)
    assert torch.equal(model(x).detach(), expected)
    assert sorted(name for name, _ in module.named_parameters()) == ["bias", "weight"]
    # The export holds copies: training the manual model further leaves it unchanged.
    with torch.no_grad():
        model.weight += 1.0
    assert torch.equal(module(x).detach(), expected)


def test_export_without_bias_has_no_bias_parameter():
    model = ManualLinear(torch.tensor(EXPORT_WEIGHT), None)
    module = model.to_module()
    assert [name for name, _ in module.named_parameters()] == ["weight"]
    assert torch.equal(module(torch.tensor(EXPORT_X)).detach(),
                       torch.tensor([[5.0, -2.5], [-2.0, -1.5]]))


@pytest.mark.parametrize("kind", ["manual", "builtin"])
@pytest.mark.parametrize(("activation", "expected"), [("none", [[2.0], [-2.5], [0.0]]),
                                                      ("relu", [[2.0], [-1.0], [0.0]])])
def test_built_models_predict_hand_computed_values(kind, activation, expected):
    # weight 0.5 everywhere, bias -1: x·w = 0.5·(x0 + x1) = [3, -1.5, 1], then ReLU, then -1.
    model = models.build(2, 1, settings(model=kind, activation=activation, weight_init=0.5,
                                        bias_init=-1.0))
    x = torch.tensor([[2.0, 4.0], [-1.0, -2.0], [1.0, 1.0]])
    assert torch.equal(model(x).detach(), torch.tensor(expected))


@pytest.mark.parametrize("kind", ["manual", "builtin"])
def test_seeded_models_predict_from_the_drawn_parameters(kind):
    # crop_yields_manual draws w = randn(2, 3) then b = randn(2) after manual_seed(0); a model
    # of either kind built from that recipe predicts x·wᵀ + b with those numbers.
    torch.manual_seed(0)
    weight, bias = torch.randn(2, 3).double().numpy(), torch.randn(2).double().numpy()
    torch.manual_seed(0)
    model = models.build(3, 2, train_config("crop_yields_manual").replace(
        model=kind, dtype="float64"))
    x = np.array([[73.0, 67.0, 43.0], [91.0, 88.0, 64.0]])
    predicted = model(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(predicted, x @ weight.T + bias, rtol=1e-12)


# --- the analytic gradient ------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["mean", "sum"])
@pytest.mark.parametrize("activation", ["none", "relu"])
@pytest.mark.parametrize("n_targets", [1, 2])
def test_analytic_gradient_of_weight_and_bias_matches_autograd(loss, activation, n_targets):
    # One full-batch step at lr 1 moves each parameter by minus its gradient: the analytic
    # step's move must be autograd's gradient of the same loss at the starting point.
    generator = torch.Generator().manual_seed(n_targets)
    x = torch.randn(7, 3, dtype=torch.float64, generator=generator)
    y = torch.randn(7, n_targets, dtype=torch.float64, generator=generator)
    config_ = settings(model="manual", gradient="analytic", activation=activation, loss=loss,
                       lr=1.0, epochs=1, weight_init="randn", bias_init="randn", dtype="float64",
                       seed=3, device="cpu")
    torch.manual_seed(3)
    weight0, bias0 = models.init_parameters(3, n_targets, config_)
    w = weight0.clone().requires_grad_()
    b = bias0.clone().requires_grad_()
    out = x @ w.T
    out = (out.clamp(min=0) if activation == "relu" else out) + b
    squared = (out - y) ** 2
    (squared.mean() if loss == "mean" else squared.sum()).backward()
    assert (x @ weight0.T).abs().min() > 1e-6  # no row sits on the ReLU's kink

    dataset = Dataset(x.numpy(), y.numpy(), ("a", "b", "c"),
                      tuple(f"y{i}" for i in range(n_targets)))
    result = train(config_, dataset)
    moved_weight = weight0 - result.model.weight.detach()
    moved_bias = bias0 - result.model.bias.detach()
    torch.testing.assert_close(moved_bias, b.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(moved_weight, w.grad, rtol=1e-12, atol=1e-12)
    assert b.grad.abs().min() > 1e-3  # a gradient of zero would make the check vacuous
