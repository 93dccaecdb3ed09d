"""Shared fixtures: every test that touches MLflow gets its own sqlite store in a temp folder."""

from __future__ import annotations

import os
import sqlite3
import sys
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


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for running the real `pipeline` command in a subprocess."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env
