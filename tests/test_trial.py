"""Trials run in batches: one MLflow run per trial, ending as the trial ends."""

from __future__ import annotations

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from pipeline import config as configs
from pipeline import data, engine, outages, storages, tracking, worker
from pipeline import study as studies
from pipeline import trial as trials


def _context(store: str) -> trials.TrialContext:
    tracking.connect(store)
    exp = configs.load("line_fit_15pts")
    experiment = tracking.experiment_id(exp.name)
    parent, _ = tracking.open_parent(experiment, "sweep", tags={})
    return trials.TrialContext(exp=exp, dataset=data.build(exp.data, exp.seed),
                               lr=(1e-4, 1e-2), epochs=(20, 40), experiment_id=experiment,
                               parent_run_id=parent, study_name="s", log_models="none")


def test_each_trial_of_a_batch_gets_its_run_and_its_outcome(store, tmp_path):
    ctx = _context(store)
    study = studies.load(storages.open_storage(str(tmp_path / "j"), total=3), "s", create=True)
    told = []
    trials.run_batch(study, [study.ask() for _ in range(3)], ctx,
                     on_told=lambda s, t: told.append(t.number))

    assert told == [0, 1, 2]
    client = MlflowClient()
    for trial in study.get_trials():
        assert trial.state == TrialState.COMPLETE
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == ctx.parent_run_id
        assert float(run.data.params["lr"]) == trial.params["lr"]
        assert run.data.metrics["objective"] == trial.value
        curve = client.get_metric_history(run.info.run_id, "train_loss")
        assert len(curve) == trial.params["epochs"] + 1


def test_a_trial_failed_as_stale_meanwhile_leaves_the_others_told(store, tmp_path,
                                                                  monkeypatch):
    """A worker whose heartbeat came too late finds its trial failed by another process:
    it tells the others, and closes the lost trial's run FAILED, without a traceback."""
    ctx = _context(store)
    study = studies.load(storages.open_storage(str(tmp_path / "j"), total=2), "s", create=True)
    asked = [study.ask(), study.ask()]
    train_many = engine.train_many

    def failed_elsewhere_meanwhile(*args, **kwargs):
        results = train_many(*args, **kwargs)
        optuna.load_study(study_name="s", storage=storages.open_storage(str(tmp_path / "j"))
                          ).tell(asked[0].number, state=TrialState.FAIL)
        return results

    monkeypatch.setattr(engine, "train_many", failed_elsewhere_meanwhile)
    said = []
    trials.run_batch(study, asked, ctx, on_told=worker.progress_line(said.append, 2))

    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.COMPLETE]
    assert said[0].startswith("trial 0 failed as stale by another process") and len(said) == 2
    lost = MlflowClient().get_run(study.trials[0].user_attrs["mlflow_run_id"])
    assert lost.info.status == "FAILED"
    assert lost.data.tags["optuna_state"] == "FAIL"


def test_a_failing_batch_fails_its_trials_and_closes_their_runs(store, tmp_path, monkeypatch):
    """Training that raises (a bug, memory) leaves no trial RUNNING and no run open."""
    ctx = _context(store)
    study = studies.load(storages.open_storage(str(tmp_path / "j"), total=2), "s", create=True)
    asked = [study.ask(), study.ask()]

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(engine, "train_many", broken)
    try:
        trials.run_batch(study, asked, ctx)
    except RuntimeError as err:
        assert str(err) == "out of memory"
    else:
        raise AssertionError("the error must reach the worker")
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.FAIL]
    client = MlflowClient()
    for trial in study.get_trials():
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.info.status == "FAILED" and run.data.tags["optuna_state"] == "FAIL"
        assert float(run.data.params["lr"]) == trial.params["lr"]


def test_the_objective_is_a_validation_mse_whatever_the_loss():
    """With `loss: sum` the validation curve is a sum; the objective divides it by the
    validation values, so it reads as an MSE like every other objective."""
    from pipeline.train import TrainResult

    exp = configs.load("synthetic", ["loss=sum", "data.n_rows=50", "data.n_targets=2"])
    _, val_set = data.split(data.build(exp.data, exp.seed), exp.val_fraction, exp.seed)
    result = TrainResult(model=None, device=None, train_loss=[9.0, 4.0], val_loss=[80.0, 40.0])
    assert trials.objective_value(result, exp, val_set) == 40.0 / (val_set.n_rows * 2)
    mean = configs.load("synthetic", ["data.n_rows=50"])
    assert trials.objective_value(result, mean, val_set) == 40.0
    assert trials.objective_value(result, mean, None) == 4.0  # no split: the training loss


