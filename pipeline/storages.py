"""Optuna storages that hold a study's exact total: a journal file for a path, a relational
database for a URL, each creating a trial only while the study holds fewer than its total.

Trials are created one at a time under a lock (a PostgreSQL advisory lock, else a file lock on
this machine) by a storage that refuses to create one once finished, running and waiting
trials reach the total: K workers never overshoot, which Optuna's ``MaxTrialsCallback`` alone
does by up to K-1. A path that is not a journal is refused before anything reads or appends to
it; a journal cut short mid-record is cut back to its last whole line first.
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
from pathlib import Path

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.trial import FrozenTrial, TrialState

from pipeline import redact, stalls
from pipeline.dead_trials import (
    GRACE_S,
    HEARTBEAT_S,
    WORKER_ATTR,
    drop_torn_tail,
    worker_identity,
)
from pipeline.errors import UserError, first_line
from pipeline.sweep_settings import storage_patience

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
IN_BUDGET = (*FINISHED, TrialState.RUNNING, TrialState.WAITING)


class SweepError(UserError):
    """A sweep that cannot start: unreachable storage, a study made for other settings."""


class NotYet(SweepError):
    """What a worker may wait out: a database still starting, a study not yet set up."""


class BudgetReached(Exception):
    """The study holds its total of trials (finished, running or waiting): create no more."""


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
        # One file, one lock, however its URL is written (relative or absolute path).
        database = url.partition(":///")[2].partition("?")[0]
        storage.lock_name = (str(Path(database).resolve()) if url.startswith("sqlite:///")
                             and database else url)
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


# libpq's settings for a PostgreSQL storage, where its URL does not give its own: a server
# that is unreachable (a network cut, a host gone) fails a call within seconds, which the
# worker then waits out (outages.Outage), where the connection would otherwise hang for minutes.
POSTGRES_TIMEOUTS = {
    "connect_timeout": 10,  # seconds to open a connection
    "tcp_user_timeout": 15000,  # milliseconds that sent data may go unacknowledged
    "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
}


def _open_rdb(url: str) -> RDBStudyStorage:
    engine_kwargs = {"pool_pre_ping": True}
    if url.startswith("postgresql"):
        from sqlalchemy.engine import make_url

        # One process holds a few connections (trials, heartbeats); keep each pool small so
        # that many workers fit under PostgreSQL's max_connections (100 by default).
        engine_kwargs.update(pool_size=2, max_overflow=3)
        given = make_url(url).query
        engine_kwargs["connect_args"] = {
            key: value for key, value in POSTGRES_TIMEOUTS.items() if key not in given}
    for attempt in range(RDB_ATTEMPTS):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = RDBStudyStorage(
                    url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S,
                    grace_period=GRACE_S,
                )
            if url.startswith("postgresql"):
                stalls.watch(storage.engine, storage_patience())
            return storage
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
    message = f"cannot open storage {redact.mask(url)}: {redact.scrub(reason, url)[:200]}"
    if any(refusal in reason for refusal in LOGIN_REFUSED):
        return SweepError(message)  # waiting will not make the password right
    return NotYet(message)


# How PostgreSQL (and MySQL) refuse a login: not a database that is still starting.
LOGIN_REFUSED = ("password authentication failed", "no password supplied", "fe_sendauth",
                 "authentication failed", "Access denied for user")
