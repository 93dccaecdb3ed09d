"""Runs, by id: opened, always closed, and closed for processes that died.

Every call names its run; none uses MLflow's active-run stack, so the same code serves the
CLI, worker processes and threads. A run opened with :func:`run` ends FINISHED, FAILED, or
KILLED on Ctrl-C, so none is left RUNNING; a run whose process was killed with -9 is closed
FAILED by the next command. What runs record is :mod:`.records`.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import subprocess
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from mlflow.entities import RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline import interrupts
from pipeline.tracking.records import log_to_run
from pipeline.tracking.store import NOTE, filter_value


@contextlib.contextmanager
def run(experiment: str, name: str, parent_run_id: str | None = None,
        tags: dict | None = None, description: str = "") -> Iterator[str]:
    """A run, by id, that ends FINISHED, FAILED on any error, or KILLED on interrupt.

    ``description`` is the note the UI shows on the run's page. A top-level run under
    ``mlflow run`` is the run `mlflow run` opened. Every call here takes the run's id, never
    MLflow's active-run stack, so the same code is safe in worker processes and threads.
    """
    tags = {**(tags or {}), **({NOTE: description} if description else {}), **_process_tags()}
    run_id, status = None, "FAILED"
    try:
        # Shielded (see interrupts.shield): a signal during the creation is raised once the
        # id is known, so the run is closed below rather than left RUNNING.
        with interrupts.shield():
            if parent_run_id is None:
                run_id, _ = open_parent(experiment, name, tags)
            else:
                run_id = open_child(experiment, parent_run_id, name, tags)
        yield run_id
        # A stop that landed in a finalizer, its exception dropped there (see interrupts).
        interrupts.check()
        status = "FINISHED"
    except KeyboardInterrupt as stop:
        status = "KILLED"
        _release(stop)
        raise
    finally:
        if run_id is not None:
            _terminate(run_id, status)


@interrupts.shielded
def _terminate(run_id: str, status: str) -> None:
    try:
        MlflowClient().set_terminated(run_id, status)
    except MlflowException:
        if not stopping_unanswered():
            raise


def stopping_unanswered() -> bool:
    """A stop was asked for and the MLflow server did not answer the call closing a run: the
    run is left RUNNING, for the next command to close (the stop is not turned into an error
    about a server that is gone)."""
    return interrupts.requested() is not None and interrupts.store_is_remote()


# The process that opened a run, so that a later one can close it if it was killed with -9.
PROCESS_TAGS = ("process_host", "process_pid", "process_start")


def _process_tags() -> dict[str, str]:
    from pipeline import processes

    found = processes.identity()
    return {f"process_{key}": str(value) for key, value in found.items() if value is not None}


@interrupts.shielded
def close_dead_runs(experiment: str) -> list[str]:
    """End FAILED (tag ``process_died``) the RUNNING runs of ``experiment`` that a process on
    this host opened with :func:`run` and no longer holds: it was killed with -9, or the
    machine lost power, and closed nothing. One search, in the experiment, per command."""
    from pipeline import processes

    client = MlflowClient()
    clauses = ["attributes.status = 'RUNNING'", *_tag_clauses({"process_host": processes.host()})]
    found = []
    for old in client.search_runs([experiment], " and ".join(clauses)):
        tags = old.data.tags
        holder = {"host": tags.get("process_host"), "pid": tags.get("process_pid"),
                  "start": tags.get("process_start")}
        if holder["pid"] and processes.gone_from_this_host(holder):
            client.set_tag(old.info.run_id, "process_died", "true")
            client.set_terminated(old.info.run_id, "FAILED")
            found.append(old.info.run_id)
    return found


def _release(stop: BaseException) -> None:
    """Let go of what the interrupted code held. A signal can cut into a store call, whose
    session then keeps SQLite's read lock for as long as the traceback keeps its frames; the
    KILLED status written next would wait on that lock and fail ("database is locked")."""
    traceback.clear_frames(stop.__traceback__)
    gc.collect()


@functools.cache
def environment_tags() -> dict[str, str]:
    """Torch version and git commit: computed once per process, not once per run."""
    tags = {"torch_version": torch.__version__}
    if commit := _git_commit():
        tags["git_commit"] = commit
    return tags


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


@interrupts.shielded
def open_child(experiment: str, parent_run_id: str, name: str, tags: dict[str, str]) -> str:
    """Create a run under ``parent_run_id`` explicitly (one store call); return its id. Its
    params, like its curves, come with :func:`close_run`."""
    run = MlflowClient().create_run(
        experiment, run_name=name,
        tags={**environment_tags(), **tags, "mlflow.parentRunId": parent_run_id},
    )
    return run.info.run_id


@interrupts.shielded
def find_child(experiment: str, parent_run_id: str, tags: dict[str, str]) -> str | None:
    """The id of the run under ``parent_run_id`` carrying ``tags``, if there is one."""
    clauses = [f"tags.mlflow.parentRunId = '{parent_run_id}'", *_tag_clauses(tags)]
    found = MlflowClient().search_runs([experiment], " and ".join(clauses), max_results=1)
    return found[0].info.run_id if found else None


@interrupts.shielded
def running_children(experiment: str, parent_run_id: str, tag: str) -> dict[str, str]:
    """The RUNNING runs under ``parent_run_id``: run id -> their ``tag``'s value."""
    clauses = ["attributes.status = 'RUNNING'", f"tags.mlflow.parentRunId = '{parent_run_id}'"]
    return {run.info.run_id: run.data.tags.get(tag, "")
            for run in MlflowClient().search_runs([experiment], " and ".join(clauses))}


