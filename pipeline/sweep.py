"""Optuna sweeps over the learning rate and the number of epochs, tracked as nested MLflow runs.

    pipeline sweep -e crop_yields_builtin --n-trials 20 --workers 3

One MLflow parent run per study (found again when the study resumes), one child run per trial
created with the parent's id explicitly, so nesting holds across worker processes. The study
lives in a persistent Optuna storage; ``--n-trials`` is the study's target total, so running
the same command again only runs the trials still missing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from pipeline import config as configs
from pipeline import data, redact, theory, tracking
from pipeline import train as training
from pipeline.config import Experiment, SweepSettings
from pipeline.data import Dataset
from pipeline.errors import UserError

DIVERGENCE_FACTOR = 100.0  # a loss this many times above its start will not come back
REPORTS_PER_TRIAL = 20  # intermediate values sent to the storage per trial, at most
RUN_STATUS = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED",
              TrialState.FAIL: "FAILED"}
Echo = Callable[[str], None]


class SweepError(UserError):
    """A sweep that cannot start: unreachable storage, a study made for other settings."""


@dataclass(frozen=True)
class Space:
    lr: tuple[float, float]
    epochs: tuple[int, int]

    @property
    def report_every(self) -> int:
        return max(1, self.epochs[1] // REPORTS_PER_TRIAL)


@dataclass(frozen=True)
class Summary:
    study_name: str
    parent_run_id: str
    n_trials: int
    new_trials: int
    states: dict[str, int]
    best_value: float | None
    best_params: dict
    rates: dict[str, float]
    model_name: str | None = None
    version: str | None = None
    decision: str | None = None
    champion_version: str | None = None


# --- setting up ---------------------------------------------------------------------------------


def search_space(exp: Experiment, settings: SweepSettings, rates: dict[str, float]) -> Space:
    """lr and epochs ranges: command line, else the config's sweep section, else from theory."""
    lr = settings.lr_range or exp.sweep.lr or theory.default_lr_range(rates)
    epochs = settings.epochs_range or exp.sweep.epochs or (
        max(1, exp.train.epochs // 4), max(2, exp.train.epochs * 4))
    checked = configs.SweepConfig(lr=tuple(map(float, lr)), epochs=tuple(map(int, epochs)))
    checked.validate()
    return Space(checked.lr, checked.epochs)


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """A URL with a scheme is a relational database; anything else is a journal file path."""
    if "://" not in url:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        try:
            return JournalStorage(JournalFileBackend(url))
        except OSError as err:
            raise SweepError(f"cannot open journal storage {url}: {err.strerror}") from None
        except Exception as err:  # replaying the log failed: a line that is not what Optuna wrote
            raise SweepError(f"journal storage {url} cannot be read (damaged?): "
                             f"{tracking.first_line(err)}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # Heartbeats let a later run mark trials of a killed worker as failed.
            return optuna.storages.RDBStorage(url, heartbeat_interval=30, grace_period=90)
    except Exception as err:  # SQLAlchemy raises many types for a bad or unreachable database
        reason = tracking.first_line(err)
        if "DB access module" in reason or isinstance(err, ImportError):
            reason = ("its database driver is not installed (postgresql:// needs psycopg 3: "
                      "pip install 'psycopg[binary]'; mysql:// needs PyMySQL)")
        raise SweepError(f"cannot open storage {redact.mask(url)}: "
                         f"{redact.mask(reason)[:200]}") from None


def config_digest(exp: Experiment) -> str:
    """What must stay the same for trials of one study to be comparable."""
    params = {k: v for k, v in exp.params().items()
              if k not in ("lr", "epochs", "device") and not k.startswith("sweep.")}
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()


def make_sampler(settings: SweepSettings, offset: int = 0) -> optuna.samplers.BaseSampler:
    seed = None if settings.seed is None else settings.seed + offset
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    if name == "percentile":
        return optuna.pruners.PercentilePruner(25.0, n_startup_trials=5)
    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0)


def load_study(settings: SweepSettings, study_name: str, offset: int = 0) -> optuna.Study:
    """Create or load the study; the sampler's seed moves on with every trial already held,
    so a resumed study does not propose its first trials again."""
    storage = open_storage(settings.storage)
    try:
        try:
            held = len(optuna.load_study(study_name=study_name, storage=storage).trials)
        except KeyError:
            held = 0  # a new study
        return optuna.create_study(
            study_name=study_name,
            storage=storage,
            direction="minimize",
            sampler=make_sampler(settings, offset + held),
            pruner=make_pruner(settings.pruner),
            load_if_exists=True,
        )
    except ValueError as err:  # e.g. a journal line that is not JSON: a damaged file
        raise SweepError(f"storage {redact.mask(settings.storage)} cannot be read "
                         f"(damaged?): {redact.mask(tracking.first_line(err))}") from None


# --- one trial ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrialContext:
    """Everything a trial needs; picklable, so worker processes receive it whole."""

    exp: Experiment
    dataset: Dataset
    space: Space
    experiment_id: str
    parent_run_id: str
    study_name: str
    log_models: str


def objective_value(result: training.TrainResult, exp: Experiment,
                    val_set: Dataset | None) -> float:
    """Validation MSE where there is a split, else the final training objective."""
    if val_set is None:
        return result.train_loss[-1]
    value = result.val_loss[-1]
    return value / val_set.targets.size if exp.train.loss == "sum" else value


def run_trial(trial: optuna.Trial, ctx: TrialContext) -> float:
    lr = trial.suggest_float("lr", *ctx.space.lr, log=True)
    epochs = trial.suggest_int("epochs", *ctx.space.epochs)
    exp = configs.with_train(ctx.exp, lr=lr, epochs=epochs)
    train_set, val_set = data.split(ctx.dataset, exp.val_fraction, exp.seed)
    from pipeline.workflow import run_name

    run_id = tracking.open_child(
        ctx.experiment_id, ctx.parent_run_id, f"trial {trial.number}: {run_name(exp.train)}",
        params={**exp.params(), "trial_number": trial.number},
        tags={"stage": "trial", "optuna_study": ctx.study_name,
              "optuna_trial": str(trial.number)},
    )
    trial.set_user_attr("mlflow_run_id", run_id)
    watch = _Watch(trial, ctx.space.report_every)
    state, result, tags, metrics = TrialState.FAIL, None, {}, {}
    interrupted = False
    try:
        result = training.train(exp.train, train_set, val_set, on_epoch=watch)
        # Ending above where it started means the steps overshoot: lr is past the stable edge.
        diverged = result.diverged or watch.diverged or not (
            result.train_loss[-1] <= result.train_loss[0])
        tags["diverged"] = str(diverged).lower()
        trial.set_user_attr("diverged", diverged)
        if diverged or watch.pruned:
            state = TrialState.PRUNED
            raise optuna.TrialPruned(
                f"diverged at epoch {result.epochs_run}" if diverged else "pruned by the pruner")
        value = objective_value(result, exp, val_set)
        metrics["objective"] = value
        if ctx.log_models == "all":
            with tracking.resumed(run_id):
                tags["model_uri"] = tracking.log_model(
                    result.model.to_module(), train_set, exp.train.dtype)
        state = TrialState.COMPLETE
        return value
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        curves = {}
        if result is not None:
            curves["train_loss"] = result.train_loss
            if result.val_loss:
                curves["val_loss"] = result.val_loss
        status = "KILLED" if interrupted else RUN_STATUS[state]
        tracking.close_run(run_id, status, curves, metrics, {**tags, "optuna_state": state.name})


class _Watch:
    """Per-epoch hook: reports to the pruner every few epochs and stops diverging trials."""

    def __init__(self, trial: optuna.Trial, report_every: int) -> None:
        self.trial, self.report_every = trial, report_every
        self.start: float | None = None
        self.pruned = self.diverged = False

    def __call__(self, epoch: int, train_loss: float, val_loss: float | None) -> bool:
        value = val_loss if val_loss is not None else train_loss
        if epoch == 0:
            self.start = value
            return False
        if not math.isfinite(value) or value > DIVERGENCE_FACTOR * max(self.start, 1e-12):
            self.diverged = True
            return True
        if epoch % self.report_every == 0:
            self.trial.report(value, epoch)
            if self.trial.should_prune():
                self.pruned = True
                return True
        return False


# --- running the study --------------------------------------------------------------------------


def _progress_line(echo: Echo, target: int) -> Callable:
    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        done = sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))
        try:
            best = f"{study.best_value:.6g}"
        except ValueError:
            best = "none yet"
        if trial.state == TrialState.COMPLETE:
            outcome = f"complete, value {trial.value:.6g}"
        elif trial.state == TrialState.PRUNED:
            steps = trial.intermediate_values
            if trial.user_attrs.get("diverged") or not steps:
                outcome = "pruned (diverged)"
            else:
                outcome = f"pruned at epoch {max(steps)}"
        else:
            outcome = trial.state.name.lower()
        echo(f"trial {trial.number} {outcome}: "
             f"lr={trial.params.get('lr', float('nan')):.3g} "
             f"epochs={trial.params.get('epochs')} | {done}/{target} done, best {best}")

    return callback


