"""A sweep worker: joins a study and runs its trials until the study holds its total.

    pipeline worker --storage postgresql://optuna@db.internal/optuna --study crop_yields_builtin

Workers are identical processes, started by any launcher on any machine and in any folder: the
study's user attributes (written by `pipeline sweep`) hold the config, the search space, the
parent run and the tracking URI; the data come from the parent run's artifacts. A worker
never closes the parent run or registers a model; the coordinator does that once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from pipeline import config as configs
from pipeline import dead_trials, interrupts, outages, storages, tracking
from pipeline import study as studies
from pipeline import train as training
from pipeline import trial as trials
from pipeline.errors import UserError

# Optuna warns when a study with heartbeats is used through ask/tell instead of optimize;
# here each asked trial gets its heartbeats from `dead_trials.heartbeats`.
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with")

POLL_S = 1.0  # how often a worker with nothing to start looks at the study again
CONNECT_WAIT_S = 60.0  # how long a worker keeps trying to reach its storage at start-up
Echo = Callable[[str], None]


@dataclass(frozen=True)
class Outcome:
    ran: int
    finished: int
    total: int


def _missing_file(storage_url: str) -> str | None:
    """What kind of file a storage that lives in a local file lacks, if it is not there."""
    if "://" not in storage_url:  # (an empty one is refused as such by open_storage)
        return None if os.path.lexists(storage_url) or not storage_url.strip() else "journal file"
    database = storage_url.partition(":///")[2].partition("?")[0]
    if storage_url.startswith("sqlite:///") and database and not os.path.lexists(database):
        return "SQLite file"
    return None


def join(storage_url: str, study_name: str, offset: int = 0, wait_s: float = CONNECT_WAIT_S):
    """Open the storage (retrying while it does not answer) and load the study and its spec."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    deadline = time.monotonic() + wait_s
    while True:  # the database may still be starting, or the coordinator setting the study up
        try:
            if (missing := _missing_file(storage_url)) is not None:
                # A worker waits for the coordinator's journal or SQLite file; it makes none.
                raise storages.NotYet(f"no {missing} {storage_url}: start `pipeline sweep "
                                     f"--storage {storage_url}` first, or check the path")
            storage = storages.open_storage(storage_url)
            spec = studies.read_spec(studies.load(storage, study_name))
            break
        except storages.NotYet:  # anything else (not a journal, another tool's study) stays
            if time.monotonic() > deadline:
                raise
            interrupts.pause(2.0)
    storage.total = spec.n_trials
    study = studies.load(storage, study_name, spec.sampler, spec.pruner, spec.seed, offset)
    return study, storage, spec


def context(spec: studies.Spec, study_name: str, dataset=None,
            rows=None) -> trials.TrialContext:
    """What the study's trials need; the dataset is read from the sweep's run unless this
    process has it already (the coordinator built it from the same recipe, and split it:
    ``rows``)."""
    exp = configs.build(spec.experiment_name, spec.experiment)
    return trials.TrialContext(
        exp=exp, dataset=dataset or tracking.read_dataset(spec.data_uri), lr=spec.lr,
        epochs=spec.epochs,
        experiment_id=spec.experiment_id, parent_run_id=spec.parent_run_id,
        study_name=study_name, log_models=spec.log_models, batch=spec.batch, rows=rows)


def run(storage_url: str, study_name: str, tracking_uri: str | None = None, offset: int = 0,
        timeout: float | None = None, echo: Echo = print, total: int | None = None) -> Outcome:
    """Join the study and run trials until it holds its total (or ``timeout`` seconds pass).
    The total is the study's recorded one, or ``total``: a local worker's coordinator's own
    ``--n-trials``, which another coordinator of the study may have recorded otherwise."""
    study, storage, spec = join(storage_url, study_name, offset)
    # Before any trial is asked for: a study set up for CUDA, joined where there is none.
    training.resolve_device(spec.experiment.get("device", "auto"))
    on_its_own = total is None
    storage.total = total = total or spec.n_trials
    tracking_uri = tracking_uri or spec.tracking_uri
    recorded = dataclasses.asdict(spec)
    studies.check_same_store(study_name, recorded, tracking_uri)
    tracking.connect(tracking_uri)
    studies.check_parent_here(study_name, recorded, tracking_uri,
                              tracking.run_experiment(spec.parent_run_id) is not None)
    # A worker of its own (no coordinator's total) follows the study's recorded one, which a
    # resume with a larger --n-trials raises while it runs.
    latest = (lambda: studies.read_spec(study).n_trials) if on_its_own else None
    if on_its_own:  # a local worker's coordinator has just done this
        trials.close_runs_left_open(study, spec.experiment_id, spec.parent_run_id)
    try:
        return loop(study, storage, context(spec, study_name), total, timeout, echo, latest)
    except interrupts.Interrupted as stop:
        studies.said_on_stop(stop, study, total)
        raise