def _tag_clauses(tags: dict[str, str]) -> list[str]:
    return [f"tags.{key} = {filter_value(str(value))}" for key, value in tags.items()]


@interrupts.shielded
def close_running(experiment: str, tags: dict[str, str], status: str,
                  keep: str | None = None) -> list[str]:
    """End every RUNNING run of ``experiment`` carrying ``tags`` (but ``keep``) with ``status``:
    runs a process opened and then died before it could record or close them."""
    clauses = ["attributes.status = 'RUNNING'", *_tag_clauses(tags)]
    client = MlflowClient()
    found = [run.info.run_id for run in client.search_runs([experiment], " and ".join(clauses))
             if run.info.run_id != keep]
    for run_id in found:
        client.set_terminated(run_id, status)
    return found


@interrupts.shielded
def close_run(run_id: str, status: str, curves: dict[str, list[float]] | None = None,
              metrics: dict[str, float] | None = None, tags: dict[str, str] | None = None,
              params: dict[str, Any] | None = None) -> bool:
    """Log params, curves, final metrics and tags in one batch, then end the run with
    ``status``: two store calls, whatever the length of the curves. False where a stop was
    asked for and the MLflow server does not answer (:func:`stopping_unanswered`)."""
    try:
        log_to_run(run_id, params=params, metrics=metrics, tags=tags, curves=curves)
        MlflowClient().set_terminated(run_id, status)
    except MlflowException:
        if stopping_unanswered():
            return False
        raise
    return True


def note_on_launched_run(note: str) -> None:
    """``note`` on the run `mlflow run` opened, best effort: one quick try, as the command
    fails anyway with the same words on the screen."""
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "5"
    with contextlib.suppress(Exception):
        record_launched(note, {})


@interrupts.shielded
def record_launched(note: str, tags: dict[str, str], parent_run_id: str | None = None) -> None:
    """Say on the run `mlflow run` opened (``MLFLOW_RUN_ID``), where this command records
    nothing of its own (data reused, a study resumed under its parent), what became of it,
    nested under ``parent_run_id``; nothing outside `mlflow run`."""
    launched = os.environ.pop("MLFLOW_RUN_ID", None)
    if launched is None:
        return
    nested = {} if parent_run_id is None else {"mlflow.parentRunId": parent_run_id}
    MlflowClient().log_batch(launched, tags=[
        RunTag(k, str(v)) for k, v in {**tags, **nested, NOTE: note}.items()])


@interrupts.shielded
def open_parent(experiment: str, name: str, tags: dict[str, str],
                run_id: str | None = None) -> tuple[str, bool]:
    """Mark an existing top-level run RUNNING again, or start one; return (id, is_new).

    Under ``mlflow run`` a new parent is the run `mlflow run` opened (``MLFLOW_RUN_ID``),
    renamed and tagged as a parent made here would be.
    """
    client = MlflowClient()
    if run_id is not None:
        try:
            if client.get_run(run_id).info.lifecycle_stage == "active":
                client.update_run(run_id, status="RUNNING")
                record_launched(f"`mlflow run` of study {tags.get('optuna_study')!r} going on: "
                                f"its parent run is {run_id}.", {"stage": "resume"},
                                parent_run_id=run_id)
                return run_id, False
        except MlflowException:
            pass  # deleted from the store: start a new parent
    launched = os.environ.pop("MLFLOW_RUN_ID", None)
    all_tags = {**environment_tags(), **tags}
    if launched is not None:
        client.update_run(launched, status="RUNNING", name=name)
        client.log_batch(launched, tags=[RunTag(k, str(v)) for k, v in all_tags.items()])
        return launched, True
    run = client.create_run(experiment, run_name=name, tags=all_tags)
    return run.info.run_id, True