# Heartbeats kept by hand, as pipeline.dead_trials keeps them for trials asked in batches.
quiet_heartbeats = pytest.mark.filterwarnings(
    "ignore::optuna.exceptions.ExperimentalWarning", "ignore:Heartbeat of storage:UserWarning")


def _rdb_study(tmp_path):
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}",
                                         heartbeat_interval=60, grace_period=120)
    return optuna.create_study(storage=storage), storage


@quiet_heartbeats
def test_a_result_waits_out_a_database_that_stops_answering(tmp_path, monkeypatch):
    # First the database is gone; then the tell reaches it but the answer is lost: the trial
    # is found told there, and is not told twice.
    study, _ = _rdb_study(tmp_path)
    trial = study.ask()
    tell, attempts = study.tell, []

    def flaky(*args, **kwargs):
        attempts.append(args)
        if len(attempts) == 2:
            tell(*args, **kwargs)
        if len(attempts) <= 2:
            raise optuna.exceptions.StorageInternalError("connection refused")
        raise AssertionError("told twice")

    monkeypatch.setattr(study, "tell", flaky)
    frozen = trials._told(study, trial, outages.Outage(30), 1.5)
    assert len(attempts) == 2 and frozen.state == TrialState.COMPLETE and frozen.value == 1.5
    assert study.trials[0].state == TrialState.COMPLETE


@quiet_heartbeats
def test_a_result_gives_up_on_a_database_gone_for_good(tmp_path, monkeypatch):
    study, _ = _rdb_study(tmp_path)
    trial = study.ask()
    monkeypatch.setattr(study, "tell", lambda *a, **k: (_ for _ in ()).throw(
        optuna.exceptions.StorageInternalError("connection refused")))
    with pytest.raises(optuna.exceptions.StorageInternalError):
        trials._told(study, trial, outages.Outage(0), 1.5)
    assert study.trials[0].state == TrialState.RUNNING  # the next command finds it dead


@quiet_heartbeats
def test_heartbeats_outlast_a_database_that_stops_answering(tmp_path, monkeypatch):
    import threading
    import time

    from pipeline import dead_trials

    study, storage = _rdb_study(tmp_path)
    trial = study.ask()
    monkeypatch.setattr(dead_trials, "HEARTBEAT_S", 0.05)
    monkeypatch.setattr(dead_trials, "HEARTBEAT_RETRY_S", 0.01)
    record, calls, died = storage.record_heartbeat, [], []

    def flaky(trial_id):
        calls.append(trial_id)
        if len(calls) <= 3:
            raise optuna.exceptions.StorageInternalError("connection refused")
        record(trial_id)

    monkeypatch.setattr(storage, "record_heartbeat", flaky)
    monkeypatch.setattr(threading, "excepthook", died.append)
    with dead_trials.heartbeats(study, storage, [trial]):
        deadline = time.monotonic() + 10
        while len(calls) < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert died == [] and len(calls) >= 6  # beating again once the database answers
    assert storage._get_stale_trial_ids(study._study_id) == []


