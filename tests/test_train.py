"""Training reproduces the tutorials: printed numbers under a fixed seed, closed forms otherwise."""

from __future__ import annotations

import signal
import weakref

import numpy as np
import pytest
import torch

from pipeline import config, data, interrupts, models
from pipeline import train as train_module
from pipeline.errors import UserError
from pipeline.train import DIVERGENCE_FACTOR, features_tensor, resolve_device, train

# Tutorial 000 prints the loss before training, then before each of its 10 further updates.
LINE_FIT_PRINTED = [104.9967, 2.1443493366241455, 0.2407105565071106, 0.20529970526695251,
                    0.20446452498435974, 0.204270139336586, 0.20408859848976135,
                    0.20390814542770386, 0.20372863113880157, 0.2035500854253769,
                    0.20337240397930145]


def fit(name: str, *overrides: str):
    exp = config.load(name, overrides)
    dataset = data.build(exp.data, exp.seed)
    train_set, val_set = data.split(dataset, exp.val_fraction, exp.seed)
    return exp, train_set, train(exp.train, train_set, val_set)


def initial_parameters(exp, dataset):
    torch.manual_seed(exp.seed)
    weight, bias = models.init_parameters(
        dataset.features.shape[1], dataset.targets.shape[1], exp.train
    )
    return weight.double().numpy(), None if bias is None else bias.double().numpy()


def params(result):
    weight = result.model.weight.detach().double().numpy()
    bias = result.model.bias
    return weight, None if bias is None else bias.detach().double().numpy()


@pytest.mark.parametrize("gradient", ["autograd", "analytic"])
def test_line_fit_reproduces_the_tutorials_printed_losses(gradient):
    _, _, result = fit("line_fit_15pts", f"gradient={gradient}")
    assert len(result.train_loss) == 12  # epochs + 1
    assert result.train_loss[0] == pytest.approx(LINE_FIT_PRINTED[0], abs=5e-5)  # 4 decimals
    # The tutorial printed these with an older torch: its own code, run on this one, gives
    # what the pipeline gives, within 1-3 float32 units of the last place of the print.
    np.testing.assert_allclose(result.train_loss[1:11], LINE_FIT_PRINTED[1:], rtol=3e-7)


def test_line_fit_starts_from_the_tutorials_gradients():
    # Tutorial 000 prints the first gradients: tensor([-133.1749]) and tensor([-19.2775]).
    exp = config.load("line_fit_15pts")
    dataset = data.build(exp.data, exp.seed)
    torch.manual_seed(exp.seed)
    model = models.build(1, 1, exp.train)
    x, y = (torch.as_tensor(a, dtype=torch.float32) for a in (dataset.features, dataset.targets))
    ((model(x) - y) ** 2).mean().backward()
    assert model.weight.grad.item() == pytest.approx(-133.1749, abs=5e-5)
    assert model.bias.grad.item() == pytest.approx(-19.2775, abs=5e-5)


@pytest.mark.parametrize(
    "overrides",
    [
        ("loss=mean",),
        ("loss=sum", "lr=1e-4"),
        ("bias_init=none",),
        ("activation=relu", "weight_init=rand", "bias_init=rand"),
    ],
)
def test_analytic_gradient_matches_autograd(overrides):
    curves = {}
    for gradient in ("autograd", "analytic"):
        _, _, result = fit("crop_yields_manual", f"gradient={gradient}", "epochs=5",
                           "dtype=float64", *overrides)
        curves[gradient] = (result.train_loss, params(result))
    np.testing.assert_allclose(curves["autograd"][0], curves["analytic"][0], rtol=1e-10)
    np.testing.assert_allclose(curves["autograd"][1][0], curves["analytic"][1][0], rtol=1e-10)


def test_crop_yields_manual_follows_the_closed_form_gradient_descent_path():
    # Full-batch descent on a quadratic: θ_t - θ* = (I - lr·H)^t (θ_0 - θ*), H = 2 X̃ᵀX̃ / (n k).
    exp, dataset, result = fit("crop_yields_manual", "dtype=float64")
    weight0, bias0 = initial_parameters(exp, dataset)
    x = np.hstack([dataset.features, np.ones((dataset.n_rows, 1))])
    n, k = dataset.targets.shape
    hessian = 2 * x.T @ x / (n * k)
    optimum = np.linalg.solve(x.T @ x, x.T @ dataset.targets)  # (d+1, k)
    theta0 = np.vstack([weight0.T, bias0])
    step = np.linalg.matrix_power(np.eye(4) - exp.train.lr * hessian, exp.train.epochs)
    expected = optimum + step @ (theta0 - optimum)
    weight, bias = params(result)
    np.testing.assert_allclose(weight, expected[:3].T, rtol=1e-9)
    np.testing.assert_allclose(bias, expected[3], rtol=1e-9)
    assert result.train_loss[-1] < result.train_loss[0] / 10


