"""The study's exact total: trial creation under a lock, dead trials failed and retried."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import optuna
import pytest
from optuna.trial import TrialState

from pipeline import dead_trials, processes, storages
from pipeline import study as studies


def _dead_identity(number: int) -> dict:
    """The identity of a process on this host that has exited."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return {"host": processes.host(), "pid": process.pid, "start": "0", "trial": number}


@pytest.fixture
def journal(tmp_path):
    return str(tmp_path / "optuna.journal")


def test_budget_refuses_trials_beyond_the_total(journal):
    study = studies.load(storages.open_storage(journal, total=2), "s", create=True)
    study.ask()
    study.ask()
    with pytest.raises(storages.BudgetReached):
        study.ask()


def test_a_dead_trial_is_failed_and_retried_with_its_params(journal):
    storage = storages.open_storage(journal, total=2)
    study = studies.load(storage, "s", create=True)
    study.tell(study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1.0)}), 1.0)
    dead = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1.0)})
    dead.set_user_attr(dead_trials.WORKER_ATTR, _dead_identity(dead.number))
    told = []

    assert dead_trials.recover_dead_trials(study, storage,
                                       lambda s, t, retried_as: told.append(retried_as)) == 1
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    assert study.trials[2].params == study.trials[1].params
    assert told == [2]


def test_no_trial_slips_in_between_failing_a_dead_trial_and_queueing_its_retry(journal,
                                                                              monkeypatch):
    """Another worker asking while a dead trial is failed must not take its place as well as
    its retry (seen as 26 finished trials for a total of 24 on PostgreSQL)."""
    storage = storages.open_storage(journal, total=2)
    study = studies.load(storage, "s", create=True)
    study.tell(study.ask(), 1.0)
    dead = study.ask()
    dead.set_user_attr(dead_trials.WORKER_ATTR, _dead_identity(dead.number))
    other = studies.load(storages.open_storage(journal, total=2), "s")
    outcome = []

    def ask_elsewhere():
        try:
            outcome.append(other.ask().number)
        except storages.BudgetReached:
            outcome.append("budget reached")

    retry = dead_trials._StaleTrial.__call__
    askers = []

    def slow_retry(self, study, trial):
        askers.append(threading.Thread(target=ask_elsewhere))
        askers[-1].start()
        askers[-1].join(1.0)  # without the lock, the other worker creates a trial here
        retry(self, study, trial)

    monkeypatch.setattr(dead_trials._StaleTrial, "__call__", slow_retry)
    dead_trials.recover_dead_trials(study, storage)
    askers[0].join(10)

    assert outcome == ["budget reached"]
    held = study.get_trials(states=storages.IN_BUDGET)
    assert len(held) == 2


def test_processes_opening_a_fresh_database_storage_at_once_all_get_it(tmp_path):
    # Optuna creates a new database's tables without a lock; the losers of that race retry.
    url, go = f"sqlite:///{tmp_path / 'optuna.db'}", tmp_path / "go"
    code = ("import os, sys, time; from pipeline import storages\n"
            "while not os.path.exists(sys.argv[2]): time.sleep(0.001)\n"
            "storages.open_storage(sys.argv[1], total=1); print('opened')")
    processes = [subprocess.Popen([sys.executable, "-c", code, url, str(go)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(4)]
    time.sleep(3)  # all have imported and wait for the same moment
    go.touch()
    outcomes = [process.communicate(timeout=120) for process in processes]
    assert [out.strip() for out, _ in outcomes] == ["opened"] * 4, [err for _, err in outcomes]


def test_a_worker_waits_for_its_coordinators_journal_and_makes_none(tmp_path):
    from pipeline import worker

    journal = tmp_path / "not-yet.journal"
    with pytest.raises(storages.NotYet, match=r"no journal file .*not-yet\.journal: start "
                                             r"`pipeline sweep --storage"):
        worker.join(str(journal), "any", wait_s=0)
    assert not journal.exists()
    database = tmp_path / "not-yet.db"
    with pytest.raises(storages.NotYet, match=r"no SQLite file sqlite:///.*not-yet\.db: start"):
        worker.join(f"sqlite:///{database}", "any", wait_s=0)
    assert not database.exists()


def test_one_sqlite_storage_has_one_lock_however_its_url_is_written(tmp_path, monkeypatch):
    # Two sweeps writing the same file two ways must take the same lock, or the total slips.
    monkeypatch.chdir(tmp_path)
    relative = storages.open_storage("sqlite:///optuna.db")
    absolute = storages.open_storage(f"sqlite:///{tmp_path / 'sub' / '..' / 'optuna.db'}")
    assert relative.lock_name == absolute.lock_name == str(tmp_path / "optuna.db")