@pytest.mark.parametrize("given", ["soon", "-1", "inf", "nan", ""])
def test_a_patience_that_is_no_number_of_seconds_is_refused_before_anything_runs(
        workdir, monkeypatch, given):
    from click.testing import CliRunner

    from pipeline.cli import cli

    monkeypatch.setenv("PIPELINE_STORAGE_PATIENCE", given)
    for args in (["sweep", "-e", "line_fit_15pts", "--n-trials", "2"],
                 ["worker", "--storage", "optuna.journal", "--study", "s"]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1 and result.output.splitlines() == [
            f"Error: PIPELINE_STORAGE_PATIENCE={given!r}: give a number of seconds, 0 or more"]
    assert list(workdir.iterdir()) == []


def test_an_outage_is_waited_out_on_one_clock_until_the_patience_is_spent(monkeypatch):
    monkeypatch.setattr(outages, "RETRY_S", 0.0)
    monkeypatch.setenv("PIPELINE_STORAGE_PATIENCE", "0.3")
    outage = outages.Outage()
    gone = optuna.exceptions.StorageInternalError("connection refused")
    assert outage.seconds == 0.3
    assert not outage.wait_out(ValueError("a bug, not the database"))
    assert outage.wait_out(gone) and outage.since is not None
    outage.since -= 0.31  # the first failure, longer ago than the patience
    assert not outage.wait_out(gone)
    outage.answered()  # an answer in between starts the clock afresh
    assert outage.wait_out(gone)
    monkeypatch.delenv("PIPELINE_STORAGE_PATIENCE")
    assert outages.Outage().seconds == 30.0


def test_asked_trials_are_claimed_for_their_process_at_once(tmp_path):
    # A worker killed right after asking leaves trials the next command fails at once (their
    # process is gone), not after ORPHAN_S as trials nobody claimed.
    import os

    from pipeline import dead_trials

    storage = storages.open_storage(str(tmp_path / "j"), total=5)
    study = studies.load(storage, "s", create=True)
    asked = worker.ask(study, storage, 3)
    assert [t.number for t in asked] == [0, 1, 2]
    for trial in study.get_trials():
        claim = trial.user_attrs[dead_trials.WORKER_ATTR]
        assert claim["trial"] == trial.number and claim["pid"] == os.getpid()


def test_a_trial_an_outage_left_behind_is_retried_by_its_own_worker(store, tmp_path,
                                                                     monkeypatch):
    # The database dropped while `study.ask` was sampling a trial it had already created and
    # claimed for this process: RUNNING, claimed by a live process, no heartbeat. The worker,
    # between batches, fails and retries it; before, it waited for it forever.
    ctx = _context(store)
    storage = storages.open_storage(str(tmp_path / "j"), total=3)
    study = studies.load(storage, "s", create=True)
    storage.create_new_trial(study._study_id)
    assert study.trials[0].state == TrialState.RUNNING
    closed = []
    monkeypatch.setattr(trials, "close_dead_trial_run",
                        lambda study, trial, retried_as: closed.append((trial.number, retried_as)))

    outcome = worker.loop(study, storage, ctx, 3, timeout=20, echo=lambda line: None)
    assert outcome.finished == 3 and closed == [(0, 1)]
    states = [t.state for t in study.get_trials()]
    assert states[0] == TrialState.FAIL and states.count(TrialState.FAIL) == 1


def test_a_stop_while_the_storage_is_not_answering_says_so(tmp_path, monkeypatch):
    from pipeline import interrupts

    study = studies.load(storages.open_storage(str(tmp_path / "j"), total=3), "s", create=True)
    monkeypatch.setattr(study, "get_trials", lambda *a, **k: (_ for _ in ()).throw(
        optuna.exceptions.StorageInternalError("connection refused")))
    stop = interrupts.Interrupted(2)
    studies.said_on_stop(stop, study, 3)
    assert stop.finished is None and stop.exit_code == 130
    assert stop.message() == ("interrupted while the Optuna storage was not answering; once it "
                              "answers, run the same command to resume")
    monkeypatch.undo()
    studies.said_on_stop(stop, study, 3)
    assert stop.message().startswith("interrupted: 0 of 3 trials finished")


def test_runs_left_open_after_their_trial_ended_are_closed_as_it_ended(store, tmp_path):
    # A worker that failed its trials but lost the MLflow server before closing their runs
    # (an address answered by another web server) left them RUNNING: the next start closes
    # them, and leaves alone the run of a trial still running.
    ctx = _context(store)
    study = studies.load(storages.open_storage(str(tmp_path / "j"), total=4), "s", create=True)
    asked = [study.ask() for _ in range(4)]
    runs = [tracking.open_child(ctx.experiment_id, ctx.parent_run_id, f"t{t.number}",
                                tags={"stage": "trial", "optuna_trial": str(t.number)})
            for t in asked]
    study.tell(asked[0], state=TrialState.FAIL)
    study.tell(asked[1], 1.0)
    study.tell(asked[2], state=TrialState.PRUNED)

    assert trials.close_runs_left_open(study, ctx.experiment_id, ctx.parent_run_id) == 3
    client = MlflowClient()
    statuses = [client.get_run(run_id).info.status for run_id in runs]
    assert statuses == ["FAILED", "FINISHED", "KILLED", "RUNNING"]
    assert client.get_run(runs[0]).data.tags["optuna_state"] == "FAIL"
    assert trials.close_runs_left_open(study, ctx.experiment_id, ctx.parent_run_id) == 0
