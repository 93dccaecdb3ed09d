"""Workers that die: their trials found, failed, retried with the same parameters.

A worker killed mid-trial leaves the trial RUNNING. On a relational storage each running trial
records a heartbeat every ``HEARTBEAT_S`` seconds and Optuna fails it once ``GRACE_S`` pass
without one; a journal has no heartbeat, so each trial records its worker's host, pid and start
time (:mod:`pipeline.processes`), and a trial whose process is gone from this host is failed.
Either way Optuna's ``RetryHeartbeatStaleTrialCallback`` queues it again with the same
parameters, and the trial's MLflow run is closed by the ``on_dead`` callback.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import threading
import warnings
from collections.abc import Callable, Iterator

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from pipeline import interrupts, processes

HEARTBEAT_S = 2  # a RUNNING trial records a heartbeat this often on a relational storage
HEARTBEAT_RETRY_S = 0.5  # and, while its database does not answer, tries this often
GRACE_S = 10  # and is stale, its worker presumed dead, after this long without one
ORPHAN_S = 30  # a RUNNING trial nobody claimed for this long belongs to no live process
MAX_RETRY = 3  # a trial whose worker dies is queued again at most this many times
WORKER_ATTR = "worker"  # a trial's user attribute: host, pid and start time of its process

OnDead = Callable[[optuna.Study, FrozenTrial, "int | None"], None]


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
        # A database that stops answering for a while stops no training; the beats go on as
        # soon as it answers again, before the trials would pass for dead (GRACE_S). What it
        # means for the worker is said where the worker next writes a result.
        wait = HEARTBEAT_S
        while not stop.wait(wait):
            try:
                for trial in trials:
                    beat(study, storage, trial)
                wait = HEARTBEAT_S
            except Exception:  # noqa: BLE001  (the storage's errors, whatever the driver)
                wait = HEARTBEAT_RETRY_S

    thread = threading.Thread(target=beating, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        # On the way out of a stop, a beat that waits on a silent storage is not waited for.
        thread.join(None if interrupts.requested() is None else 1.0)


def claim(trial: optuna.Trial) -> None:
    """Record this process as the one running ``trial``, unless it is recorded already (a
    retry comes with its dead trial's record, which names another trial number)."""
    if trial.user_attrs.get(WORKER_ATTR, {}).get("trial") != trial.number:
        trial.set_user_attr(WORKER_ATTR, worker_identity(trial.number))


def worker_identity(trial_number: int) -> dict:
    """The process running trial ``trial_number`` (see :mod:`pipeline.processes`). The number
    tells this record from one copied into a retry."""
    return {**processes.identity(), "trial": trial_number}


def recover_dead_trials(study: optuna.Study, storage, on_dead: OnDead | None = None,
                        idle: bool = False) -> int:
    """Fail the RUNNING trials whose process is gone from this host and queue them again;
    on a relational storage, also those whose heartbeat stopped (on any host). ``idle``: this
    process runs none of its trials now, so those it claimed were left by a batch that a
    database outage cut short (one created as the connection dropped has no heartbeat yet).

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
            if orphan or (identity and identity.get("trial") == trial.number and (
                    processes.gone_from_this_host(identity)
                    or idle and processes.is_this_process(identity))):
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


def drop_torn_tail(path: str) -> int:
    """Cut a journal back to its last whole line; return the bytes dropped.

    A writer killed in the middle of an append leaves a line without its newline. Optuna's
    reader skips it, but its next append would run on from it and damage the journal for
    good. Done under Optuna's own lock for the file, so no append is in flight meanwhile.
    """
    from optuna.storages.journal import JournalFileSymlinkLock

    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return 0
    lock = JournalFileSymlinkLock(path)
    lock.acquire()
    try:
        with open(path, "rb+") as journal:
            size = journal.seek(0, os.SEEK_END)
            end = size
            while end > 0:
                start = max(0, end - 65536)
                journal.seek(start)
                block = journal.read(end - start)
                if end == size and block.endswith(b"\n"):
                    return 0
                newline = block.rfind(b"\n")
                if newline >= 0:
                    end = start + newline + 1
                    break
                end = start
            journal.truncate(end)
            return size - end
    finally:
        lock.release()
