"""What `pipeline sweep` searches and how it runs: the lr and epochs :class:`Range` (from a
config's ``sweep:`` section or ``--lr-range``/``--epochs-range``) and :class:`SweepSettings`,
the command line's other options.

Light on purpose: the CLI checks its options with these before it imports Optuna or MLflow,
so bad input answers at once.
"""

from __future__ import annotations

import math
import os
from typing import Annotated, Literal, NamedTuple

from pydantic import AfterValidator

from pipeline.errors import UserError
from pipeline.schema import EPOCHS_MAX, Count, Integer, Number, Schema, Seed, must


class Range(NamedTuple):
    """A range `pipeline sweep` draws from, ``[low, high]`` with low <= high (equal bounds fix
    the value, and the sweep searches the other one); a plain pair to Optuna, MLflow and JSON.
    Fields typed :data:`LrRange` or :data:`EpochsRange` check it."""

    low: float
    high: float

    @classmethod
    def of(cls, bounds: tuple[float, ...] | None) -> Range | None:
        """``bounds`` as a range; none where it is absent or ``[]``."""
        if not bounds:
            return None
        if len(bounds) != 2:
            raise ValueError(f"must be [low, high], got {list(bounds)}")
        low, high = bounds
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(f"must be two finite numbers [low, high], got [{low}, {high}]")
        if low > high:
            raise ValueError(f"must be a range [low, high] with low <= high, got [{low}, {high}]")
        return cls(low, high)

    @classmethod
    def lr(cls, bounds: tuple[float, ...] | None) -> Range | None:
        """lr is drawn log-uniformly, so its range lies above 0."""
        if (found := cls.of(bounds)) and found.low <= 0:
            raise ValueError(f"must lie above 0, got [{found.low}, {found.high}]")
        return found

    @classmethod
    def epochs(cls, bounds: tuple[int, ...] | None) -> Range | None:
        if (found := cls.of(bounds)) and found.low < 1:
            raise ValueError(f"must start at 1 or more, got [{found.low}, {found.high}]")
        if found and found.high > EPOCHS_MAX:
            raise ValueError(f"must end at {EPOCHS_MAX:,} or less (one loss-curve point an "
                             f"epoch), got [{found.low}, {found.high}]")
        return found


# A config's sweep.lr and sweep.epochs, and --lr-range and --epochs-range: numbers as written,
# then checked into a Range (the message names the key or option).
LrRange = Annotated[tuple[Number, ...] | None, AfterValidator(Range.lr)]
EpochsRange = Annotated[tuple[Integer, ...] | None, AfterValidator(Range.epochs)]


PATIENCE_ENV = "PIPELINE_STORAGE_PATIENCE"
PATIENCE_S = 30.0  # a database restart fits; a database gone for good is said soon


def storage_patience() -> float:
    """How long a sweep's worker waits for an Optuna database that stopped answering before it
    gives up (see ``outages.Outage``): ``PATIENCE_S``, or the seconds in the environment's
    ``PIPELINE_STORAGE_PATIENCE``."""
    given = os.environ.get(PATIENCE_ENV)
    if given is None:
        return PATIENCE_S
    try:
        seconds = float(given)
    except ValueError:
        seconds = math.nan
    if not 0 <= seconds < math.inf:
        raise UserError(f"{PATIENCE_ENV}={given!r}: give a number of seconds, 0 or more")
    return seconds


DEFAULT_BATCH = 8  # trials a worker trains together, at most, unless --batch says otherwise


class SweepSettings(Schema):
    """How `pipeline sweep` runs: trial count, storage, workers, sampler, pruner, ranges."""

    n_trials: Count
    storage: str = "optuna.journal"
    study_name: Annotated[str, must(lambda name: name.strip() == name and name.isprintable()
                                    and name != "", "must be a name of printable characters, "
                                    "without spaces at either end")] | None = None
    workers: Annotated[Integer, must(lambda n: n >= 0,
                                     "must be >= 0 (0: print the worker command)")] = 1
    timeout: Annotated[Number, must(lambda s: s > 0, "must be > 0 seconds")] | None = None
    sampler: Literal["tpe", "random"] = "tpe"
    pruner: Literal["median", "percentile", "hyperband", "none"] = "median"
    seed: Seed | None = None
    log_models: Literal["best", "all"] = "best"
    lr_range: LrRange = None
    epochs_range: EpochsRange = None
    batch: Count | None = None  # trials each worker trains together; None: batch_size()

    def batch_size(self, missing: int, workers: int) -> int:
        """``--batch``, else up to 8 trials, split so that each of the ``workers`` local ones
        gets some of the ``missing`` trials (10 for 2 workers: 5 each, not 8 and 2)."""
        if self.batch is not None:
            return self.batch
        return max(1, min(DEFAULT_BATCH, -(-missing // max(1, workers))))

    @classmethod
    def key(cls, field: str) -> str:
        return "--" + field.replace("_", "-")  # messages name the option, as it was typed