def loop(study: optuna.Study, storage, ctx: trials.TrialContext, total: int,
         timeout: float | None = None, echo: Echo = print,
         latest: Callable[[], int] | None = None) -> Outcome:
    """Start trials while the study lacks some; wait while others' trials finish the total
    (``latest``: where to read it again, once reached, in case it was raised)."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # trials print their own line
    logging.getLogger("optuna").setLevel(logging.ERROR)
    deadline = None if timeout is None else time.monotonic() + timeout
    callback = progress_line(echo, total)
    ran = 0
    while True:
        interrupts.check()
        try:
            if studies.finished(study) >= total:
                if latest is None or (raised := latest()) <= total:
                    break
                storage.total = total = raised
                callback = progress_line(echo, total)
            if deadline is not None and time.monotonic() > deadline:
                break
            dead_trials.recover_dead_trials(study, storage, trials.close_dead_trial_run,
                                            idle=True)
            asked = ask(study, storage, min(ctx.batch, total - studies.finished(study)))
            if not asked:
                interrupts.pause(POLL_S)  # the rest of the total is running elsewhere
                continue
            with dead_trials.heartbeats(study, storage, asked):
                trials.run_batch(study, asked, ctx, on_told=callback)
            ran += len(asked)
            ctx.outage.answered()
        except Exception as err:
            # The database stopped answering: wait for it. Trials this batch left RUNNING
            # stop beating and are failed and retried as any dead worker's (dead_trials).
            if not ctx.outage.wait_out(err):
                raise
    return Outcome(ran, studies.finished(study), total)


def ask(study: optuna.Study, storage, count: int) -> list[optuna.Trial]:
    """Up to ``count`` new trials (queued retries first), as many as the total allows."""
    asked = []
    try:
        while len(asked) < count:
            asked.append(study.ask())
            # A heartbeat from the first moment. A new trial was claimed for this process as
            # the storage created it; a retry taken from the queue still names its dead
            # trial's process, and is claimed here, so that a worker killed now leaves trials
            # that are found dead at once, not after ORPHAN_S.
            dead_trials.beat(study, storage, asked[-1])
            dead_trials.claim(asked[-1])
    except storages.BudgetReached:
        pass
    return asked


def progress_line(echo: Echo, total: int) -> Callable:
    """An Optuna callback printing one line per finished trial."""

    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        try:
            done = studies.finished(study)
            best = f"{study.best_value:.6g}"
        except ValueError:
            best = "none yet"
        except Exception as err:
            if not outages.failed_under_way(err):
                raise
            done, best = "?", "? (the Optuna storage is not answering)"
        if trial.state == TrialState.COMPLETE:
            outcome = f"complete, value {trial.value:.6g}"
        elif trial.state == TrialState.PRUNED:
            steps = trial.intermediate_values
            if trial.user_attrs.get("diverged") or not steps:
                outcome = "pruned (diverged)"
            else:
                outcome = f"pruned at epoch {max(steps)}"
        elif trial.state == TrialState.FAIL:  # its worker took too long to say it lived
            outcome = "failed as stale by another process, which retries it; result dropped"
        else:
            outcome = trial.state.name.lower()
        echo(f"trial {trial.number} {outcome}: "
             f"lr={trial.params.get('lr', float('nan')):.3g} "
             f"epochs={trial.params.get('epochs')} | {done}/{total} done, best {best}")

    return callback


def spawned(storage_url: str, study_name: str, tracking_uri: str | None, offset: int,
            timeout: float | None, threads: int, total: int) -> None:
    """Entry point of a local worker process started by `pipeline sweep --workers K`.

    The coordinator owns it: Ctrl-C goes to the coordinator, which forwards SIGTERM.
    """
    import signal
    import sys

    import torch

    from pipeline import lifetime

    lifetime.own()  # a command's process too: settled once connected, quick to exit
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)  # K workers share the cores instead of each taking all
    with interrupts.deferred((signal.SIGTERM,)):
        try:
            run(storage_url, study_name, tracking_uri, offset, timeout, total=total)
        except interrupts.Interrupted as stop:
            sys.exit(stop.exit_code)
        except Exception as err:
            failed = err if isinstance(err, UserError) else (
                outages.storage_failure(err, storage_url) or tracking.store_error(err))
            if failed is None:
                raise
            # One line, as the coordinator's own errors.
            print(f"Error: worker {offset}: {failed.message}", file=sys.stderr)
            sys.exit(1)
        finally:
            lifetime.leave()
