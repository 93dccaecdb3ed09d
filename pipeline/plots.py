"""Figures logged with each run: loss curves, the fit, and the loss surface with the descent path.

Each function returns a matplotlib ``Figure`` (Agg backend, no display needed).
"""

from __future__ import annotations

import contextlib
import warnings

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.loss import squared_error  # noqa: E402

MAX_SCATTER_POINTS = 5000


def loss_curve(train_loss: list[float], val_loss: list[float], title: str,
               optimum: float | None = None):
    """Both curves against the epoch; log y when they span two decades; the least-squares
    optimum (the lowest training loss any linear model reaches) as a line."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(len(train_loss)), train_loss, marker="." if len(train_loss) < 60 else None,
            label="train_loss")
    if val_loss:
        ax.plot(range(len(val_loss)), val_loss, label="val_loss")
    finite = [v for v in [*train_loss, *val_loss] if np.isfinite(v)]
    if optimum is not None and np.isfinite(optimum):
        ax.axhline(optimum, color="grey", linestyle=":", label=f"optimum {optimum:.4g}")
        finite.append(optimum)
    _log_y_if_wide(ax, finite)
    ax.set(xlabel="epoch", ylabel="loss", title=title)
    ax.legend()
    _tight(fig)
    return fig


def _log_y_if_wide(ax, values) -> None:
    values = [v for v in values if np.isfinite(v)]
    if values and min(values) > 0 and max(values) / min(values) > 100:
        ax.set_yscale("log")


# --- a sweep's trials, on its parent run --------------------------------------------------------


def trials_overlay(curves: dict[int, list[float]], diverged: set[int], best: int | None,
                   title: str, metric: str, optimum: float | None = None):
    """Every trial's curve of the objective's loss, log y: the best one bold, diverged ones
    red and dashed (cut where they left finite numbers)."""
    fig, ax = plt.subplots(figsize=(8, 5))
    values = []
    for number, curve in curves.items():
        curve = np.asarray(curve, dtype=float)
        shown = curve[np.isfinite(curve)]
        if number == best or not shown.size:
            continue
        values.extend(shown)
        if number in diverged:
            ax.plot(shown, color="C3", linestyle="--", linewidth=0.8, alpha=0.7)
        else:
            ax.plot(shown, color="grey", linewidth=0.7, alpha=0.5)
    if best is not None and best in curves:
        ax.plot(curves[best], color="C0", linewidth=2.2, label=f"best: trial {best}")
        values.extend(v for v in curves[best] if np.isfinite(v))
    ax.plot([], [], color="grey", label="other trials")
    if diverged:
        ax.plot([], [], color="C3", linestyle="--", label="diverged")
    if optimum is not None and np.isfinite(optimum):
        ax.axhline(optimum, color="black", linestyle=":", label=f"lowest possible {optimum:.4g}")
        values.append(optimum)
    positive = [v for v in values if v > 0]
    if positive:
        ax.set_yscale("log")
        ax.set_ylim(min(positive) * 0.8, min(max(positive), 1e6 * min(positive)) * 1.5)
    ax.set(xlabel="epoch", ylabel=metric, title=title)
    ax.legend(loc="upper right")
    _tight(fig)
    return fig


def trials_scatter(trials: list[dict], rates: dict[str, float], title: str):
    """lr against the objective, and lr against epochs coloured by it: every trial, pruned
    (grey ×) and diverged (red ×, along the top) included; theory's rates as lines."""
    from matplotlib.colors import LogNorm

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    done = [t for t in trials if t["state"] == "COMPLETE" and np.isfinite(t["value"])]
    pruned = [t for t in trials if t["state"] == "PRUNED" and not t["diverged"]]
    lost = [t for t in trials if t["diverged"]]
    values = [t["value"] for t in done] + [t["value"] for t in pruned
                                           if t["value"] is not None and np.isfinite(t["value"])]
    top = max(values) * 2 if values else 1.0
    norm = None
    if done and min(t["value"] for t in done) > 0:
        low, high = min(t["value"] for t in done), max(t["value"] for t in done)
        norm = LogNorm(low, high if high > low else low * 1.01)
    colours = [t["value"] for t in done]
    left.scatter([t["lr"] for t in done], colours, c="C0", s=18, label="complete")
    shown = [t for t in pruned if t["value"] is not None and np.isfinite(t["value"])]
    left.scatter([t["lr"] for t in shown], [t["value"] for t in shown], marker="x",
                 color="grey", s=18, label="pruned (last value)")
    left.scatter([t["lr"] for t in lost], [top] * len(lost), marker="x", color="C3", s=24,
                 label="diverged")
    left.set(xscale="log", xlabel="lr", ylabel="objective")
    _log_y_if_wide(left, [*values, top])
    points = right.scatter([t["lr"] for t in done], [t["epochs"] for t in done], c=colours,
                           norm=norm, cmap="viridis_r", s=24)
    right.scatter([t["lr"] for t in pruned], [t["epochs"] for t in pruned], marker="x",
                  color="grey", s=18)
    right.scatter([t["lr"] for t in lost], [t["epochs"] for t in lost], marker="x",
                  color="C3", s=24)
    if done:
        best = min(done, key=lambda t: t["value"])
        for ax, y in ((left, best["value"]), (right, best["epochs"])):
            ax.scatter([best["lr"]], [y], marker="*", s=220, color="gold", edgecolor="black",
                       zorder=5, label="best" if ax is left else None)
        fig.colorbar(points, ax=right, label="objective (lower is better)")
    right.set(xscale="log", xlabel="lr", ylabel="epochs")
    for ax in (left, right):
        ax.axvline(rates["lr_max_stable"], color="C3", linestyle="--",
                   label="largest stable lr" if ax is left else None)
        ax.axvline(rates["lr_best_constant"], color="C2", linestyle=":",
                   label="best constant lr" if ax is left else None)
    left.legend(fontsize=8, loc="best")
    fig.suptitle(title)
    _tight(fig)
    return fig


