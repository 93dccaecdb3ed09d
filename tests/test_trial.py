"""Trials run in batches: one MLflow run per trial, ending as the trial ends."""

from __future__ import annotations

import optuna
from mlflow import MlflowClient
from optuna.trial import TrialState

from pipeline import config as configs
from pipeline import data, engine, tracking
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
    study = studies.load(studies.open_storage(str(tmp_path / "j"), total=3), "s", create=True)
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
    study = studies.load(studies.open_storage(str(tmp_path / "j"), total=2), "s", create=True)
    asked = [study.ask(), study.ask()]
    train_many = engine.train_many

    def failed_elsewhere_meanwhile(*args, **kwargs):
        results = train_many(*args, **kwargs)
        optuna.load_study(study_name="s", storage=studies.open_storage(str(tmp_path / "j"))
                          ).tell(asked[0].number, state=TrialState.FAIL)
        return results

    monkeypatch.setattr(engine, "train_many", failed_elsewhere_meanwhile)
    trials.run_batch(study, asked, ctx)

    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.COMPLETE]
    lost = MlflowClient().get_run(study.trials[0].user_attrs["mlflow_run_id"])
    assert lost.info.status == "FAILED"
    assert lost.data.tags["optuna_state"] == "FAIL"