def _optimize(ctx: TrialContext, settings: SweepSettings, n_trials: int, offset: int,
              tracking_uri: str, show_bar: bool) -> None:
    """One worker: load the study and run ``n_trials`` trials of it."""
    tracking.connect(tracking_uri)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = load_study(settings, ctx.study_name, offset)
    callbacks = [] if show_bar else [_progress_line(print, settings.n_trials)]
    study.optimize(lambda trial: run_trial(trial, ctx), n_trials=n_trials,
                   timeout=settings.timeout, callbacks=callbacks, show_progress_bar=show_bar,
                   gc_after_trial=False)


def _worker(ctx: TrialContext, settings: SweepSettings, n_trials: int, offset: int,
            tracking_uri: str, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)  # K workers share the cores instead of each taking all
    try:
        _optimize(ctx, settings, n_trials, offset, tracking_uri, show_bar=False)
    except KeyboardInterrupt:
        sys.exit(130)


def shares(total: int, workers: int) -> list[int]:
    """Split ``total`` trials over workers as evenly as possible, dropping empty shares."""
    base, extra = divmod(total, workers)
    return [n for n in (base + (i < extra) for i in range(workers)) if n > 0]


def run(exp: Experiment, settings: SweepSettings, experiment_id: str, tracking_uri: str,
        echo: Echo = print) -> Summary:
    """Create or resume the study, run the missing trials, then summarise and register."""
    settings.validate()
    training.resolve_device(exp.train.device)  # before the study: no trial fails for it
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study_name = settings.study_name or exp.name
    dataset = data.build(exp.data, exp.seed)
    train_set, _ = data.split(dataset, exp.val_fraction, exp.seed)
    rates = theory.learning_rates(train_set, exp.train.has_bias, exp.train.loss)
    space = search_space(exp, settings, rates)
    study = load_study(settings, study_name)
    digest = config_digest(exp)
    stored = study.user_attrs.get("config_digest")
    if stored is not None and stored != digest:
        raise SweepError(f"study {study_name!r} was made with other settings than "
                         f"{exp.name!r} has now; pass --study-name to start another study")
    study.set_user_attr("config_digest", digest)

    parent_run_id, new_parent = tracking.open_parent(
        experiment_id, f"sweep {study_name}",
        {"stage": "sweep", "optuna_study": study_name,
         "optuna_storage": redact.mask(settings.storage),
         "data_key": data.content_key(exp.data, exp.seed)},
        run_id=study.user_attrs.get("mlflow_parent_run_id"),
    )
    study.set_user_attr("mlflow_parent_run_id", parent_run_id)
    status = "FAILED"
    try:
        settings_now = _parent_params(exp, settings, space)
        if new_parent:
            tracking.log_to_run(parent_run_id, params=settings_now, metrics=rates)
        else:  # params are write-once; a resume may widen ranges or change sampler or pruner
            tracking.log_to_run(parent_run_id, tags={"last_resume_settings": json.dumps(
                {k: v for k, v in settings_now.items() if k.startswith("sweep.")})})
        missing = settings.n_trials - len(study.trials)
        ctx = TrialContext(exp, dataset, space, experiment_id, parent_run_id, study_name,
                           settings.log_models)
        if missing > 0:
            echo(f"sweep {study_name}: running {missing} of {settings.n_trials} trials "
                 f"(lr in [{space.lr[0]:.3g}, {space.lr[1]:.3g}], epochs in "
                 f"[{space.epochs[0]}, {space.epochs[1]}]) on {settings.workers} worker(s)")
            _run_workers(ctx, settings, missing, tracking_uri)
        else:
            echo(f"sweep {study_name}: the study already holds {len(study.trials)} trials; "
                 "nothing to run")
        summary = _summarise(study, exp, ctx, rates, max(missing, 0))
        status = "FINISHED"
        return summary
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracking.close_run(parent_run_id, status)


