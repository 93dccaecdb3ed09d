"""What every stage passes around: a dataset (float64 features ``n × d`` and targets ``n × k``
with column names, and the true weights where the recipe knows them), the standard scaling of
its features, and the error bad data raises."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from pipeline.errors import UserError


class DataError(UserError):
    """A data file that cannot be used: missing, empty, malformed, or lacking columns."""


@dataclass(frozen=True)
class Scaler:
    """Standard scaling: ``(x - mean) / std`` per feature, with the training rows' statistics
    (a constant feature keeps std 1). A model trained on scaled rows is exported with it, so
    that it takes raw units."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, features: np.ndarray) -> Scaler:
        std = features.std(axis=0)
        return cls(features.mean(axis=0), np.where(std > 0, std, 1.0))

    def apply(self, features: np.ndarray) -> np.ndarray:
        return (features - self.mean) / self.std

    def undo(self, features: np.ndarray) -> np.ndarray:
        return features * self.std + self.mean


@dataclass(frozen=True)
class Dataset:
    features: np.ndarray
    targets: np.ndarray
    feature_names: tuple[str, ...]
    target_names: tuple[str, ...]
    true_weight: np.ndarray | None = None  # (k, d)
    true_bias: np.ndarray | None = None  # (k,)
    scaler: Scaler | None = None  # set when ``features`` are scaled: raw = scaler.undo(...)

    @property
    def n_rows(self) -> int:
        return self.features.shape[0]

    def rows(self, index: np.ndarray) -> Dataset:
        return dataclasses.replace(self, features=self.features[index], targets=self.targets[index])

    def columns(self, features: tuple[str, ...], targets: tuple[str, ...]) -> Dataset:
        """The named features and targets, in that order; the true weights follow them."""
        if self.scaler is not None:
            raise ValueError("columns are picked from raw rows, before any scaling")
        f = [self.feature_names.index(name) for name in features]
        t = [self.target_names.index(name) for name in targets]
        return dataclasses.replace(
            self, features=self.features[:, f], targets=self.targets[:, t],
            feature_names=tuple(features), target_names=tuple(targets),
            true_weight=None if self.true_weight is None else self.true_weight[np.ix_(t, f)],
            true_bias=None if self.true_bias is None else self.true_bias[t])

    def frame(self):
        """Features then targets as one pandas DataFrame, named columns."""
        import pandas as pd

        # One block, not a column at a time: 0.03 s for 1,000,000 x 34 rows instead of 0.66 s.
        return pd.DataFrame(np.concatenate([self.features, self.targets], axis=1),
                            columns=[*self.feature_names, *self.target_names], copy=False)

    def truth(self) -> dict | None:
        if self.true_weight is None:
            return None
        return {"weight": self.true_weight.tolist(), "bias": self.true_bias.tolist()}
