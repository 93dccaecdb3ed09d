"""The Optuna study behind a sweep: its storage, its exact total, and what workers read.

``--n-trials N`` is the number of *finished* trials (complete or pruned). Failed trials do not
count, so their budget is run again. Trials are created one at a time under a lock (a
PostgreSQL advisory lock, else a file lock on this machine) by a storage that refuses to
create one once finished, running and waiting trials reach N: K workers never overshoot, which
Optuna's ``MaxTrialsCallback`` alone does by up to K-1.

Dead workers and their trials are :mod:`pipeline.dead_trials`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.trial import FrozenTrial, TrialState

from pipeline import redact
from pipeline.dead_trials import (
    GRACE_S,
    HEARTBEAT_S,
    WORKER_ATTR,
    drop_torn_tail,
    worker_identity,
)
from pipeline.errors import UserError, first_line

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
IN_BUDGET = (*FINISHED, TrialState.RUNNING, TrialState.WAITING)
SPEC_ATTR = "pipeline"  # the study's user attribute holding the Spec


class SweepError(UserError):
    """A sweep that cannot start: unreachable storage, a study made for other settings."""


class NotYet(SweepError):
    """What a worker may wait out: a database still starting, a study not yet set up."""


class BudgetReached(Exception):
    """The study holds its total of trials (finished, running or waiting): create no more."""


# --- storages with an exact total ---------------------------------------------------------------


class _Budget:
    """Storage mixin: refuse to create a trial beyond ``total`` (retries and enqueued trials,
    which come with a template, pass: the trial they replace no longer counts)."""

    total: int | None = None

    def _within_total(self, study_id: int, template_trial: FrozenTrial | None, create) -> int:
        if template_trial is not None or self.total is None:
            return create()
        with self.lock(study_id):
            held = len(self.get_all_trials(study_id, deepcopy=False, states=IN_BUDGET))
            if held >= self.total:
                raise BudgetReached(held)
            trial_id = create()
        # Claimed at once, so that a worker killed now leaves a trial others can recover.
        number = self.get_trial_number_from_id(trial_id)
        self.set_trial_user_attr(trial_id, WORKER_ATTR, worker_identity(number))
        return trial_id

    def lock(self, key: int):
        """Held by one process at a time among those using this storage (``key`` names which
        lock: a study's id guards its trial creation; negative keys other steps)."""
        return file_lock(f"{self.lock_name}:{key}")


class JournalStudyStorage(_Budget, JournalStorage):
    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        return self._within_total(study_id, template_trial,
                                  lambda: super(_Budget, self).create_new_trial(
                                      study_id, template_trial))


class RDBStudyStorage(_Budget, RDBStorage):
    stale_trials: Callable[[optuna.Study, FrozenTrial], None] | None = None

    def get_heartbeat_stale_trial_callback(self):
        # Set by recover_dead_trials for the time it holds the lock (see there).
        return self.stale_trials

    def _create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None):
        # Optuna wraps every RDBStorage in a cache that calls this method rather than the
        # public create_new_trial, so the total is kept here.
        trial_id = self._within_total(
            study_id, template_trial,
            lambda: super(_Budget, self)._create_new_trial(study_id, template_trial)._trial_id)
        return self.get_trial(trial_id)

    @contextlib.contextmanager
    def lock(self, key: int) -> Iterator[None]:
        if self.engine.dialect.name != "postgresql":
            with super().lock(key):
                yield
            return
        import sqlalchemy

        key = int.from_bytes(hashlib.sha256(b"pipeline").digest()[:4], "big") + key
        with self.engine.connect() as connection:
            connection.execute(sqlalchemy.text("select pg_advisory_lock(:key)"), {"key": key})
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text("select pg_advisory_unlock(:key)"),
                                   {"key": key})
                connection.commit()


