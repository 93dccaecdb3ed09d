"""The squared error every part of the project minimises, reports or draws.

One function for numpy arrays and torch tensors alike (both have ``**``, ``mean`` and ``sum``).
"""

from __future__ import annotations


def squared_error(pred, target, reduction: str = "mean", models: bool = False):
    """``(pred - target)²`` averaged over every element (``mean``) or summed (``sum``).

    With ``models``, the leading axis of ``pred`` indexes models (trials, or points of a loss
    surface): one value per model.
    """
    squared = (pred - target) ** 2
    if models:
        squared = squared.reshape(squared.shape[0], -1)
        return squared.mean(1) if reduction == "mean" else squared.sum(1)
    return squared.mean() if reduction == "mean" else squared.sum()
