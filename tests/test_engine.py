"""Many trials as one program: each trial's curve is the curve `pipeline train` gives alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import config, data, engine, rows, theory
from pipeline.train import train

# (experiment, overrides, lr factors of the stable edge, epochs): every kind of model and loop.
CASES = {
    "manual, full batch, mean": ("crop_yields_manual", [], (0.05, 0.3, 0.9), (40, 100, 70)),
    "builtin, shuffled batches of 5": ("crop_yields_builtin", [], (0.05, 0.3, 0.6),
                                       (30, 60, 45)),
    "manual ReLU, sum, float64": ("relu_line", [], (0.1, 0.5, 0.9), (149, 60, 100)),
    "manual, no bias": ("slope_only", [], (0.1, 0.5, 0.9), (4, 10, 7)),
    "builtin, full batch": ("line_2x_plus_1", [], (0.1, 0.5, 0.9), (100, 50, 80)),
    "builtin, batches and a validation split": (
        "synthetic", ["data.n_rows=600"], (0.02, 0.1, 0.3), (8, 15, 12)),
    "manual, unshuffled batches, sum": (
        "synthetic", ["model=manual", "loss=sum", "shuffle=false", "batch_size=128",
                      "data.n_rows=500"], (0.001, 0.004, 0.008), (6, 9, 12)),
    "builtin ReLU, shuffled": ("synthetic", ["activation=relu", "data.n_rows=300"],
                               (0.05, 0.1, 0.2), (5, 10, 8)),
    "manual ReLU from zeros, autograd (a gradient at 0)": (
        "relu_line", ["weight_init=zeros"], (0.1, 0.5, 0.9), (20, 9, 14)),
    "manual ReLU from zeros, analytic (none at 0)": (
        "relu_line", ["weight_init=zeros", "gradient=analytic"], (0.1, 0.5, 0.9), (20, 9, 14)),
    "manual ReLU, full batch, rows split across threads": (
        "synthetic", ["model=manual", "activation=relu", "batch_size=null", "shuffle=false",
                      "data.n_rows=90001", "data.n_features=5"], (0.05, 0.3, 0.9), (6, 4, 5)),
}


def prepared(name: str, overrides: list[str]):
    exp = config.load(name, overrides)
    dataset = data.build(exp.data, exp.seed)
    train_set, val_set = data.split(dataset, exp.val_fraction, exp.seed)
    edge = theory.learning_rates(train_set, exp.train.has_bias, exp.train.loss)["lr_max_stable"]
    return exp, train_set, val_set, edge


def alone(exp, train_set, val_set, lr: float, epochs: int):
    return train(config.with_train(exp, lr=lr, epochs=epochs).train, train_set, val_set)


def tolerance(exp) -> float:
    return 1e-9 if exp.train.dtype == "float64" else 2e-4


@pytest.mark.parametrize("case", CASES)
def test_each_trial_matches_training_it_alone(case):
    name, overrides, factors, epochs = CASES[case]
    exp, train_set, val_set, edge = prepared(name, overrides)
    lrs = [f * edge for f in factors]
    together = engine.train_many(exp.train, train_set, val_set, lrs, epochs, program="loop")
    for lr, count, result in zip(lrs, epochs, together, strict=True):
        single = alone(exp, train_set, val_set, lr, count)
        assert len(result.train_loss) == len(single.train_loss) == count + 1
        np.testing.assert_allclose(result.train_loss, single.train_loss, rtol=tolerance(exp))
        np.testing.assert_allclose(result.val_loss, single.val_loss, rtol=tolerance(exp))
        assert result.diverged == single.diverged


@pytest.mark.parametrize("program", ["loop", "statistics"])
def test_batches_sharing_what_the_rows_give_train_as_batches_alone(monkeypatch, program):
    # A sweep keeps the rows' tensors or statistics for all its batches: made once, and each
    # batch trains as it would with its own.
    exp, train_set, val_set, edge = prepared("synthetic", [
        "data.n_rows=400", "model=manual", "batch_size=null", "shuffle=false"])
    made = []
    for name, owner in (("Statistics", engine.closed_form), ("Rows", engine)):
        real = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, real=real: made.append(a[0]) or real(*a))
    kept = {}
    for lrs, epochs in (([0.1 * edge, 0.5 * edge], [20, 30]), ([0.9 * edge], [25])):
        shared = engine.train_many(exp.train, train_set, val_set, lrs, epochs, program=program,
                                   kept=kept)
        own = engine.train_many(exp.train, train_set, val_set, lrs, epochs, program=program)
        for a, b in zip(shared, own, strict=True):
            assert a.train_loss == b.train_loss and a.val_loss == b.val_loss
            torch.testing.assert_close(a.model.weight, b.model.weight, rtol=0, atol=0)
    # Twice for the batches' own (train and validation rows each), once for the shared.
    assert [id(rows) for rows in made].count(id(train_set)) == 3
    assert [id(rows) for rows in made].count(id(val_set)) == 3


FULL_BATCH = ["line_fit_15pts", "crop_yields_manual", "line_2x_plus_1", "slope_only"]


@pytest.mark.parametrize("name", [*FULL_BATCH, "synthetic"])
def test_sufficient_statistics_give_the_loops_curves(name):
    overrides = ["batch_size=null", "data.n_rows=3000", "data.n_features=6"] * (
        name == "synthetic")
    exp, train_set, val_set, edge = prepared(name, overrides)
    assert theory.exact_for(exp.train, train_set.n_rows)
    lrs, epochs = [0.1 * edge, 0.5 * edge, 0.95 * edge], [20, 35, 50]
    from_statistics = engine.train_many(exp.train, train_set, val_set, lrs, epochs,
                                        program="statistics")
    looped = engine.train_many(exp.train, train_set, val_set, lrs, epochs, program="loop")
    for lr, count, result, loop in zip(lrs, epochs, from_statistics, looped, strict=True):
        single = alone(exp, train_set, val_set, lr, count)
        np.testing.assert_allclose(result.train_loss, single.train_loss, rtol=2e-4)
        np.testing.assert_allclose(result.val_loss, single.val_loss, rtol=2e-4)
        np.testing.assert_allclose(result.train_loss, loop.train_loss, rtol=2e-4)


def test_tutorial_000_numbers_from_statistics():
    exp, train_set, _, _ = prepared("line_fit_15pts", [])
    [result] = engine.train_many(exp.train, train_set, None, [exp.train.lr], [exp.train.epochs])
    assert result.train_loss[0] == pytest.approx(104.9967, rel=1e-6)
    assert result.train_loss[10] == pytest.approx(0.20337, rel=1e-4)


def test_statistics_are_used_only_where_exact():
    relu = config.load("relu_line").train
    batches = config.load("crop_yields_builtin").train
    full = config.load("crop_yields_manual").train
    assert not theory.exact_for(relu, 40)
    assert not theory.exact_for(batches, 15)
    assert theory.exact_for(full, 5)


@pytest.mark.parametrize(("name", "engine_key", "program"), [
    ("crop_yields_manual", "auto", "statistics"), ("crop_yields_manual", "loop", "loop"),
    ("crop_yields_manual", "statistics", "statistics"), ("relu_line", "auto", "loop"),
    ("crop_yields_builtin", "auto", "loop"), ("crop_yields_builtin", "loop", "loop")])
def test_the_config_s_engine_picks_the_program(monkeypatch, name, engine_key, program):
    exp, train_set, val_set, edge = prepared(name, [f"engine={engine_key}"])
    assert engine.program_for(exp.train, train_set.n_rows) == program
    ran = []
    real = engine.closed_form.descend
    monkeypatch.setattr(engine.closed_form, "descend",
                        lambda *a: ran.append("statistics") or real(*a))
    monkeypatch.setattr(engine, "_loop", lambda *a, real=engine._loop: ran.append("loop") or
                        real(*a))
    engine.train_many(exp.train, train_set, val_set, [0.5 * edge], [3])
    assert ran == [program]


def test_a_diverging_trial_stops_alone_and_the_others_go_on():
    exp, train_set, _, edge = prepared("slope_only", [])
    lrs, epochs = [0.5 * edge, 30 * edge, 0.9 * edge], [50, 50, 50]
    results = engine.train_many(exp.train, train_set, None, lrs, epochs)
    single = alone(exp, train_set, None, lrs[1], 50)
    assert results[1].diverged and results[1].diverged_at == single.diverged_at < 50
    assert not results[0].diverged and len(results[0].train_loss) == 51
    assert not results[2].diverged and len(results[2].train_loss) == 51


def test_the_callback_stops_one_trial():
    exp, train_set, _, edge = prepared("crop_yields_manual", [])
    seen = []

    def stop_the_second_at_5(trial, epoch, train_loss, val_loss):
        seen.append((trial, epoch))
        return trial == 1 and epoch == 5

    results = engine.train_many(exp.train, train_set, None, [0.1 * edge, 0.2 * edge],
                                [10, 10], on_epoch=stop_the_second_at_5)
    assert results[1].stopped_at == 5 and len(results[1].train_loss) == 6
    assert len(results[0].train_loss) == 11 and (0, 10) in seen and (1, 6) not in seen


def test_statistics_with_collinear_columns_and_divergence_match_the_loop():
    """A repeated column makes X̃ᵀX̃ singular (a direction that never moves); lr past the
    stable edge diverges at the same epoch in both programs."""
    exp, train_set, val_set, edge = prepared(
        "synthetic", ["batch_size=null", "data.n_rows=400", "data.n_features=3",
                      "dtype=float64", "model=manual"])
    features = np.hstack([train_set.features, train_set.features[:, :1]])
    doubled = data.Dataset(features, train_set.targets, (*train_set.feature_names, "again"),
                           train_set.target_names)
    val = data.Dataset(np.hstack([val_set.features, val_set.features[:, :1]]), val_set.targets,
                       doubled.feature_names, val_set.target_names)
    edge = theory.learning_rates(doubled, True, "mean")["lr_max_stable"]
    lrs, epochs = [0.2 * edge, 0.9 * edge, 1.5 * edge], [60, 60, 60]
    closed = engine.train_many(exp.train, doubled, val, lrs, epochs, program="statistics")
    looped = engine.train_many(exp.train, doubled, val, lrs, epochs, program="loop")
    for result, loop in zip(closed, looped, strict=True):
        assert result.diverged_at == loop.diverged_at
        np.testing.assert_allclose(result.train_loss, loop.train_loss, rtol=1e-9)
        np.testing.assert_allclose(result.val_loss, loop.val_loss, rtol=1e-9)
        np.testing.assert_allclose(result.model.weight.detach(), loop.model.weight.detach(),
                                   rtol=1e-7, atol=1e-9)
    assert closed[2].diverged and not closed[1].diverged


@pytest.mark.parametrize("offset", [1e6, 1e8, 1e9])
def test_statistics_of_targets_far_from_zero_give_the_loops_curves(offset):
    """Near their minimum the losses are small beside YᵀY (targets near 1e9): summed about
    zero, the closed form's curves sat at 0 or 390 times the loop's."""
    generator = np.random.default_rng(1)
    features = generator.normal(size=(200, 3))
    targets = offset + features @ [[1.0], [2.0], [3.0]] + generator.normal(0, 0.1, (200, 1))
    rows_ = data.Dataset(features, targets, ("a", "b", "c"), ("y",))
    train_set, val_set = data.split(rows_, 0.2, 0)
    exp = config.load("synthetic", ["batch_size=null", "dtype=float64", "model=manual"])
    lrs, epochs = [0.5, 0.1], [400, 300]
    closed = engine.train_many(exp.train, train_set, val_set, lrs, epochs, program="statistics")
    looped = engine.train_many(exp.train, train_set, val_set, lrs, epochs, program="loop")
    # To float64's reach: a bias near 1e9 is held to 1e-7, which moves a loss of 0.01 by 1e-6.
    for result, loop in zip(closed, looped, strict=True):
        np.testing.assert_allclose(result.train_loss, loop.train_loss, rtol=1e-5)
        np.testing.assert_allclose(result.val_loss, loop.val_loss, rtol=1e-5)
    # And they end at the least-squares floor, about 0.01: the noise's variance.
    floor = theory.optimum_loss(train_set, True, "mean")
    assert closed[0].train_loss[-1] == pytest.approx(floor, rel=1e-6)
    assert 0.005 < closed[0].val_loss[-1] < 0.02


@pytest.mark.parametrize("count", [rows.SPLIT_ROWS + 4, 17])  # 3 blocks and 2 rows left
def test_products_over_row_blocks_equal_one_product(monkeypatch, count):
    monkeypatch.setattr(rows, "_row_blocks", lambda x: 1 if len(x) < rows.SPLIT_ROWS else 3)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(count, 6, dtype=torch.float64, generator=generator)
    matrix = torch.randn(6, 4, dtype=torch.float64, generator=generator)
    out = torch.empty(count, 4, dtype=torch.float64)
    rows.rows_times(x, matrix, out)
    torch.testing.assert_close(out, x @ matrix, rtol=1e-12, atol=1e-12)
    a = torch.randn(count, 4, dtype=torch.float64, generator=generator)
    torch.testing.assert_close(rows.transposed_times(a, x), a.T @ x, rtol=1e-12, atol=1e-9)


def test_a_full_batch_read_block_by_block_on_threads_matches_training_alone(monkeypatch):
    # Blocks of 1024 rows (the fewest): every thread's share is many blocks, the last one short.
    monkeypatch.setattr(rows, "BLOCK_BYTES", 1)
    exp, train_set, _, edge = prepared("synthetic", [
        "model=manual", "activation=relu", "batch_size=null", "shuffle=false", "dtype=float64",
        f"data.n_rows={rows.SPLIT_ROWS + 7}", "data.n_features=6", "val_fraction=0"])
    spans = rows.Rows(train_set, torch.device("cpu"), torch.float64, exp.train).spans
    assert spans[0][0] == 0 and spans[-1][1] == train_set.n_rows
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert {span[2] for span in spans} == {1024}
    lrs, epochs = [0.2 * edge, 0.9 * edge], [7, 5]
    for lr, count, result in zip(lrs, epochs, engine.train_many(
            exp.train, train_set, None, lrs, epochs, program="loop"), strict=True):
        single = alone(exp, train_set, None, lr, count)
        np.testing.assert_allclose(result.train_loss, single.train_loss, rtol=1e-12)
        torch.testing.assert_close(result.model.weight, single.model.weight.detach(),
                                   rtol=1e-12, atol=1e-12)


def test_statistics_never_give_a_negative_loss_where_the_data_fit_exactly():
    # y = 2x + 1 exactly: the loop ends at 1e-12; the closed form's constants cancel to
    # -2e-14 unless held at 0.
    exp, train_set, _, edge = prepared("line_2x_plus_1", [])
    closed, = engine.train_many(exp.train, train_set, None, [0.9 * edge], [3000],
                                program="statistics")
    loop, = engine.train_many(exp.train, train_set, None, [0.9 * edge], [3000], program="loop")
    assert min(closed.train_loss) >= 0 and min(loop.train_loss) >= 0
    np.testing.assert_allclose(closed.train_loss, loop.train_loss, rtol=2e-4, atol=1e-9)


def test_statistics_overflow_float32_where_the_loop_does():
    exp, train_set, _, _ = prepared("line_fit_15pts", [
        "data.features=[[1e20], [2e20], [3e20]]", "data.targets=[[1e20], [2e20], [3.1e20]]"])
    for program in ("statistics", "loop"):
        result, = engine.train_many(exp.train, train_set, None, [1e-3], [5], program=program)
        assert result.diverged_at == 0 and result.train_loss == [float("inf")]


def test_a_sum_of_squares_over_many_rows_and_trials_keeps_float32_s_precision():
    residual = torch.randn(400_000, 8, 2, generator=torch.Generator().manual_seed(0))
    exact = residual.double().square().sum(dim=(0, 2))
    torch.testing.assert_close(rows._squares(residual), exact, rtol=1e-7, atol=0)


def test_statistics_give_the_loops_parameter_path():
    for name in ("slope_only", "line_fit_15pts"):  # one weight; a weight and a bias
        exp, train_set, _, edge = prepared(name, [])
        closed, = engine.train_many(exp.train, train_set, None, [0.5 * edge], [9],
                                    program="statistics", paths=True)
        single = alone(exp, train_set, None, 0.5 * edge, 9)
        assert len(closed.parameter_path) == len(single.parameter_path) == 10
        np.testing.assert_allclose(closed.parameter_path, single.parameter_path, rtol=1e-5)


def test_curves_too_long_for_memory_are_refused_in_one_line():
    from pipeline.errors import UserError

    exp, train_set, _, edge = prepared("slope_only", [])
    with pytest.raises(UserError, match="do not fit in memory"):
        engine.train_many(exp.train, train_set, None, [0.5 * edge], [10**11])