def _run_workers(ctx: TrialContext, settings: SweepSettings, missing: int, tracking_uri: str):
    if settings.workers == 1:
        _optimize(ctx, settings, missing, 0, tracking_uri, show_bar=sys.stderr.isatty())
        return
    spawn = multiprocessing.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // settings.workers)
    processes = [
        spawn.Process(target=_worker,
                      args=(ctx, settings, n, offset + 1, tracking_uri, threads))
        for offset, n in enumerate(shares(missing, settings.workers))
    ]
    for process in processes:
        process.start()
    try:
        for process in processes:
            process.join()
    except KeyboardInterrupt:
        for process in processes:
            process.terminate()
        raise
    failed = [p.exitcode for p in processes if p.exitcode != 0]
    if failed:
        raise SweepError(f"{len(failed)} of {len(processes)} workers failed "
                         f"(exit codes {failed}); the trials they finished are kept")


def _parent_params(exp: Experiment, settings: SweepSettings, space: Space) -> dict:
    params = {k: v for k, v in exp.params().items() if k not in ("lr", "epochs")}
    params.update({
        "sweep.lr_range": list(space.lr), "sweep.epochs_range": list(space.epochs),
        "sweep.sampler": settings.sampler, "sweep.pruner": settings.pruner,
        "sweep.seed": settings.seed, "sweep.storage": redact.mask(settings.storage),
    })
    params.pop("sweep.lr", None)
    params.pop("sweep.epochs", None)
    return params


def _summarise(study: optuna.Study, exp: Experiment, ctx: TrialContext,
               rates: dict[str, float], new_trials: int) -> Summary:
    from pipeline import sweep_report

    trials = study.get_trials(deepcopy=False)
    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    summary = Summary(study.study_name, ctx.parent_run_id, len(trials), new_trials, states,
                      None, {}, rates)
    sweep_report.log_study(study, ctx.parent_run_id)
    if not complete:
        return summary
    best = study.best_trial
    summary = dataclasses.replace(summary, best_value=best.value, best_params=best.params)
    tracking.log_to_run(
        ctx.parent_run_id,
        metrics={"best_value": best.value, "best_lr": best.params["lr"],
                 "best_epochs": best.params["epochs"],
                 "best_lr_over_lr_best_constant": best.params["lr"] / rates["lr_best_constant"]},
        tags={"best_trial": str(best.number),
              "best_run_id": best.user_attrs.get("mlflow_run_id", ""),
              "best_params": json.dumps(best.params)},
    )
    registered = sweep_report.register_best(best, exp, ctx)
    return dataclasses.replace(summary, **registered)