def test_crop_yields_builtin_learns_and_repeats_under_its_seed():
    _, dataset, first = fit("crop_yields_builtin")
    _, _, second = fit("crop_yields_builtin")
    assert dataset.n_rows == 15
    assert len(first.train_loss) == 101
    assert first.train_loss == second.train_loss  # shuffling is seeded too
    assert first.train_loss[-1] < first.train_loss[0] / 100


def test_slope_only_matches_the_closed_form_path():
    # Loss mean((w x - y)²) has curvature 2·mean(x²): w_t - w* = (1 - 2·lr·mean(x²))^t (w_0 - w*).
    exp, dataset, result = fit("slope_only", "dtype=float64")
    x, y = dataset.features[:, 0], dataset.targets[:, 0]
    w_star = x @ y / (x @ x)
    factor = 1 - 2 * exp.train.lr * np.mean(x**2)
    path = [p[0] for p in result.parameter_path]
    expected = [w_star + factor**t * (-10.0 - w_star) for t in range(exp.train.epochs + 1)]
    np.testing.assert_allclose(path, expected, rtol=1e-9)
    assert result.model.bias is None
    assert abs(path[-1] - (-3)) < 0.3  # four steps get within 0.3 of the true slope


def test_relu_line_recovers_the_tutorials_line():
    _, _, result = fit("relu_line")
    weight, bias = params(result)
    assert len(result.train_loss) == 150  # range(1, 150): 149 updates
    assert result.model.weight.dtype == torch.float32  # updated in float32, as there
    assert result.model.to_module().weight.dtype == torch.float64  # predicts as it trained
    assert abs(weight[0, 0] - 0.175) < 0.01
    assert abs(bias[0] - 0.4) < 0.01


def tutorial_004(seed: int) -> tuple[list[float], float, float]:
    """Tutorial 004's own code (its rows, float32 parameters, float64 forward), with a seed."""
    x = np.array([1.0, 20.4, 30.5, 7.5, 9.9, 100.9, 200.1, 45.1, 150.1, 7.0, 29.4, 31.5, 157.3,
                  10.9, 120.6, 16.9, 201.1, 21.1, 300.1, 21.0, 120.4, 230.5, 37.5, 49.9,
                  230.0, 109.9, 121.1, 145.1, 157.1, 17.0, 219.4, 131.5, 187.3, 210.9, 290.6,
                  126.9, 71.1, 91.1, 19.1, 100.0])
    x_train = np.array([[i / 100] for i in x])
    y_train = np.array([i * 0.175 + 0.4 for i in x_train])
    X, y = torch.from_numpy(x_train), torch.from_numpy(y_train)
    torch.manual_seed(seed)
    w1 = torch.rand(1, 1, requires_grad=True)
    b1 = torch.rand(1, 1, requires_grad=True)
    losses = []
    for _ in range(1, 150):
        y_pred = X.mm(w1.double()).clamp(min=0).add(b1.double())
        loss = (y - y_pred).pow(2).sum()
        losses.append(loss.item())
        loss.backward()
        with torch.no_grad():
            w1 -= 0.001 * w1.grad
            b1 -= 0.001 * b1.grad
            w1.grad.zero_()
            b1.grad.zero_()
    return losses, w1.item(), b1.item()


@pytest.mark.parametrize("gradient", ["autograd", "analytic"])
def test_relu_line_is_tutorial_004_to_the_bit(gradient):
    # Float32 parameters, a float64 forward pass, float32 updates: each of the 149 losses
    # before an update and the final parameters equal the tutorial's code run with seed 0.
    losses, w, b = tutorial_004(seed=0)
    _, _, result = fit("relu_line", f"gradient={gradient}")
    assert result.train_loss[:149] == losses
    assert (result.model.weight.item(), result.model.bias.item()) == (w, b)


def test_line_2x_plus_1_learns_slope_2_and_intercept_1():
    _, _, result = fit("line_2x_plus_1")
    weight, bias = params(result)
    assert abs(weight[0, 0] - 2) < 0.05 and abs(bias[0] - 1) < 0.15
    assert result.train_loss[-1] < 0.01


def test_validation_curve_has_a_point_per_epoch():
    exp, train_set, result = fit("synthetic", "epochs=7")
    assert len(result.train_loss) == len(result.val_loss) == 8
    assert train_set.n_rows == 1600  # val_fraction 0.2 of 2000
    assert result.val_loss[-1] < result.val_loss[0]


