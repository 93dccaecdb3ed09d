"""The figures: what they draw, read back from the matplotlib objects."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import plots

RATES = {"lr_max_stable": 0.02, "lr_best_constant": 0.015}


def vertical_lines(ax) -> list[float]:
    return sorted(line.get_xdata()[0] for line in ax.lines
                  if len(set(line.get_xdata())) == 1 and len(line.get_xdata()) == 2)


def trials():
    return [
        {"number": 0, "lr": 1e-3, "epochs": 50, "value": 0.5, "state": "COMPLETE",
         "diverged": False},
        {"number": 1, "lr": 1e-2, "epochs": 80, "value": 0.01, "state": "COMPLETE",
         "diverged": False},
        {"number": 2, "lr": 5e-4, "epochs": 20, "value": 3.0, "state": "PRUNED",
         "diverged": False},
        {"number": 3, "lr": 0.05, "epochs": 90, "value": float("nan"), "state": "PRUNED",
         "diverged": True},
    ]


def test_trials_scatter_marks_theorys_rates_and_every_kind_of_trial():
    fig = plots.trials_scatter(trials(), RATES, "study s")
    left, right = fig.axes[:2]
    for ax in (left, right):
        assert vertical_lines(ax) == [0.015, 0.02]
        assert ax.get_xscale() == "log"
    labels = left.get_legend_handles_labels()[1]
    assert {"complete", "pruned (last value)", "diverged", "best", "largest stable lr",
            "best constant lr"} <= set(labels)
    # The best trial's star sits at its lr and value; the diverged one at lr 0.05, on top.
    star = next(c for c in left.collections if c.get_label() == "best")
    assert star.get_offsets().tolist() == [[1e-2, 0.01]]
    lost = next(c for c in left.collections if c.get_label() == "diverged")
    assert lost.get_offsets()[0][0] == 0.05 and lost.get_offsets()[0][1] > 3.0
    assert left.get_yscale() == "log"  # values span more than two decades
    plots.close(fig)


def test_trials_overlay_draws_the_best_bold_on_a_log_axis():
    curves = {0: [10.0, 1.0, 0.5], 1: [10.0, 0.1, 0.01], 3: [10.0, 1e3, float("inf")]}
    fig = plots.trials_overlay(curves, {3}, 1, "study s", "train_loss", optimum=0.005)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    best = next(line for line in ax.lines if line.get_label() == "best: trial 1")
    assert best.get_linewidth() > 2 and list(best.get_ydata()) == [10.0, 0.1, 0.01]
    dashed = [line for line in ax.lines if line.get_linestyle() == "--" and len(line.get_ydata())]
    assert [list(line.get_ydata()) for line in dashed] == [[10.0, 1e3]]  # cut at inf
    optimum = next(line for line in ax.lines if "lowest possible" in str(line.get_label()))
    assert optimum.get_ydata()[0] == pytest.approx(0.005)
    plots.close(fig)


def test_loss_curve_draws_the_optimum():
    fig = plots.loss_curve([100.0, 1.0, 0.2], [], "run", optimum=0.1)
    ax = fig.axes[0]
    line = next(line for line in ax.lines if str(line.get_label()).startswith("optimum"))
    assert line.get_ydata()[0] == 0.1 and ax.get_yscale() == "log"
    plots.close(fig)


def test_loss_surface_marks_the_minimum():
    x = np.array([[1.0], [2.0], [3.0]])
    y = 2 * x
    fig = plots.loss_surface(x, y, [[float(w)] for w in np.linspace(-5, 2, 30)], "mean", "s")
    star = next(c for c in fig.axes[0].collections if "minimum" in c.get_label())
    assert star.get_offsets()[0][0] == pytest.approx(2.0)
    assert len(fig.axes[0].texts) <= 12  # of 30 steps, about one in four labelled
    plots.close(fig)


def test_the_loss_surface_of_a_relu_model_goes_through_the_relu():
    # With w < 0 every prediction is clamped to 0: the loss is flat there, as training saw it.
    x = np.linspace(0.1, 3, 20)[:, None]
    y = 0.175 * x + 0.4
    path = [[-0.5], [-0.5], [-0.5]]
    figure = plots.loss_surface(x, y, path, "sum", "loss over w", activation="relu")
    surface, descent = figure.axes[0].lines[:2]
    grid = surface.get_xdata()
    expected = ((np.clip(np.outer(grid, x[:, 0]), 0, None) - y[:, 0]) ** 2).sum(axis=1)
    np.testing.assert_allclose(surface.get_ydata(), expected, rtol=1e-12)
    np.testing.assert_allclose(descent.get_ydata(), (y ** 2).sum(), rtol=1e-12)  # dead ReLU
    plots.close(figure)


def test_a_title_with_a_character_the_font_lacks_draws_without_warnings():
    import io
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        fig = plots.loss_curve([3.0, 2.0, 1.0], [], "study r🚀: train_loss")
        with plots.quiet_glyphs():  # as tracking.log_figure draws it
            fig.savefig(io.BytesIO(), format="png")
        plots.close(fig)
    assert [str(w.message) for w in caught] == []
