"""Sweeps across machines, as Optuna users scale out: a coordinator and eight `pipeline worker`
processes, each in a folder of its own, sharing a real PostgreSQL storage and logging to a real
`mlflow server` that keeps the artifacts. One worker is killed with -9 in the middle of a trial.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import optuna
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import subprocess_env
from tests.servers import PASSWORD, mlflow_server

pytestmark = [pytest.mark.servers, pytest.mark.faults]
N_TRIALS = 24
WORKERS = 8


def _start(command: list[str], folder, **env: str) -> tuple[subprocess.Popen, list[str]]:
    folder.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(command, cwd=folder, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True,
                               env=subprocess_env(**env))
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True).start()
    return process, lines


def _wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def test_workers_on_postgres_and_a_tracking_server(tmp_path, postgres_server):
    storage = postgres_server.create_database("scale_out")
    backend = postgres_server.create_database("scale_out_mlflow")
    with mlflow_server(tmp_path / "server", backend_uri=backend) as server:
        coordinator, said = _start(
            [sys.executable, "-m", "pipeline", "sweep", "-e", "line_fit_15pts",
             "--n-trials", str(N_TRIALS), "--workers", "0", "--epochs-range", "200", "3000",
             "--storage", storage, "--tracking-uri", server.url],
            tmp_path / "coordinator")
        _wait_for(lambda: any("pipeline worker --storage" in line for line in said), 120,
                  "the coordinator to print the worker command")
        command = next(line for line in said if "pipeline worker --storage" in line).split()
        assert PASSWORD not in " ".join(said)
        # The printed command, with the password from PGPASSWORD instead of the URL.
        storage_without_password = postgres_server.url("scale_out", password=False)
        assert command[command.index("--storage") + 1] == storage_without_password
        study_name = command[command.index("--study") + 1]

        def worker(i: int, host: str = ""):
            return _start([sys.executable, "-m", "pipeline", "worker", "--storage",
                           storage_without_password, "--study", study_name],
                          tmp_path / f"worker{i}", PGPASSWORD=PASSWORD, PIPELINE_WORKER_HOST=host)

        # The first worker stands for another machine: only its heartbeats can tell it died.
        # It is killed in the middle of its first trials, then the seven others start.
        victim = worker(0, host="elsewhere")[0]
        study = optuna.load_study(study_name="line_fit_15pts", storage=storage)

        def victim_in_a_trial() -> bool:
            running = study.get_trials(deepcopy=False,
                                       states=(optuna.trial.TrialState.RUNNING,))
            return any(t.user_attrs.get("worker", {}).get("pid") == victim.pid
                       and "mlflow_run_id" in t.user_attrs for t in running)

        _wait_for(victim_in_a_trial, 180, "the first worker to start a trial")
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
        workers = [(victim, []), *(worker(i) for i in range(1, WORKERS))]
        assert coordinator.wait(timeout=300) == 0, "".join(said[-20:])
        outcomes = [process.wait(timeout=60) for process, _ in workers[1:]]
        assert outcomes == [0] * (WORKERS - 1), [lines[-3:] for _, lines in workers]
        for _, lines in [(coordinator, said), *workers[1:]]:  # no library warnings either
            assert not any("Warning" in line for line in lines), lines

        trials = study.get_trials()
        finished = [t for t in trials if t.state in (optuna.trial.TrialState.COMPLETE,
                                                     optuna.trial.TrialState.PRUNED)]
        assert len(finished) == N_TRIALS
        assert sorted(t.number for t in trials) == list(range(len(trials)))
        # The victim's trials (its whole batch) failed, and each was retried once, same params.
        killed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
        assert killed and {t.user_attrs["worker"]["pid"] for t in killed} == {victim.pid}
        assert {t.user_attrs["worker"]["host"] for t in killed} == {"elsewhere"}
        retried_as = {}
        for dead in killed:
            retries = [t for t in trials if t.system_attrs.get("failed_trial") == dead.number]
            assert len(retries) == 1
            if dead.params:  # killed before it drew its parameters, the retry draws its own
                assert retries[0].params == dead.params
            assert retries[0].state in (optuna.trial.TrialState.COMPLETE,
                                        optuna.trial.TrialState.PRUNED)
            retried_as[dead.number] = retries[0].number

        client = MlflowClient(server.url)
        experiment = client.get_experiment_by_name("line_fit_15pts")
        runs = client.search_runs([experiment.experiment_id], max_results=1000)
        parent = next(r for r in runs if r.data.tags.get("stage") == "sweep")
        children = [r for r in runs if r.data.tags.get("stage") == "trial"]
        assert parent.info.status == "FINISHED"
        # One run per trial; only a trial killed before its run began has none.
        numbers = sorted(int(r.data.tags["optuna_trial"]) for r in children)
        assert len(set(numbers)) == len(numbers)
        assert {t.number for t in finished} <= set(numbers)
        assert set(numbers) - {t.number for t in finished} <= {t.number for t in killed}
        for dead in killed:
            if dead.number in numbers:
                dead_run = next(r for r in children
                                if r.data.tags["optuna_trial"] == str(dead.number))
                assert dead_run.info.status == "FAILED"
                assert dead_run.data.tags["retried_as"] == str(retried_as[dead.number])
        assert {r.info.status for r in runs} <= {"FINISHED", "KILLED", "FAILED"}
        for run in runs:  # the storage's password is in no param or tag
            assert PASSWORD not in repr(run.data.params) + repr(run.data.tags)
        assert parent.data.params["sweep.storage"].startswith("postgresql://optuna:***@")

        # Artifacts went through the server: nothing in the workers' or coordinator's folders.
        for folder in [tmp_path / "coordinator", *(tmp_path / f"worker{i}" for i in
                                                   range(WORKERS))]:
            assert list(folder.iterdir()) == [], folder
        assert any(server.artifacts.rglob("model.pt2"))
        assert any(server.artifacts.rglob("data.parquet"))

        # The champion, from another process that knows only the server.
        loaded = subprocess.run(
            [sys.executable, "-c",
             "import mlflow, pandas as pd; "
             "m = mlflow.pyfunc.load_model('models:/line_fit_15pts@champion'); "
             "print(m.predict(pd.DataFrame({'x': [3.3, 4.4]})).to_json())"],
            cwd=tmp_path, capture_output=True, text=True, timeout=120,
            env=subprocess_env(MLFLOW_TRACKING_URI=server.url))
        assert loaded.returncode == 0, loaded.stderr[-2000:]
        assert '"y":{"0":' in loaded.stdout


def test_a_database_that_refuses_connections_says_so(workdir, postgres_server):
    postgres_server.sql("create role limited login password 'limited-pw' connection limit 0")
    storage = f"postgresql://limited:limited-pw@127.0.0.1:{postgres_server.port}/optuna"
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "sweep", "-e", "line_fit_15pts", "--n-trials", "2",
         "--storage", storage], cwd=workdir, capture_output=True, text=True, timeout=120,
        env=subprocess_env())
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "the database refuses more connections" in lines[0]
    assert "limited:***@" in lines[0] and "limited-pw" not in result.stderr + result.stdout


def test_a_worker_refused_a_login_says_so_at_once(workdir, postgres_server):
    # A wrong password is no database still starting: the worker does not wait it out.
    storage = f"postgresql://optuna:wrong-pw@127.0.0.1:{postgres_server.port}/optuna"
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "worker", "--storage", storage, "--study", "s"],
        cwd=workdir, capture_output=True, text=True, timeout=120, env=subprocess_env())
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "password authentication failed" in lines[0] and "wrong-pw" not in lines[0]
    assert time.monotonic() - started < 30  # the wait for a database starting is 60 s


def test_a_postgres_storage_gives_up_on_an_unreachable_server_in_seconds(postgres_server):
    # libpq's timeouts, where the URL names none: a network cut fails a call within seconds
    # (which the worker waits out) instead of hanging for the minutes TCP would take.
    from pipeline import storages

    for url, connect_timeout in ((postgres_server.url(), "10"),
                                 (postgres_server.url() + "?connect_timeout=3", "3")):
        storage = storages.open_storage(url)
        with storage.engine.connect() as connection:
            given = connection.connection.dbapi_connection.info.get_parameters()
        assert given["connect_timeout"] == connect_timeout
        assert (given["tcp_user_timeout"], given["keepalives_idle"]) == ("15000", "10")
        storage.engine.dispose()


def test_a_postgres_call_that_never_returns_is_cut_off_after_the_patience(
        postgres_server, monkeypatch):
    # A query the server never answers (a frozen server; here one that sleeps) fails after
    # the storage patience, as a dropped connection does, and the pool carries on.
    import sqlalchemy
    import sqlalchemy.exc

    from pipeline import storages

    monkeypatch.setenv("PIPELINE_STORAGE_PATIENCE", "1")
    storage = storages.open_storage(postgres_server.url())
    started = time.monotonic()
    with pytest.raises(sqlalchemy.exc.OperationalError, match="closed|terminat|lost"):
        with storage.engine.connect() as connection:
            connection.execute(sqlalchemy.text("select pg_sleep(20)"))
    assert time.monotonic() - started < 5
    with storage.engine.connect() as connection:  # short calls are left alone, however many
        for _ in range(6):
            assert connection.execute(sqlalchemy.text("select 1 from pg_sleep(0.3)")).scalar()
    storage.engine.dispose()
