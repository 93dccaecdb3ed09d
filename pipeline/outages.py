"""A relational Optuna storage that fails under way (its database restarted, or gone): how a
worker waits it out (:class:`Outage`), and the one line it ends with when it will not answer.
"""

from __future__ import annotations

import time

import optuna

from pipeline import interrupts, redact
from pipeline.errors import first_line
from pipeline.storages import SweepError
from pipeline.sweep_settings import storage_patience

RETRY_S = 0.5  # how often a worker tries again a database that stopped answering


def failed_under_way(err: BaseException) -> bool:
    """Whether ``err`` is a relational storage failing (its database gone, for now)."""
    import sqlalchemy.exc

    return isinstance(err, (optuna.exceptions.StorageInternalError,
                            sqlalchemy.exc.SQLAlchemyError))


class Outage:
    """One clock for a database that stopped answering, whichever call finds it so.

    A worker's calls to its storage that fail under way (:func:`failed_under_way`) wait and
    try again while less than ``seconds`` have passed since the first of them failed; any
    call that succeeds afterwards says so (:meth:`answered`) and the clock starts afresh.
    """

    def __init__(self, seconds: float | None = None) -> None:
        self.seconds = storage_patience() if seconds is None else seconds
        self.since: float | None = None
        self.silent = False  # a call failed under way, and none has succeeded since

    def wait_out(self, err: BaseException) -> bool:
        """After a pause, True: try again. False: ``err`` is to be raised (another error, or
        the database silent for longer than the patience). A stop asked for meanwhile is
        raised as such (:class:`interrupts.Interrupted`), marked ``storage_silent``."""
        if not failed_under_way(err):
            return False
        now = time.monotonic()
        if self.since is None:
            self.since = now
        self.silent = True
        try:
            interrupts.check()
            if now - self.since >= self.seconds:
                return False
            interrupts.pause(RETRY_S)
        except interrupts.Interrupted as stop:
            stop.storage_silent = True  # nothing more is asked of the storage on the way out
            raise
        return True

    def noticed(self) -> None:
        """A call failed under way that does not wait (a pruning report): the storage is
        silent until a call succeeds, but the clock starts only when one waits."""
        self.silent = True

    def answered(self) -> None:
        self.since, self.silent = None, False


def storage_failure(err: BaseException, url: str) -> SweepError | None:
    """An Optuna storage that failed under way (a database server gone), as one line; None
    for any other error."""
    if not failed_under_way(err):
        return None
    # Optuna's own message blames the data ("exceeding max length"); the driver's says why.
    cause = err.__cause__ if isinstance(err.__cause__, Exception) else err
    reason = getattr(cause, "orig", None) or cause
    return SweepError(f"the Optuna storage {redact.mask(url)} failed: "
                      f"{redact.scrub(first_line(reason), url)}; once it answers, run the same "
                      "command to resume (no finished trial is lost)")
