"""Sweeps under faults: kill -9, Ctrl-C and SIGTERM lose no trial and leave nothing RUNNING;
the same command then completes exactly the total. Run alone with `pytest -m faults`."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import optuna
import pytest
from mlflow.tracking import MlflowClient

from pipeline.storages import open_storage
from tests.conftest import run_statuses, subprocess_env

pytestmark = pytest.mark.faults
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
DONE = re.compile(r"\| (\d+)/\d+ done")


def sweep_command(n_trials: int, workers: int) -> list[str]:
    return [sys.executable, "-m", "pipeline", "sweep", "-e", "line_fit_15pts",
            "--n-trials", str(n_trials), "--workers", str(workers),
            "--epochs-range", "50", "2000"]


def start(folder, command, **env: str) -> tuple[subprocess.Popen, list[str]]:
    """Start ``command`` in a process group of its own; collect its stdout lines."""
    process = subprocess.Popen(command, cwd=folder, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=subprocess_env(**env),
                               start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True).start()
    return process, lines


def wait_for_done(process, lines: list[str], count: int, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        done = [int(m[1]) for line in list(lines) if (m := DONE.search(line))]
        if done and max(done) >= count:
            return
        time.sleep(0.05)
    pytest.fail(f"the sweep did not reach {count} finished trials: {lines[-3:]}")


def check_postgres_total(database, n_trials: int) -> None:
    """Exactly ``n_trials`` finished in the study on ``database``; none left RUNNING."""
    study = optuna.load_study(study_name="line_fit_15pts", storage=database.url())
    assert len([t for t in study.trials if t.state in FINISHED]) == n_trials
    assert {t.state.name for t in study.trials} <= {"COMPLETE", "PRUNED", "FAIL"}


def check_consistent(folder, n_trials: int) -> optuna.Study:
    """Exactly ``n_trials`` finished; trials and MLflow runs one to one; nothing RUNNING."""
    study = optuna.load_study(study_name="line_fit_15pts",
                              storage=open_storage(str(folder / "optuna.journal")))
    trials = study.get_trials()
    assert len([t for t in trials if t.state in FINISHED]) == n_trials
    assert {t.state.name for t in trials} <= {"COMPLETE", "PRUNED", "FAIL"}
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("line_fit_15pts")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("stage") == "sweep"]
    children = {r.info.run_id: r for r in runs if r.data.tags.get("stage") == "trial"}
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    # One run per trial (a trial killed before its run began has none), named by its tags.
    by_trial = {int(r.data.tags["optuna_trial"]): r for r in children.values()}
    assert len(by_trial) == len(children)
    assert {t.number for t in trials if t.state in FINISHED} <= set(by_trial)
    for number, run in by_trial.items():
        trial = trials[number]
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.data.tags["optuna_state"] == trial.state.name
        assert run.info.status == {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}.get(
            trial.state.name, run.info.status)
        assert run.info.status in ("FINISHED", "KILLED", "FAILED")
        if "mlflow_run_id" in trial.user_attrs:
            assert trial.user_attrs["mlflow_run_id"] == run.info.run_id
    assert "RUNNING" not in run_statuses(folder / "mlflow.db")
    return study


def resume(folder, n_trials: int, workers: int) -> None:
    result = subprocess.run(sweep_command(n_trials, workers), cwd=folder, capture_output=True,
                            text=True, env=subprocess_env(), timeout=400)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{n_trials} trials" in result.stdout or "nothing to run" in result.stdout


def test_kill_9_then_the_same_command_completes_exactly(workdir):
    process, lines = start(workdir, sweep_command(40, 2))
    wait_for_done(process, lines, 12)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    resume(workdir, 40, 2)
    study = check_consistent(workdir, 40)
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    for run in client.search_runs([client.get_experiment_by_name("line_fit_15pts")
                                   .experiment_id], "tags.worker_died = 'true'"):
        # A trial the kill cut short: its run is closed and names the trial that retried it.
        trial = study.trials[int(run.data.tags["optuna_trial"])]
        assert run.info.status == "FAILED" and trial.state.name == "FAIL"
        retry = study.trials[int(run.data.tags["retried_as"])]
        assert retry.params == trial.params and retry.state in FINISHED


@pytest.mark.parametrize("workers", [1, 4])
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_interrupt_closes_everything_and_resumes(workdir, how, workers):
    process, lines = start(workdir, sweep_command(16, workers))
    wait_for_done(process, lines, 4)
    if how == "ctrl-c":  # a terminal sends SIGINT to the whole foreground group
        os.killpg(process.pid, signal.SIGINT)
    else:  # a process manager sends SIGTERM to the process it started
        process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
    stderr = process.stderr.read()
    assert process.returncode == (130 if how == "ctrl-c" else 143), stderr
    assert "Traceback" not in stderr and "database is locked" not in stderr
    message = stderr.strip().splitlines()
    assert len(message) <= 3 and re.match(
        r"interrupted: \d+ of 16 trials finished; run the same command to resume",
        message[-1]), stderr
    assert "RUNNING" not in run_statuses(workdir / "mlflow.db")
    resume(workdir, 16, workers)
    check_consistent(workdir, 16)


def training_runs(db_path) -> int:
    """How many train runs are RUNNING, read straight from the sqlite store."""
    if not db_path.exists():
        return 0
    with sqlite3.connect(db_path) as connection:
        try:
            return connection.execute(
                "select count(*) from runs join tags on tags.run_uuid = runs.run_uuid where "
                "tags.key = 'stage' and tags.value = 'train' and runs.status = 'RUNNING'"
            ).fetchone()[0]
        except sqlite3.OperationalError:  # no tables yet
            return 0


def test_runs_of_a_command_killed_with_9_are_closed_by_the_next_one(workdir):
    # kill -9 closes nothing: the pipeline, generate and train runs stayed RUNNING for good.
    process, _ = start(workdir, [sys.executable, "-m", "pipeline", "run", "-e", "synthetic",
                                 "--set", "epochs=1000000"])
    store = f"sqlite:///{workdir / 'mlflow.db'}"
    deadline = time.monotonic() + 120
    while not training_runs(workdir / "mlflow.db"):  # the parent is RUNNING too by then
        assert time.monotonic() < deadline and process.poll() is None, process.stderr.read()
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert "RUNNING" in run_statuses(workdir / "mlflow.db")
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", "-e", "synthetic", "--set", "epochs=2"],
        cwd=workdir, capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "RUNNING" not in run_statuses(workdir / "mlflow.db")
    client = MlflowClient(store)
    died = client.search_runs([client.get_experiment_by_name("synthetic").experiment_id],
                              "tags.process_died = 'true'")
    assert {run.data.tags.get("stage") for run in died} == {"pipeline", "train"}
    assert all(run.info.status == "FAILED" for run in died)


def test_local_workers_stopped_one_by_one_are_named_and_the_sweep_resumes(workdir):
    # SIGTERM to each worker process, not to the sweep: the sweep says how each ended.
    process, lines = start(workdir, sweep_command(30, 2))
    wait_for_done(process, lines, 3)
    children = [int(pid) for pid in
                open(f"/proc/{process.pid}/task/{process.pid}/children").read().split()]
    assert len(children) >= 2
    for pid in children:
        os.kill(pid, signal.SIGTERM)
    process.wait(timeout=120)
    stderr = process.stderr.read()
    assert process.returncode == 1 and "Traceback" not in stderr, stderr
    assert re.search(r"2 of 2 workers failed \(worker 1: stopped by SIGTERM; worker 2: stopped "
                     r"by SIGTERM\); \d+ of 30 trials finished; run the same command to resume",
                     stderr), stderr
    assert "RUNNING" not in run_statuses(workdir / "mlflow.db")
    resume(workdir, 30, 2)
    check_consistent(workdir, 30)


@pytest.mark.servers
def test_a_stop_while_the_tracking_server_is_gone_is_prompt_and_the_rerun_mends_it(workdir):
    # The server's calls retry for minutes when it is gone; a stop does not wait for them,
    # and the runs it could not close are closed by the next command, once it is back.
    from tests.conftest import free_port
    from tests.servers import mlflow_server

    folder, port = workdir / "server", free_port()
    command = [sys.executable, "-m", "pipeline", "sweep", "-e", "line_fit_15pts",
               "--n-trials", "40", "--epochs-range", "50", "2000", "--batch", "2",
               "--tracking-uri", f"http://127.0.0.1:{port}"]
    with mlflow_server(folder, port=port):
        process, lines = start(workdir, command)
        wait_for_done(process, lines, 2)
    time.sleep(2)  # the server is gone: the sweep's next call retries
    stopped = time.monotonic()
    os.killpg(process.pid, signal.SIGINT)
    process.wait(timeout=120)
    waited = time.monotonic() - stopped
    stderr = process.stderr.read()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and waited < 30, (waited, stderr)
    assert re.match(r"interrupted: \d+ of 40 trials finished; run the same command to resume",
                    stderr.strip().splitlines()[-1]), stderr
    with mlflow_server(folder, port=port):
        resume_run = subprocess.run(command, cwd=workdir, capture_output=True, text=True,
                                    env=subprocess_env(), timeout=400)
        assert resume_run.returncode == 0, resume_run.stderr[-2000:]
    study = optuna.load_study(study_name="line_fit_15pts",
                              storage=open_storage(str(workdir / "optuna.journal")))
    assert len([t for t in study.trials if t.state in FINISHED]) == 40
    assert {t.state.name for t in study.trials} <= {"COMPLETE", "PRUNED", "FAIL"}
    assert "RUNNING" not in run_statuses(folder / "mlflow.db")


@pytest.mark.servers
def test_a_storage_lost_under_way_is_one_line_each_and_the_rerun_mends_it(workdir):
    # PostgreSQL gone mid-sweep: the coordinator and its workers say so in one line each,
    # no traceback; once it is back, the same command finishes the exact total.
    from tests.servers import postgres

    with postgres() as database:
        command = [*sweep_command(40, 2), "--batch", "2", "--storage", database.url()]
        # Gone for good, as far as the sweep can tell: it waits 2 s for it, not 30.
        process, lines = start(workdir, command, PIPELINE_STORAGE_PATIENCE="2")
        wait_for_done(process, lines, 4)
        database.crash()
        process.wait(timeout=240)
        stderr = process.stderr.read()
        assert process.returncode == 1 and "Traceback" not in stderr, stderr
        failed = [line for line in stderr.splitlines() if "the Optuna storage" in line]
        assert failed and all(line.startswith("Error:") and "optuna:***@127.0.0.1" in line
                              and "run the same command to resume" in line for line in failed)
        assert "optuna-pw" not in stderr
        database.restart()
        result = subprocess.run(command, cwd=workdir, capture_output=True, text=True,
                                env=subprocess_env(), timeout=400)
        assert result.returncode == 0, result.stderr[-2000:]
        check_postgres_total(database, 40)
    assert "RUNNING" not in run_statuses(workdir / "mlflow.db")


@pytest.mark.servers
def test_a_database_restarted_under_way_stops_no_sweep(workdir):
    # PostgreSQL down for a few seconds mid-sweep: the coordinator and its workers wait for it
    # (heartbeats, results, the next batch) and the same command ends with the exact total.
    from tests.servers import postgres

    with postgres() as database:
        command = [*sweep_command(30, 2), "--batch", "2", "--storage", database.url()]
        process, lines = start(workdir, command)
        wait_for_done(process, lines, 4)
        database.crash()
        time.sleep(3)
        database.restart()
        process.wait(timeout=240)
        stderr = process.stderr.read()
        # No worker gave up: each waited (before, one failed at once and the other did all).
        assert process.returncode == 0 and "Error" not in stderr, stderr
        assert "optuna-pw" not in "".join(lines) + stderr
        check_postgres_total(database, 30)
    assert "RUNNING" not in run_statuses(workdir / "mlflow.db")


@pytest.mark.servers
def test_a_database_that_hangs_ends_the_sweep_in_one_line_and_ctrl_c_gets_through(workdir):
    # Its processes stopped, the server still has its connections acknowledged: no libpq
    # timeout fires, and a query would wait for ever. The stalled call is cut off after the
    # patience (stalls.watch) and waited out like any outage.
    from tests.servers import postgres

    with postgres() as database:
        # A short connect_timeout for new connections: the stalled ones are the watch's.
        url = database.url() + "?connect_timeout=3"
        command = [*sweep_command(30, 2), "--batch", "2", "--storage", url]
        process, lines = start(workdir, command, PIPELINE_STORAGE_PATIENCE="3")
        wait_for_done(process, lines, 4)
        database.freeze()
        try:
            process.wait(timeout=150)
        finally:
            database.thaw()
        stderr = process.stderr.read()
        assert process.returncode == 1, stderr
        assert stderr.count("Error: the Optuna storage") == 1 and "Traceback" not in stderr
        assert "once it answers, run the same command to resume" in stderr

        # Ctrl-C while it hangs: the first press stops the sweep, within seconds.
        study = optuna.load_study(study_name="line_fit_15pts", storage=database.url())
        before = len([t for t in study.trials if t.state in FINISHED])
        single = [*sweep_command(30, 1), "--batch", "2", "--storage", url]
        process, lines = start(workdir, single, PIPELINE_STORAGE_PATIENCE="30")
        wait_for_done(process, lines, before + 2)
        database.freeze()
        try:
            time.sleep(2)
            os.killpg(process.pid, signal.SIGINT)
            asked = time.monotonic()
            process.wait(timeout=60)
            waited = time.monotonic() - asked
        finally:
            database.thaw()
        stderr = process.stderr.read()
        assert process.returncode == 130, stderr
        assert waited < 30, waited  # the patience was 30 s: the stop did not wait it out
        assert stderr.strip().splitlines()[-1].startswith("interrupted"), stderr

        # The same command, the database answering again, ends with the exact total.
        finished = subprocess.run(command, cwd=workdir, capture_output=True, text=True,
                                  env=subprocess_env(), timeout=240)
        assert finished.returncode == 0, finished.stderr
        check_postgres_total(database, 30)
    assert "RUNNING" not in run_statuses(workdir / "mlflow.db")