def test_divergence_stops_training_once_the_loss_is_100_times_its_start():
    # One rule for `pipeline train` and sweeps (DIVERGENCE_FACTOR): inf, NaN or 100x the start.
    _, _, result = fit("slope_only", "lr=10", "epochs=500")
    start = result.train_loss[0]
    assert result.diverged
    assert result.epochs_run == result.diverged_at < 500
    assert result.train_loss[-1] > DIVERGENCE_FACTOR * start
    assert all(v <= DIVERGENCE_FACTOR * start for v in result.train_loss[:-1])


def test_ending_above_the_start_is_divergence_too():
    # slope_only's stable edge is lr = 1/mean(x²) ≈ 0.33: just above it, each step overshoots
    # a little more, so 4 epochs end above the start without reaching 100x it.
    _, _, result = fit("slope_only", "lr=0.35", "epochs=4")
    assert result.train_loss[-1] > result.train_loss[0]
    assert max(result.train_loss) < DIVERGENCE_FACTOR * result.train_loss[0]
    assert result.diverged and result.diverged_at == 4
    _, _, stable = fit("slope_only", "lr=0.3", "epochs=4")
    assert not stable.diverged and stable.train_loss[-1] < stable.train_loss[0]


def test_epoch_callback_can_stop_training():
    seen = []

    def stop_at_three(epoch, train_loss, val_loss):
        seen.append((epoch, train_loss, val_loss))
        return epoch == 3

    exp = config.load("line_fit_15pts")
    dataset = data.build(exp.data, exp.seed)
    result = train(exp.train, dataset, on_epoch=stop_at_three)
    assert [s[0] for s in seen] == [0, 1, 2, 3]
    assert result.stopped_at == 3 and len(result.train_loss) == 4
    assert seen[0][1] == pytest.approx(104.9967, rel=1e-5) and seen[0][2] is None


def test_minibatch_manual_model_uses_the_same_batches_as_builtin():
    _, _, manual = fit("crop_yields_builtin", "model=manual", "weight_init=torch",
                       "bias_init=torch")
    _, _, builtin = fit("crop_yields_builtin")
    np.testing.assert_allclose(manual.train_loss, builtin.train_loss, rtol=1e-5)