@contextlib.contextmanager
def file_lock(name: str) -> Iterator[None]:
    """A lock shared by the processes of this machine that use ``name``."""
    import filelock

    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    with filelock.FileLock(Path(tempfile.gettempdir()) / f"pipeline-{digest}.lock"):
        yield


def open_storage(url: str, total: int | None = None):
    """A journal file for a path, a relational database for a URL; at most ``total`` trials."""
    if not url.strip():
        raise SweepError("the Optuna storage is empty; give a journal file (optuna.journal) "
                         "or a database URL (sqlite:///optuna.db, postgresql://...)")
    if url.startswith("sqlite:") and url.partition(":///")[2].partition("?")[0] in (
            "", ":memory:"):
        raise SweepError(f"storage {redact.mask(url)} is a database in memory: no trial would "
                         "be kept, and no worker could join; give a file, e.g. "
                         "sqlite:///optuna.db")
    if "://" not in url:
        from optuna.storages.journal import JournalFileBackend

        _check_journal(url)
        try:
            dropped = drop_torn_tail(url)
            if dropped:
                logging.getLogger(__name__).warning(
                    "journal %s ended in %d bytes of a record cut short (a writer was killed); "
                    "they are dropped, as Optuna's reader skips them", url, dropped)
            storage = JournalStudyStorage(JournalFileBackend(url))
        except OSError as err:
            raise SweepError(f"cannot open journal storage {url}: {err.strerror}") from None
        except Exception as err:  # replaying the log failed: a line Optuna did not write
            raise SweepError(f"journal storage {url} cannot be read (damaged?): "
                             f"{first_line(err)}") from None
        storage.lock_name = str(Path(url).resolve())
    else:
        storage = _open_rdb(url)
        storage.lock_name = url
    storage.total = total
    return storage


JOURNAL_START = b'{"op_code":'  # how every record of Optuna's journal file begins


def _check_journal(path: str) -> None:
    """Refuse a file that is not an Optuna journal before anything reads, cuts or appends to
    it (an SQLite database given without ``sqlite:///``, a text file mistyped)."""
    try:
        kind = os.stat(path).st_mode
    except OSError:
        return  # missing (a new journal) or unreadable: said where it is opened
    if not (stat.S_ISREG(kind) or stat.S_ISDIR(kind)):  # a device, a pipe: nothing to keep
        raise SweepError(f"{path} is not a regular file; give a journal file or a database URL")
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError:
        return
    if head == b"SQLite format 3\x00":
        raise SweepError(f"{path} is an SQLite database, not an Optuna journal; give it as "
                         f"sqlite:///{path} (it is left as it is)")
    head = head[:len(JOURNAL_START)]
    if head and not JOURNAL_START.startswith(head):  # a torn first record is a prefix
        raise SweepError(f"{path} is not an Optuna journal (an Optuna journal's records "
                         f"begin {JOURNAL_START.decode()}); it is left as it is")


RDB_ATTEMPTS = 4  # opening a relational storage, for a race on its first use


def _open_rdb(url: str) -> RDBStudyStorage:
    engine_kwargs = {"pool_pre_ping": True}
    if url.startswith("postgresql"):
        # One process holds a few connections (trials, heartbeats); keep each pool small so
        # that many workers fit under PostgreSQL's max_connections (100 by default).
        engine_kwargs.update(pool_size=2, max_overflow=3)
    for attempt in range(RDB_ATTEMPTS):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStudyStorage(
                    url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S,
                    grace_period=GRACE_S,
                )
        except Exception as err:  # SQLAlchemy raises many types for a bad or unreachable one
            # Optuna creates a fresh database's tables without a lock: of two processes
            # starting at once, one sees the other's tables half made. Its second try finds
            # them made.
            if attempt + 1 < RDB_ATTEMPTS and any(race in str(err) for race in (
                    "already exists", "duplicate key", "UNIQUE constraint failed",
                    "database is locked")):
                time.sleep(0.5 * (attempt + 1))
                continue
            raise _rdb_error(url, err) from None
    raise AssertionError("unreachable")


