"""The Optuna study behind a sweep: its storage, its exact total, what workers read, dead trials.

``--n-trials N`` is the number of *finished* trials (complete or pruned). Failed trials do not
count, so their budget is run again. Trials are created one at a time under a lock (a
PostgreSQL advisory lock, else a file lock on this machine) by a storage that refuses to
create one once finished, running and waiting trials reach N: K workers never overshoot, which
Optuna's ``MaxTrialsCallback`` alone does by up to K-1.

A worker that dies leaves its trial RUNNING. On a relational storage Optuna's heartbeat marks it
failed after a grace period and ``RetryHeartbeatStaleTrialCallback`` queues it again with the same
parameters; a journal has no heartbeat, so each trial records its host and process, and a trial
whose process is gone from this host is failed and queued again the same way.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import socket
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import optuna
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from pipeline import redact
from pipeline.errors import UserError, first_line

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
IN_BUDGET = (*FINISHED, TrialState.RUNNING, TrialState.WAITING)
HEARTBEAT_S = 2  # a RUNNING trial records a heartbeat this often on a relational storage
GRACE_S = 10  # and is stale, its worker presumed dead, after this long without one
ORPHAN_S = 30  # a RUNNING trial nobody claimed for this long belongs to no live process
MAX_RETRY = 3  # a trial whose worker dies is queued again at most this many times
SPEC_ATTR = "pipeline"  # the study's user attribute holding the Spec
WORKER_ATTR = "worker"  # a trial's user attribute: host, pid and start time of its process

OnDead = Callable[[optuna.Study, FrozenTrial, "int | None"], None]


class SweepError(UserError):
    """A sweep that cannot start: unreachable storage, a study made for other settings."""


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
    if "://" not in url:
        from optuna.storages.journal import JournalFileBackend

        try:
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


def _open_rdb(url: str) -> RDBStudyStorage:
    engine_kwargs = {"pool_pre_ping": True}
    if url.startswith("postgresql"):
        # One process holds a few connections (trials, heartbeats); keep each pool small so
        # that many workers fit under PostgreSQL's max_connections (100 by default).
        engine_kwargs.update(pool_size=2, max_overflow=3)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStudyStorage(
                url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S,
                grace_period=GRACE_S,
            )
    except Exception as err:  # SQLAlchemy raises many types for a bad or unreachable database
        reason = first_line(err)
        if "DB access module" in reason or isinstance(err, ImportError):
            reason = ("its database driver is not installed (postgresql:// needs psycopg 3: "
                      "pip install 'psycopg[binary]'; mysql:// needs PyMySQL)")
        elif any(refusal in reason for refusal in (
                "too many clients", "too many connections", "remaining connection slots")):
            reason = ("the database refuses more connections; raise its max_connections "
                      "or run fewer workers")
        raise SweepError(f"cannot open storage {redact.mask(url)}: "
                         f"{redact.mask(reason)[:200]}") from None


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
        raise SweepError(f"study {study.study_name!r} was not set up by `pipeline sweep`; "
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
                raise SweepError(f"no study named {study_name!r} in this storage") from None
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


def counts(study: optuna.Study) -> dict[str, int]:
    states: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        states[trial.state.name] = states.get(trial.state.name, 0) + 1
    return states


def finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


# --- dead workers -------------------------------------------------------------------------------


def beat(study: optuna.Study, storage, trial: optuna.Trial) -> None:
    """Record one heartbeat of ``trial`` on a relational storage (nothing on a journal)."""
    if isinstance(storage, RDBStorage):
        study_id = storage.get_study_id_from_name(study.study_name)
        storage.record_heartbeat(
            storage.get_trial_id_from_study_id_trial_number(study_id, trial.number))


@contextlib.contextmanager
def heartbeats(study: optuna.Study, storage, trials: list) -> Iterator[None]:
    """While the block runs, a thread records the trials' heartbeats every ``HEARTBEAT_S``
    (what ``study.optimize`` does for one trial, here for a batch asked with ``study.ask``)."""
    if not isinstance(storage, RDBStorage):
        yield
        return
    stop = threading.Event()

    def beating() -> None:
        while not stop.wait(HEARTBEAT_S):
            for trial in trials:
                beat(study, storage, trial)

    thread = threading.Thread(target=beating, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def worker_identity(trial_number: int) -> dict:
    """The process running trial ``trial_number``: host, pid and start time (which tells a
    reused pid apart). The number tells this record from one copied into a retry."""
    return {"host": _host(), "pid": os.getpid(), "start": _start_time(os.getpid()),
            "trial": trial_number}


def _host() -> str:
    # PIPELINE_WORKER_HOST names the machine where hostnames repeat (containers started from
    # one image); the tests use it to stand for another machine.
    return os.environ.get("PIPELINE_WORKER_HOST") or socket.gethostname()


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _gone_from_this_host(identity: dict | None) -> bool:
    if not identity or identity.get("host") != _host():
        return False  # another machine's process: only a heartbeat could tell
    pid = int(identity["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    return identity.get("start") is not None and _start_time(pid) != identity.get("start")


def recover_dead_trials(study: optuna.Study, storage, on_dead: OnDead | None = None) -> int:
    """Fail the RUNNING trials whose process is gone from this host and queue them again;
    on a relational storage, also those whose heartbeat stopped (on any host).

    Failing a trial and queueing its retry happen under the lock that guards trial creation:
    between the two the study holds one trial fewer, and a worker asking then would take the
    dead trial's place as well as its retry, one trial over the total.
    """
    retried = _StaleTrial()
    now = datetime.datetime.now()
    with storage.lock(study._study_id):
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            identity = trial.user_attrs.get(WORKER_ATTR)
            # A trial never claimed was created by a process killed in the same instant.
            orphan = identity is None and trial.datetime_start is not None and (
                (now - trial.datetime_start).total_seconds() > ORPHAN_S)
            if orphan or (identity and identity.get("trial") == trial.number
                          and _gone_from_this_host(identity)):
                try:
                    study.tell(trial.number, state=TrialState.FAIL)
                except (RuntimeError, ValueError):
                    continue  # another process on this host failed it first
                retried(study, study.trials[trial.number])
        if isinstance(storage, RDBStorage):
            storage.stale_trials = retried  # called back by fail_stale_trials
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    optuna.storages.fail_stale_trials(study)
            finally:
                storage.stale_trials = None
    for trial, retried_as in retried.done:  # outside the lock: this writes to MLflow
        if on_dead is not None:
            on_dead(study, trial, retried_as)
    return len(retried.done)


class _StaleTrial:
    """Optuna's retry of a dead trial, remembering which trial number retries it."""

    def __init__(self) -> None:
        self.done: list[tuple[FrozenTrial, int | None]] = []

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, trial)
            retried_as = next(
                (t.number for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
                 if RetryHeartbeatStaleTrialCallback.retry_history(t)[-1:] == [trial.number]),
                None)
        self.done.append((trial, retried_as))
