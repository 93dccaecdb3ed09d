"""Shared fixtures: every test that touches MLflow gets its own sqlite store in a temp folder."""

from __future__ import annotations

import os
import socket
import sqlite3
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


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


def wait_until_answering(url: str, seconds: float) -> None:
    """Poll ``url`` until it answers 200, or fail the test after ``seconds``."""
    import requests

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=1).ok:
                return
        except requests.RequestException:
            time.sleep(0.3)
    pytest.fail(f"{url} did not answer within {seconds:.0f} s")


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for running the real `pipeline` command in a subprocess."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env