def _rdb_error(url: str, err: Exception) -> SweepError:
    reason = first_line(err)
    if "DB access module" in reason or isinstance(err, ImportError):
        reason = ("its database driver is not installed (postgresql:// needs psycopg 3: "
                  "pip install 'psycopg[binary]'; mysql:// needs PyMySQL)")
    elif any(refusal in reason for refusal in (
            "too many clients", "too many connections", "remaining connection slots")):
        reason = ("the database refuses more connections; raise its max_connections "
                  "or run fewer workers")
    return NotYet(f"cannot open storage {redact.mask(url)}: {redact.scrub(reason, url)[:200]}")


# --- what a worker needs ------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """Everything a worker needs, kept in the study's user attributes by the coordinator."""

    experiment: dict  # the resolved config, as config.to_raw gives it
    experiment_name: str
    digest: str
    lr: tuple[float, float]
    epochs: tuple[int, int]
    n_trials: int
    parent_run_id: str
    experiment_id: str
    tracking_uri: str  # without credentials
    data_uri: str
    data_key: str
    log_models: str
    sampler: str
    pruner: str
    seed: int | None
    batch: int = 1  # trials a worker trains together

    def to_attr(self) -> dict:
        return asdict(self)

    @classmethod
    def from_attr(cls, attr: dict) -> Spec:
        attr = dict(attr)
        attr["lr"], attr["epochs"] = tuple(attr["lr"]), tuple(attr["epochs"])
        return cls(**attr)


def read_spec(study: optuna.Study) -> Spec:
    attr = study.user_attrs.get(SPEC_ATTR)
    if attr is None:
        raise NotYet(f"study {study.study_name!r} was not set up by `pipeline sweep`; "
                     "run `pipeline sweep -e EXPERIMENT --study-name ...` first")
    return Spec.from_attr(attr)


def make_sampler(name: str, seed: int | None) -> optuna.samplers.BaseSampler:
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # Trials asked together (a batch, other workers) count as the worst seen so far
        # while they run, so TPE does not propose the same point to all of them.
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    if name == "percentile":
        return optuna.pruners.PercentilePruner(25.0, n_startup_trials=5)
    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0)


def load(storage, study_name: str, sampler: str = "tpe", pruner: str = "median",
         seed: int | None = None, offset: int = 0, create: bool = False) -> optuna.Study:
    """Load (or with ``create``, create) the study. The sampler's seed moves on with the trials
    already held and with ``offset`` (one per worker), so no two workers or resumes propose
    the same points, while one worker on a fresh study repeats exactly."""
    try:
        try:
            held = len(storage.get_all_trials(
                storage.get_study_id_from_name(study_name), deepcopy=False))
        except KeyError:
            if not create:
                raise NotYet(f"no study named {study_name!r} in this storage") from None
            held = 0
        if seed is not None:
            seed = (seed + held + offset) % 2**32
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.create_study(
                study_name=study_name, storage=storage, direction="minimize",
                sampler=make_sampler(sampler, seed), pruner=make_pruner(pruner),
                load_if_exists=True,
            )
    except (ValueError, RuntimeError) as err:
        raise SweepError(f"study {study_name!r} cannot be read: {first_line(err)}") from None


def check_ours(study_name: str, directions, user_attrs: dict, held: int) -> None:
    """Refuse a study of the same name made some other way (plain Optuna, another tool): its
    trials are not ours to count or to summarise. A study of ours minimises, and holds its
    spec before any trial."""
    if directions != [optuna.study.StudyDirection.MINIMIZE] or (
            held and SPEC_ATTR not in user_attrs):
        raise SweepError(f"study {study_name!r} in this storage was not made by `pipeline "
                         "sweep`; pass --study-name to start another study")


def counts(study: optuna.Study) -> dict[str, int]:
    states: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        states[trial.state.name] = states.get(trial.state.name, 0) + 1
    return states


def finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))
