"""One sweep trial: train with Optuna's lr and epochs, tracked as a child run of the sweep.

The trial's MLflow run is created with the parent's id explicitly (so nesting holds in any
process) and ends with a status mirroring the trial: COMPLETE -> FINISHED, PRUNED -> KILLED,
FAIL -> FAILED, interrupted -> KILLED (tag ``optuna_state``). The trial holds the run's id as
its user attribute ``mlflow_run_id``, and the process that runs it as ``worker``.
"""

from __future__ import annotations

from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState

from pipeline import config as configs
from pipeline import data, interrupts, tracking
from pipeline import study as studies
from pipeline import train as training
from pipeline.config import Experiment
from pipeline.data import Dataset

REPORTS_PER_TRIAL = 20  # intermediate values sent to the storage per trial, at most
RUN_STATUS = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED",
              TrialState.FAIL: "FAILED"}


@dataclass(frozen=True)
class TrialContext:
    """Everything a trial needs, built once per worker from the study's spec."""

    exp: Experiment
    dataset: Dataset
    lr: tuple[float, float]
    epochs: tuple[int, int]
    experiment_id: str
    parent_run_id: str
    study_name: str
    log_models: str

    @property
    def report_every(self) -> int:
        return max(1, self.epochs[1] // REPORTS_PER_TRIAL)


def objective_value(result: training.TrainResult, exp: Experiment,
                    val_set: Dataset | None) -> float:
    """Validation MSE where there is a split, else the final training objective."""
    if val_set is None:
        return result.train_loss[-1]
    value = result.val_loss[-1]
    return value / val_set.targets.size if exp.train.loss == "sum" else value


def run_trial(trial: optuna.Trial, ctx: TrialContext) -> float:
    """Optuna's objective: the trial's value, or ``TrialPruned`` when pruned or diverged."""
    lr = trial.suggest_float("lr", *ctx.lr, log=True)
    epochs = trial.suggest_int("epochs", *ctx.epochs)
    exp = configs.with_train(ctx.exp, lr=lr, epochs=epochs)
    train_set, val_set = data.split(ctx.dataset, exp.val_fraction, exp.seed)
    trial.set_user_attr(studies.WORKER_ATTR, studies.worker_identity(trial.number))
    run_id = tracking.open_child(
        ctx.experiment_id, ctx.parent_run_id,
        f"trial {trial.number}: {configs.run_name(exp.train)}",
        params={**exp.params(), "trial_number": trial.number},
        tags={"stage": "trial", "optuna_study": ctx.study_name,
              "optuna_trial": str(trial.number)},
    )
    trial.set_user_attr("mlflow_run_id", run_id)
    watch = _Watch(trial, ctx.report_every)
    state, result, tags, metrics = TrialState.FAIL, None, {}, {}
    status = None
    try:
        result = training.train(exp.train, train_set, val_set, on_epoch=watch)
        tags["diverged"] = str(result.diverged).lower()
        trial.set_user_attr("diverged", result.diverged)
        if result.diverged or watch.pruned:
            state = TrialState.PRUNED
            raise optuna.TrialPruned(f"diverged at epoch {result.diverged_at}"
                                     if result.diverged else "pruned by the pruner")
        value = objective_value(result, exp, val_set)
        metrics["objective"] = value
        if ctx.log_models == "all":
            with tracking.resumed(run_id):
                tags["model_uri"] = tracking.log_model(
                    result.model.to_module(), train_set, exp.train.dtype)
        state = TrialState.COMPLETE
        return value
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        curves = {}
        if result is not None:
            curves["train_loss"] = result.train_loss
            if result.val_loss:
                curves["val_loss"] = result.val_loss
        tracking.close_run(run_id, status or RUN_STATUS[state], curves, metrics,
                           {**tags, "optuna_state": state.name})


class _Watch:
    """Per-epoch hook: stops on Ctrl-C or SIGTERM, reports to the pruner every few epochs."""

    def __init__(self, trial: optuna.Trial, report_every: int) -> None:
        self.trial, self.report_every = trial, report_every
        self.pruned = False

    def __call__(self, epoch: int, train_loss: float, val_loss: float | None) -> bool:
        interrupts.check()
        if epoch == 0 or epoch % self.report_every:
            return False
        self.trial.report(val_loss if val_loss is not None else train_loss, epoch)
        if self.trial.should_prune():
            self.pruned = True
            return True
        return False


def close_dead_trial_run(study: optuna.Study, trial: FrozenTrial,
                         retried_as: int | None) -> None:
    """The MLflow run of a trial whose worker died: FAILED, and which trial retries it.

    A worker killed between creating the run and recording its id on the trial leaves a run
    only its tags name, so the run is looked up by them when the trial does not say.
    """
    spec = studies.read_spec(study)
    run_id = trial.user_attrs.get("mlflow_run_id") or tracking.find_child(
        spec.experiment_id, spec.parent_run_id, {"optuna_trial": str(trial.number)})
    if not run_id:
        return  # it died before its run was created
    tags = {"optuna_state": TrialState.FAIL.name, "worker_died": "true"}
    if retried_as is not None:
        tags["retried_as"] = str(retried_as)
    tracking.close_run(run_id, "FAILED", tags=tags)
