"""Figures logged with each run: loss curves, the fit, and the loss surface with the descent path.

Each function returns a matplotlib ``Figure`` (Agg backend, no display needed).
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

MAX_SCATTER_POINTS = 5000


def loss_curve(train_loss: list[float], val_loss: list[float], title: str):
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(len(train_loss)), train_loss, marker="." if len(train_loss) < 60 else None,
            label="train_loss")
    if val_loss:
        ax.plot(range(len(val_loss)), val_loss, label="val_loss")
    finite = [v for v in [*train_loss, *val_loss] if np.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 100:
        ax.set_yscale("log")
    ax.set(xlabel="epoch", ylabel="loss", title=title)
    ax.legend()
    fig.tight_layout()
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
    fig.tight_layout()
    return fig


def loss_surface(features: np.ndarray, targets: np.ndarray, path: list[list[float]],
                 reduction: str, title: str):
    """Loss of ``w·x`` over a range of w, with the values gradient descent visited."""
    x, y = features[:, 0], targets[:, 0]
    visited = np.array([p[0] for p in path])
    finite = visited[np.isfinite(visited)]
    centre = float(np.dot(x, y) / np.dot(x, x)) if np.dot(x, x) else 0.0
    span = max(np.abs(finite - centre).max() if finite.size else 1.0, 1.0) * 1.2
    grid = np.linspace(centre - span, centre + span, 200)

    def loss(w):
        squared = (np.outer(w, x) - y) ** 2
        return squared.mean(axis=1) if reduction == "mean" else squared.sum(axis=1)

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(grid, loss(grid), label="loss(w)")
    ax.plot(finite, loss(finite), "o-", color="C3", label="gradient descent")
    for step, w in enumerate(finite):
        ax.annotate(str(step), (w, loss(np.array([w]))[0]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.set(xlabel="w", ylabel="loss", title=title)
    ax.legend()
    fig.tight_layout()
    return fig


def close(fig) -> None:
    plt.close(fig)


def _subsample(n: int) -> np.ndarray:
    if n <= MAX_SCATTER_POINTS:
        return np.arange(n)
    return np.random.default_rng(0).choice(n, MAX_SCATTER_POINTS, replace=False)
