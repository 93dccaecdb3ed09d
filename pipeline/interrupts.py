"""Ctrl-C and SIGTERM, turned into a clean stop at a safe point.

Sweeps and workers (:func:`deferred`): a signal only sets a flag; the long-running loops (an
epoch of training, a worker waiting for its study) call :func:`check`, which raises
:class:`Interrupted` there, where no store call is half done. So a sweep interrupted at any
moment closes its MLflow runs and tells Optuna, and SQLite never sees a transaction cut in the
middle ("database is locked"). A second Ctrl-C stops at once, as Python normally does. A call
to an MLflow server is not waited for: one that does not answer retries for minutes.

Other commands (:func:`raise_interrupted`) stop at once, except inside a :func:`shielded`
store call: that call finishes first, so a run is never created without its id or left
RUNNING by a status write cut short.

Once a stop is asked for, calls to an MLflow server try once, for a few seconds: the runs are
closed if it answers, and by the next command if it does not.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

STOPPING_TIMEOUT_S = 3  # each MLflow server call once a stop is asked for
_requested: int | None = None
_shielding = True  # off for an MLflow server (see shield_store_calls)
_shields = 0  # shielded calls under way in the main thread (the one signals interrupt)
_remote_calls = 0  # calls to an MLflow server under way in the main thread
_held: int | None = None  # a signal that came during one, raised as the call returns


class Interrupted(KeyboardInterrupt):
    """The user (SIGINT) or a process manager (SIGTERM) asked this process to stop."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.finished: int | None = None  # trials of the study finished when it stopped
        self.total: int | None = None
        self.storage_silent = False  # it came while the Optuna storage was not answering

    def message(self) -> str:
        if self.finished is None:
            return "interrupted" if self.total is None else (
                "interrupted while the Optuna storage was not answering; once it answers, "
                "run the same command to resume")
        return (f"interrupted: {self.finished} of {self.total} trials finished; "
                "run the same command to resume")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # 130 for Ctrl-C, 143 for SIGTERM, as shells report them


def immediate(signals=(signal.SIGINT, signal.SIGTERM)) -> None:
    """Have ``signals`` stop this command at once (:func:`raise_interrupted`), even where a
    launcher started it ignoring SIGINT (a shell's background job)."""
    global _requested, _held
    _requested = _held = None
    for signum in signals:
        signal.signal(signum, raise_interrupted)
    if sys.unraisablehook is not _unraisable:
        _unraisable.previous = sys.unraisablehook
        sys.unraisablehook = _unraisable


def raise_interrupted(signum: int, _frame) -> None:
    """A signal handler that stops at once, as Ctrl-C does, with the signal's exit status;
    inside a :func:`shielded` call, as soon as it returns (a second signal: at once).

    The flag is set too: a signal that lands while Python runs a finalizer or a weakref
    callback has its exception dropped there (:func:`_unraisable`), so the next :func:`check`
    raises it again: every epoch of training, and as each run of the command ends."""
    global _requested, _held
    again = _requested is not None
    _requested = signum
    _stopping()
    if _shields and not again:
        _held = signum
        return
    raise Interrupted(signum)


def _unraisable(unraisable) -> None:
    """``sys.unraisablehook``: a stop that a finalizer or weakref callback swallowed is left
    to the next :func:`check` instead of printed as "Exception ignored in ..."."""
    if isinstance(unraisable.exc_value, Interrupted):
        return
    _unraisable.previous(unraisable)


_unraisable.previous = sys.unraisablehook


def shield_store_calls(enabled: bool) -> None:
    """Whether :func:`shield` holds a signal back: yes for a database this process writes,
    no for an MLflow server, which keeps its own transactions whole and whose calls retry for
    minutes when it does not answer (a stop must not wait that long)."""
    global _shielding
    _shielding = enabled


def _stopping() -> None:
    """A stop was asked for. Against an MLflow server the calls that close the runs try once
    and briefly: one that does not answer would have each retry for minutes; its runs are
    then closed by the next command (see tracking.close_dead_runs)."""
    if not _shielding:
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(STOPPING_TIMEOUT_S)


def store_is_remote() -> bool:
    """Whether the tracking store is an MLflow server (its calls are not shielded)."""
    return not _shielding


@contextlib.contextmanager
def shield() -> Iterator[None]:
    """A block that a signal does not cut: one arriving meanwhile is raised at its end."""
    global _shields, _held, _remote_calls
    if threading.current_thread() is not threading.main_thread():
        yield  # signals interrupt the main thread only
        return
    if not _shielding:  # counted, so that a deferred stop need not wait for it
        _remote_calls += 1
        try:
            yield
        finally:
            _remote_calls -= 1
        return
    _shields += 1
    try:
        yield
    finally:
        _shields -= 1
    if not _shields and _held is not None:
        signum, _held = _held, None
        raise Interrupted(signum)


def shielded(func):
    """``func`` run under :func:`shield`: for calls to the tracking store."""
    @functools.wraps(func)
    def call(*args, **kwargs):
        with shield():
            return func(*args, **kwargs)
    return call


def _record(signum: int, _frame) -> None:
    global _requested
    if _requested is not None:  # asked twice: stop now
        signal.signal(signal.SIGINT, signal.default_int_handler)
        raise Interrupted(signum)
    _requested = signum
    _stopping()
    if _remote_calls:  # an MLflow server's call, which retries for minutes if it is down
        raise Interrupted(signum)


@contextlib.contextmanager
def deferred(signals=(signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Within this block ``signals`` only set the flag :func:`check` reads."""
    global _requested
    _requested = None
    previous = {sig: signal.signal(sig, _record) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def requested() -> int | None:
    """The signal received since :func:`deferred` began, if any."""
    return _requested


def check() -> None:
    """Raise :class:`Interrupted` if a stop was asked for."""
    if _requested is not None:
        raise Interrupted(_requested)


def pause(seconds: float) -> None:
    """Sleep, but answer Ctrl-C and SIGTERM within a tenth of a second."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        check()
        time.sleep(min(0.1, seconds))
