"""Sweep trials: trained together in batches, each tracked as a child run of the sweep.

The trial's MLflow run is created with the parent's id explicitly (so nesting holds in any
process) and ends with a status mirroring the trial: COMPLETE -> FINISHED, PRUNED -> KILLED,
FAIL -> FAILED, interrupted -> KILLED (tag ``optuna_state``). The trial holds the run's id as
its user attribute ``mlflow_run_id``, and the process that runs it as ``worker``.
"""

from __future__ import annotations

import contextlib
import functools
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from pipeline import config as configs
from pipeline import data, dead_trials, engine, interrupts, outages, tracking
from pipeline import study as studies
from pipeline import train as training
from pipeline.config import Experiment
from pipeline.dataset import Dataset

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
    batch: int = 1  # trials trained together
    rows: tuple[Dataset, Dataset | None] | None = None  # the split, where the caller made it
    # The worker's one clock for a database that stops answering (see outages.Outage).
    outage: outages.Outage = field(default_factory=outages.Outage, compare=False)

    @property
    def report_every(self) -> int:
        return max(1, self.epochs[1] // REPORTS_PER_TRIAL)

    @functools.cached_property
    def split(self) -> tuple[Dataset, Dataset | None]:
        """The training and validation rows, split once for every batch."""
        return self.rows or data.split(self.dataset, self.exp.val_fraction, self.exp.seed,
                          self.exp.train.scale)

    @functools.cached_property
    def kept(self) -> dict:
        """What the engine derives from the rows once for every batch (``train_many``)."""
        return {}

    @property
    def plotted(self) -> str:
        """The curve the sweep's report draws: the objective's loss."""
        return "val_loss" if self.split[1] is not None else "train_loss"

    @functools.cached_property
    def curves(self) -> dict[str, array]:
        """The drawn curve of each trial this process ran, by run id: the report has them
        without reading them back from the store (one call a trial)."""
        return {}


def objective_value(result: training.TrainResult, exp: Experiment,
                    val_set: Dataset | None) -> float:
    """Validation MSE where there is a split, else the final training objective."""
    if val_set is None:
        return result.train_loss[-1]
    value = result.val_loss[-1]
    return value / val_set.targets.size if exp.train.loss == "sum" else value


def run_batch(study: optuna.Study, asked: list[optuna.Trial], ctx: TrialContext,
              on_told: Callable[[optuna.Study, FrozenTrial], None] | None = None) -> None:
    """Train the asked trials together (:func:`engine.train_many`) and tell Optuna each one.

    Each trial gets its MLflow run first; a pruned or diverged trial leaves the batch at its
    epoch. On Ctrl-C or SIGTERM every run of the batch ends KILLED and its trial FAIL.
    """
    # Each trial's lr then its epochs, trial by trial: a sampler drawing from one random
    # stream (RandomSampler) then gives the same trials whatever the batch size.
    params = [(trial.suggest_float("lr", *ctx.lr, log=True),
               trial.suggest_int("epochs", *ctx.epochs)) for trial in asked]
    lrs, epochs = [lr for lr, _ in params], [count for _, count in params]
    train_set, val_set = ctx.split
    run_ids = [_open_run(trial, ctx, lr, count)
               for trial, lr, count in zip(asked, lrs, epochs, strict=True)]
    watch = _Watch(asked, report=not isinstance(study.pruner, optuna.pruners.NopPruner),
                   outage=ctx.outage)
    try:
        results = engine.train_many(ctx.exp.train, train_set, val_set, lrs, epochs,
                                    on_epoch=watch, report_every=ctx.report_every,
                                    kept=ctx.kept)
    except BaseException as err:
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        closed = [tracking.close_run(run_id, status, tags={"optuna_state": TrialState.FAIL.name},
                                     params=trial_params(ctx, trial))
                  for trial, run_id in zip(asked, run_ids, strict=True)]
        # A trial whose run or state cannot be written (the MLflow server or the storage is
        # what failed) stays RUNNING: the next command finds it dead and closes its run with
        # it (pipeline.dead_trials). A storage that is not answering is not asked again: each
        # call would wait for its timeout. The error that stopped the batch is raised.
        silent = ctx.outage.silent
        for trial, told_mlflow in zip(asked, closed, strict=True):
            if told_mlflow and not silent:
                try:
                    study.tell(trial, state=TrialState.FAIL)
                except Exception:  # noqa: BLE001  (whatever the storage's driver raises)
                    silent = True
        if silent and isinstance(err, interrupts.Interrupted):
            err.storage_silent = True
        raise
    for k, (trial, run_id, result) in enumerate(zip(asked, run_ids, results, strict=True)):
        try:
            frozen = _tell(study, trial, run_id, result, watch.pruned[k], ctx, train_set,
                           val_set)
        except (UpdateFinishedTrialError, ValueError):
            if study._storage.get_trial(trial._trial_id).state != TrialState.FAIL:
                raise
            # Its heartbeat came too late: another process failed it as stale and queued a
            # retry. Its run ends failed too, so that trials and runs stay one-to-one.
            tracking.close_run(run_id, "FAILED", tags={"optuna_state": TrialState.FAIL.name,
                                                       "stale": "true"},
                               params=trial_params(ctx, trial))
            frozen = study._storage.get_trial(trial._trial_id)  # said, as the others are
        if on_told is not None:
            on_told(study, frozen)


def _open_run(trial: optuna.Trial, ctx: TrialContext, lr: float, epochs: int) -> str:
    dead_trials.claim(trial)  # claimed when asked; here too for a batch asked elsewhere
    run_id = tracking.open_child(
        ctx.experiment_id, ctx.parent_run_id,
        f"t{trial.number} lr={lr:.2g} ep={epochs}",  # fits the MLflow UI's name column
        tags={"stage": "trial", "optuna_study": ctx.study_name,
              "optuna_trial": str(trial.number),
              tracking.NOTE: f"Trial {trial.number} of Optuna study `{ctx.study_name}`: "
                             f"lr={lr:.4g}, {epochs} epochs; the rest as the sweep's parent."},
    )
    trial.set_user_attr("mlflow_run_id", run_id)
    return run_id


def trial_params(ctx: TrialContext, trial: optuna.Trial | FrozenTrial) -> dict:
    """The run params of a trial: its experiment's, with the trial's lr and epochs."""
    exp = configs.with_train(ctx.exp, **trial.params)
    return {**exp.params(), "trial_number": trial.number}


def _tell(study, trial, run_id: str, result: training.TrainResult, pruned: bool,
          ctx: TrialContext, train_set: Dataset, val_set: Dataset | None) -> FrozenTrial:
    """Close the trial's run with its params and curves, then tell Optuna how it ended."""
    if result.diverged:
        trial.set_user_attr("diverged", True)
    curves = {"train_loss": result.train_loss}
    if result.val_loss:
        curves["val_loss"] = result.val_loss
    tags = {"diverged": str(result.diverged).lower()}
    params = trial_params(ctx, trial)
    ctx.curves[run_id] = array("d", curves[ctx.plotted])
    if result.diverged or pruned:
        tracking.close_run(run_id, RUN_STATUS[TrialState.PRUNED], curves, {},
                           {**tags, "optuna_state": TrialState.PRUNED.name}, params)
        return _told(study, trial, ctx.outage, state=TrialState.PRUNED)
    value = objective_value(result, ctx.exp, val_set)
    if ctx.log_models == "all":
        tags["model_uri"] = tracking.log_model(run_id, result.model.to_module(), train_set,
                                               ctx.exp.train.dtype, validate=False)
    tracking.close_run(run_id, RUN_STATUS[TrialState.COMPLETE], curves, {"objective": value},
                       {**tags, "optuna_state": TrialState.COMPLETE.name}, params)
    return _told(study, trial, ctx.outage, value)


def _told(study: optuna.Study, trial: optuna.Trial, outage: outages.Outage,
          value: float | None = None, state: TrialState | None = None) -> FrozenTrial:
    """``study.tell``, waiting out a database that stopped answering (``outage``; its
    heartbeats wait too, see :mod:`pipeline.dead_trials`): a result already in its MLflow run
    is not thrown away for a restart of the database. A tell that reached the database before
    the connection dropped is found there, not told twice."""
    while True:
        try:
            frozen = study.tell(trial, value, state=state)
            break
        except Exception as err:
            if not outage.wait_out(err):
                raise
        with contextlib.suppress(Exception):
            frozen = study._storage.get_trial(trial._trial_id)
            if frozen.state == (state or TrialState.COMPLETE):
                break
    outage.answered()
    return frozen


class _Watch:
    """Report-epoch hook of a batch: stops on Ctrl-C or SIGTERM, reports to the pruner."""

    def __init__(self, asked: list[optuna.Trial], report: bool,
                 outage: outages.Outage | None = None) -> None:
        self.asked, self.report = asked, report  # no pruner: the curves go to MLflow only
        self.outage = outage or outages.Outage()
        self.pruned = [False] * len(asked)

    def __call__(self, k: int, epoch: int, train_loss: float, val_loss: float | None) -> bool:
        interrupts.check()
        if not self.report:
            return False
        trial = self.asked[k]
        try:
            trial.report(val_loss if val_loss is not None else train_loss, epoch)
            if trial.should_prune():
                self.pruned[k] = True
                return True
        except UpdateFinishedTrialError:
            return True  # failed as stale by another process (see run_batch): stop training it
        except Exception as err:
            if not outages.failed_under_way(err):
                raise
            # The database is not answering: the batch trains on, unpruned, without asking
            # it again (a server that hangs would hold each report for its timeout); the
            # results wait for it (see _told).
            self.report = False
            self.outage.noticed()
        return False


def close_runs_left_open(study: optuna.Study, experiment_id: str, parent_run_id: str) -> int:
    """Close, as their trials ended, the trial runs left RUNNING after their trial ended: a
    worker that failed its trial (or a dead worker's) but lost the MLflow server before it
    could close the run. Returns how many it closed."""
    running = tracking.running_children(experiment_id, parent_run_id, "optuna_trial")
    if not running:
        return 0
    ended = {trial.number: trial.state for trial in study.get_trials(deepcopy=False)
             if trial.state in RUN_STATUS}
    closed = 0
    for run_id, number in running.items():
        if number.isdigit() and (state := ended.get(int(number))) is not None:
            tracking.close_run(run_id, RUN_STATUS[state], tags={"optuna_state": state.name})
            closed += 1
    return closed


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
    tracking.close_run(run_id, "FAILED", tags=tags,
                       params={**trial.params, "trial_number": trial.number})