def test_device_selection(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(UserError, match="device cuda was asked for"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_training_matches_cpu():
    _, _, cpu = fit("crop_yields_manual", "device=cpu", "dtype=float64")
    _, _, gpu = fit("crop_yields_manual", "device=cuda", "dtype=float64")
    assert gpu.device.type == "cuda"
    np.testing.assert_allclose(cpu.train_loss, gpu.train_loss, rtol=1e-9)


@pytest.mark.parametrize("model", ["manual", "builtin"])
def test_a_tall_full_batch_is_stored_by_column_and_trains_as_by_row(model, monkeypatch):
    exp = config.load("synthetic", [f"data.n_rows={2 * train_module.BY_COLUMN_ROWS}",
                                    "data.n_features=5", "val_fraction=0.1", f"model={model}",
                                    "batch_size=null", "shuffle=false", "epochs=20",
                                    "dtype=float64"])
    dataset = data.build(exp.data, exp.seed)
    train_set, val_set = data.split(dataset, exp.val_fraction, exp.seed)
    rows = len(train_set.features)
    x = features_tensor(train_set.features, torch.float64, torch.device("cpu"), by_column=True)
    assert x.stride() == (1, rows) and torch.equal(x, torch.as_tensor(train_set.features))
    by_column = train(exp.train, train_set, val_set)
    monkeypatch.setattr(train_module, "BY_COLUMN_ROWS", 10**9)
    by_row = train(exp.train, train_set, val_set)
    np.testing.assert_allclose(by_column.train_loss, by_row.train_loss, rtol=1e-12)
    np.testing.assert_allclose(by_column.val_loss, by_row.val_loss, rtol=1e-12)
    assert by_column.train_loss[-1] < by_column.train_loss[0] / 2


def test_rows_drawn_in_batches_or_few_keep_their_layout():
    features = np.arange(12.0).reshape(4, 3)
    for by_column in (True, False):
        x = features_tensor(features, torch.float32, torch.device("cpu"), by_column)
        assert x.is_contiguous() and torch.equal(x, torch.as_tensor(features, dtype=x.dtype))
    tall = np.zeros((train_module.BY_COLUMN_ROWS, 2))
    assert features_tensor(tall, torch.float32, torch.device("cpu"), False).is_contiguous()


def test_a_batch_size_beyond_the_rows_is_one_batch():
    # Past 2**63 too, which torch's split cannot take.
    exp = config.load("line_fit_15pts", ["model=builtin", "shuffle=true",
                                         f"batch_size={10**30}", "epochs=3"])
    whole = config.with_train(exp, batch_size=15)
    dataset = data.build(exp.data, exp.seed)
    assert train(exp.train, dataset).train_loss == train(whole.train, dataset).train_loss


def test_index_batches_draw_what_a_shuffling_dataloader_draws():
    from torch.utils.data import DataLoader, TensorDataset

    from pipeline.train import IndexBatches

    rows = torch.arange(23)
    torch.manual_seed(5)
    expected = [batch[0].tolist() for batch in DataLoader(TensorDataset(rows), batch_size=5,
                                                           shuffle=True)]
    torch.manual_seed(5)
    sampler = IndexBatches(23, 5, shuffle=True, device=torch.device("cpu"))
    # Through a DataLoader, which draws its own base seed first, as in training.
    loader = DataLoader(TensorDataset(rows), sampler=sampler, batch_size=None)
    assert [batch[0].tolist() for batch in loader] == expected
    assert len(sampler) == 5 and [len(b) for b in expected] == [5, 5, 5, 5, 3]
    ordered = IndexBatches(7, 3, shuffle=False, device=torch.device("cpu"))
    assert [b.tolist() for b in ordered] == [[0, 1, 2], [3, 4, 5], [6]]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # as intended
def test_a_stop_a_finalizer_swallowed_is_raised_at_the_next_epoch(monkeypatch):
    # A signal landing in a weakref callback or __del__ has its exception printed and dropped
    # by Python; the flag the handler also sets stops training at the next epoch instead.
    monkeypatch.setattr(interrupts, "_requested", None)

    class Thing:
        pass

    thing = Thing()
    ref = weakref.ref(thing, lambda _: interrupts.raise_interrupted(signal.SIGTERM, None))
    del thing  # the callback runs here; its Interrupted is swallowed
    assert ref() is None and interrupts.requested() == signal.SIGTERM
    exp = config.load("line_fit_15pts")
    with pytest.raises(interrupts.Interrupted) as stop:
        train(exp.train, data.build(exp.data, exp.seed))
    assert stop.value.exit_code == 143


# Each tutorial's forward pass as its own code writes it, on its own parameter shapes.
TUTORIAL_FORWARD = {
    "line_fit_15pts": lambda x, w, b: x * w.reshape(1) + b,  # 000: w = torch.randn(1)
    "slope_only": lambda x, w, b: w.reshape(()) * x,  # 003: w = torch.tensor(-10.0)
    # 004: X.mm(w1.double()).clamp(min=0).add(b1.double()), w1 and b1 of shape (1, 1)
    "relu_line": lambda x, w, b: x.mm(w.T.double()).clamp(min=0).add(b.reshape(1, 1).double()),
    "crop_yields_manual": lambda x, w, b: x @ w.t() + b,  # 001
}


def _tutorial_loop(exp, name, train_set, by_column: bool) -> list[float]:
    """The manual loop as the tutorials write it: their forward pass and loss expression,
    autograd, updates under no_grad, gradients zeroed; the same rows, layout and initial
    parameters."""
    dtype = models.DTYPES[exp.train.dtype]
    x = features_tensor(train_set.features, dtype, torch.device("cpu"), by_column=by_column)
    y = torch.as_tensor(train_set.targets, dtype=dtype)
    torch.manual_seed(exp.train.seed)
    model = models.build(x.shape[1], y.shape[1], exp.train)
    w, b = model.weight, model.bias
    relu = exp.train.activation == "relu"
    forward = TUTORIAL_FORWARD.get(  # elsewhere: (x @ w.T, then the ReLU) + b
        name, lambda x, w, b: ((x @ w.T).clamp(min=0) if relu else x @ w.T) + b)
    curve = []
    for _ in range(exp.train.epochs + 1):
        squared = (forward(x, w, b) - y) ** 2
        loss = squared.mean() if exp.train.loss == "mean" else squared.sum()
        curve.append(loss.item())
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= exp.train.lr * p.grad
        model.zero_grad()
    return curve


@pytest.mark.parametrize("name, overrides", [
    ("line_fit_15pts", ()), ("slope_only", ()), ("relu_line", ()), ("crop_yields_manual", ()),
    # The tutorials' exercise: other rates and epochs.
    ("line_fit_15pts", ("lr=0.005", "epochs=31")), ("slope_only", ("lr=0.05", "epochs=20")),
    ("relu_line", ("lr=0.005", "epochs=299")), ("crop_yields_manual", ("loss=sum", "lr=1e-5")),
    # Tall enough to be stored by column (BY_COLUMN_ROWS), ReLU included.
    ("synthetic", ("model=manual", "batch_size=null", "shuffle=false", "val_fraction=0",
                   "epochs=4", "data.n_rows=70000", "data.n_features=3", "activation=relu")),
])
def test_the_manual_loop_is_the_tutorials_to_the_bit(name, overrides):
    exp = config.load(name, [*overrides, "gradient=autograd"])
    train_set = data.build(exp.data, exp.seed)
    result = train(exp.train, train_set)
    expected = _tutorial_loop(exp, name, train_set, len(train_set.features) >= 65536)
    assert result.train_loss == expected
