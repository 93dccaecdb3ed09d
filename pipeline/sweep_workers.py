"""Where a sweep's trials run: K local worker processes (spawned, each running
:func:`pipeline.worker.spawned`), or workers on other machines that the coordinator waits for
while it fails and retries the trials of those that die."""

from __future__ import annotations

import multiprocessing
import os
import shlex
import signal
import time

import optuna

from pipeline import dead_trials, interrupts, outages, redact, worker
from pipeline import study as studies
from pipeline import trial as trials
from pipeline.storages import SweepError
from pipeline.sweep_settings import SweepSettings


def local_workers(settings: SweepSettings) -> int:
    """The worker processes this machine runs: ``--workers``, at most one per core."""
    return min(settings.workers, os.cpu_count() or 1)


def wait_for_total(study, storage, total: int, timeout: float | None) -> None:
    """Wait while workers elsewhere run the trials, failing and retrying those that die."""
    deadline = None if timeout is None else time.monotonic() + timeout
    outage = outages.Outage()  # a database restart is waited out, as the workers wait it
    while True:
        try:
            if studies.finished(study) >= total:
                return
            if deadline is not None and time.monotonic() > deadline:
                return
            dead_trials.recover_dead_trials(study, storage, trials.close_dead_trial_run)
            outage.answered()
        except Exception as err:
            if not outage.wait_out(err):
                raise
            continue
        interrupts.pause(worker.POLL_S)


def worker_command(settings: SweepSettings, study: optuna.Study) -> str:
    storage = settings.storage
    if "://" not in storage:
        storage = os.path.abspath(storage)
    bare = redact.without_password(storage)
    command = (f"pipeline worker --storage {shlex.quote(bare)} "
               f"--study {shlex.quote(study.study_name)}")
    if bare != storage:
        command += ("\n  (the storage's password left out: give it to each worker in PGPASSWORD "
                    "or ~/.pgpass)")
    return command


def run_local(study: optuna.Study, settings: SweepSettings, workers: int,
                   tracking_uri: str) -> None:
    """K spawned processes running the worker loop; Ctrl-C here stops them with SIGTERM."""
    spawn = multiprocessing.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // workers)
    processes = [
        spawn.Process(target=worker.spawned,
                      args=(settings.storage, study.study_name, tracking_uri, index + 1,
                            settings.timeout, threads, settings.n_trials))
        for index in range(workers)
    ]
    # They are born ignoring SIGINT (an ignored signal stays ignored across exec), so a
    # Ctrl-C while they import is the coordinator's alone; it forwards SIGTERM.
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        for process in processes:
            process.start()
    finally:
        signal.signal(signal.SIGINT, handler)
    try:
        while any(p.is_alive() for p in processes):
            for process in processes:
                process.join(timeout=0.2)
            interrupts.check()
    except interrupts.Interrupted:
        for process in processes:
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)
        for process in processes:
            process.join()
        raise
    failed = [f"worker {index}: {_ended(p.exitcode)}"
              for index, p in enumerate(processes, 1) if p.exitcode != 0]
    if failed and studies.finished(study) < settings.n_trials:
        raise SweepError(f"{len(failed)} of {len(processes)} workers failed ({'; '.join(failed)}"
                         f"); {studies.finished(study)} of {settings.n_trials} trials "
                         "finished; run the same command to resume")


def _ended(exit_code: int) -> str:
    """How a local worker ended, in words: its own error is the line it printed."""
    if exit_code < 0:
        return f"killed by {signal.Signals(-exit_code).name}"
    if exit_code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
        return f"stopped by {signal.Signals(exit_code - 128).name}"
    return f"exit status {exit_code}" + (", its error above" if exit_code == 1 else "")