def fit(features: np.ndarray, targets: np.ndarray, predictions: np.ndarray,
        feature_names, target_names, title: str):
    """1-D input: data and fitted line per target. Otherwise: predicted against actual."""
    keep = _subsample(len(features))
    k = targets.shape[1]
    fig, axes = plt.subplots(1, k, figsize=(5 * k, 4), squeeze=False)
    for j, ax in enumerate(axes[0]):
        if features.shape[1] == 1:
            order = np.argsort(features[keep, 0])
            ax.scatter(features[keep, 0], targets[keep, j], s=12, label="data")
            ax.plot(features[keep, 0][order], predictions[keep, j][order], color="C3",
                    label="model")
            ax.set(xlabel=feature_names[0], ylabel=target_names[j])
        else:
            ax.scatter(targets[keep, j], predictions[keep, j], s=12)
            low = min(targets[keep, j].min(), predictions[keep, j].min())
            high = max(targets[keep, j].max(), predictions[keep, j].max())
            ax.plot([low, high], [low, high], color="grey", linestyle="--", label="perfect")
            ax.set(xlabel=f"actual {target_names[j]}", ylabel=f"predicted {target_names[j]}")
        ax.legend()
    fig.suptitle(title)
    _tight(fig)
    return fig


def loss_surface(features: np.ndarray, targets: np.ndarray, path: list[list[float]],
                 reduction: str, title: str, activation: str = "none"):
    """Loss of ``w·x`` (through the ReLU, where the model has one) over a range of w, with the
    values gradient descent visited."""
    x, y = features[:, 0], targets[:, 0]
    visited = np.array([p[0] for p in path])
    finite = visited[np.isfinite(visited)]
    centre = float(np.dot(x, y) / np.dot(x, x)) if np.dot(x, x) else 0.0
    span = max(np.abs(finite - centre).max() if finite.size else 1.0, 1.0) * 1.2
    grid = np.linspace(centre - span, centre + span, 200)

    def loss(w):
        out = np.outer(w, x)
        return squared_error(np.clip(out, 0, None) if activation == "relu" else out, y,
                             reduction, models=True)

    if activation == "relu":  # no closed form: the lowest point of the grid
        centre = float(grid[np.argmin(loss(grid))])

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(grid, loss(grid), label="loss(w)")
    ax.plot(finite, loss(finite), "o-", color="C3", label="gradient descent")
    ax.scatter([centre], loss(np.array([centre])), marker="*", s=200, color="gold",
               edgecolor="black", zorder=5, label=f"minimum, w = {centre:.4g}")
    # A few step numbers, alternately above and below the path, so that none overlap.
    every = max(1, len(finite) // 8)
    for step in sorted({*range(0, len(finite), every), len(finite) - 1}):
        w = finite[step]
        ax.annotate(str(step), (w, loss(np.array([w]))[0]), textcoords="offset points",
                    xytext=(4, 6 if step % (2 * every) == 0 else -12), fontsize=8)
    ax.set(xlabel="w", ylabel="loss", title=title)
    ax.legend()
    _tight(fig)
    return fig


@contextlib.contextmanager
def quiet_glyphs():
    """Lay out or draw text without matplotlib's warning for each character its font lacks
    (an emoji in a name, drawn as a box): one per character and drawing, they would bury the
    command's own lines."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"Glyph \d+ .* missing from font", UserWarning)
        yield


def _tight(fig) -> None:
    with quiet_glyphs():
        fig.tight_layout()


def close(fig) -> None:
    plt.close(fig)


def _subsample(n: int) -> np.ndarray:
    if n <= MAX_SCATTER_POINTS:
        return np.arange(n)
    return np.random.default_rng(0).choice(n, MAX_SCATTER_POINTS, replace=False)
