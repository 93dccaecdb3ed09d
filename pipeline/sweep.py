"""`pipeline sweep`: the coordinator of an Optuna search over learning rate and epochs.

    pipeline sweep -e crop_yields_builtin --n-trials 40 --workers 2
    pipeline sweep -e crop_yields_builtin --n-trials 40 --workers 0 --storage postgresql://...

It sets up once what every worker reads (the study, its spec in the study's user attributes,
the MLflow parent run and the data logged on it), runs K local workers (:mod:`pipeline.worker`,
the same code `pipeline worker` runs on other machines) or prints the command to start them
elsewhere, waits for the study to hold ``--n-trials`` finished trials, then summarises and
registers the best model, once. Running the same command again resumes: dead trials are
retried, failed ones replaced, and only the missing trials run.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable

import optuna

from pipeline import config as configs
from pipeline import (
    data,
    dead_trials,
    engine,
    interrupts,
    lifetime,
    redact,
    storages,
    sweep_report,
    sweep_workers,
    theory,
    tracking,
    worker,
)
from pipeline import study as studies
from pipeline import train as training
from pipeline import trial as trials
from pipeline.config import Experiment
from pipeline.sweep_settings import Range, SweepSettings

SETUP_LOCK, FINALISE_LOCK = -1, -2  # storage locks (study ids guard trial creation)
FINALISED_ATTR = "finalised_at"  # finished trials when the study was last summarised
PARENT_TOKEN_ATTR = PARENT_TOKEN_TAG = "sweep_parent_token"  # see _set_up
Echo = Callable[[str], None]


def search_space(exp: Experiment, settings: SweepSettings,
                 rates: dict[str, float]) -> tuple[Range, Range]:
    """lr and epochs ranges: command line, else the config's sweep section, else from theory."""
    lr = settings.lr_range or exp.sweep.lr or theory.default_lr_range(rates)
    epochs = settings.epochs_range or exp.sweep.epochs or (
        max(1, exp.train.epochs // 4), max(2, exp.train.epochs * 4))
    # Checked as a config's sweep section is, the range from theory included.
    checked = configs.SweepConfig(lr=tuple(map(float, lr)), epochs=tuple(map(int, epochs)))
    return checked.lr, checked.epochs


def theory_rates(exp: Experiment, train_set, val_set) -> dict[str, float]:
    """Theory's rates for the training rows, and the objective's floor on the rows the
    objective is measured on (the validation MSE's, or the final training loss's)."""
    rates = theory.learning_rates(train_set, exp.train.has_bias, exp.train.loss)
    rates["optimum_objective"] = rates["optimum_loss"] if val_set is None else (
        theory.optimum_loss(val_set, exp.train.has_bias, "mean"))
    return rates


def run(exp: Experiment, settings: SweepSettings, tracking_uri: str,
        echo: Echo = print) -> sweep_report.Summary:
    """Set up or resume the study, have its missing trials run, then summarise once.

    Raises :class:`interrupts.Interrupted` on Ctrl-C or SIGTERM, after closing every run.
    """
    training.resolve_device(exp.train.device)  # before the study: no trial fails for it
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study_name = settings.study_name or exp.name
    dataset = data.build(exp.data, exp.seed)
    data.check_dtype_range(dataset, exp.train.dtype, exp.train.scale == "standard")
    train_set, val_set = data.split(dataset, exp.val_fraction, exp.seed, exp.train.scale)
    rates = theory_rates(exp, train_set, val_set)
    lr, epochs = search_space(exp, settings, rates)
    for note in theory.range_notes(lr, rates):
        echo(note)
    if val_set is None:
        echo("note: no validation split (val_fraction: 0), so the objective is the final "
             "training loss, which more epochs only ever lower; set val_fraction to weigh them")
    tracking.check_store(tracking_uri)  # before a storage is made: a bad store leaves none
    storage = storages.open_storage(settings.storage, settings.n_trials)
    recorded = studies.check_before_tracking(storage, study_name, exp, tracking_uri)
    # The input is good: now the tracking store may be reached (and made) and the experiment.
    tracking.connect(tracking_uri)
    # A study resumed goes on in its parent's experiment, whatever `mlflow run` names.
    experiment_id = None if recorded is None else tracking.run_experiment(
        recorded["parent_run_id"])
    if recorded is not None:
        studies.check_parent_here(study_name, recorded, tracking_uri, experiment_id is not None)
    experiment_id = experiment_id or tracking.experiment_id(exp.name, exp.description)
    tracking.close_dead_runs(experiment_id)  # runs of this host's commands killed with -9
    with interrupts.deferred():
        with storage.lock(SETUP_LOCK):  # one process creates the study and the parent run
            study = studies.load(storage, study_name, settings.sampler, settings.pruner,
                                 settings.seed, create=True)
            spec = _set_up(study, exp, settings, dataset, (lr, epochs), rates,
                           experiment_id, tracking_uri)
        status = "FAILED"
        try:
            dead_trials.recover_dead_trials(study, storage, trials.close_dead_trial_run)
            trials.close_runs_left_open(study, spec.experiment_id, spec.parent_run_id)
            before = studies.finished(study)
            ctx = worker.context(spec, study_name, dataset, (train_set, val_set))
            with tracking.system_metrics(spec.parent_run_id):
                _have_trials_run(study, storage, ctx, settings, tracking_uri, echo)
            if (finished := studies.finished(study)) < settings.n_trials:
                why = (f"--timeout {settings.timeout:g}s reached" if settings.timeout
                       else "stopped early")
                echo(f"{why}: {finished} of {settings.n_trials} trials finished, summarised "
                     "below; run the same command to go on")
            summary = _finalise(study, storage, exp, ctx, rates,
                                studies.finished(study) - before)
            status = "FINISHED"
            return summary
        except interrupts.Interrupted as stop:
            status = "KILLED"
            studies.said_on_stop(stop, study, settings.n_trials)
            raise
        finally:
            tracking.close_run(spec.parent_run_id, status)


def _set_up(study: optuna.Study, exp: Experiment, settings: SweepSettings, dataset,
            space, rates, experiment_id: str, tracking_uri: str) -> studies.Spec:
    """The parent run (found again on resume) and the spec every worker reads."""
    old = study.user_attrs.get(studies.SPEC_ATTR)
    data_key = studies.check_resumable(study.study_name, old, exp)
    # A set-up killed before it recorded its new parent left that run RUNNING: close it. The
    # token, stored before a parent is made and tagged on it, finds it whatever the timing.
    if token := study.user_attrs.get(PARENT_TOKEN_ATTR):
        tracking.close_running(experiment_id, {PARENT_TOKEN_TAG: token}, "FAILED",
                               keep=old and old["parent_run_id"])
    token = uuid.uuid4().hex
    study.set_user_attr(PARENT_TOKEN_ATTR, token)
    parent_run_id, new_parent = tracking.open_parent(
        experiment_id, f"sweep {study.study_name}",
        {"stage": "sweep", "optuna_study": study.study_name,
         "optuna_storage": redact.mask(settings.storage), "data_key": data_key,
         PARENT_TOKEN_TAG: token, tracking.NOTE: _description(exp, settings, space, rates)},
        run_id=old and old["parent_run_id"],
    )
    try:  # an error before the spec is recorded would leave the new parent RUNNING
        settings_now = _parent_params(exp, settings, space)
        if new_parent:
            tracking.log_to_run(parent_run_id, params=settings_now, metrics=rates)
        else:  # params are write-once; a resume may widen ranges or change sampler or pruner
            tracking.log_to_run(parent_run_id, tags={"last_resume_settings": json.dumps(
                {k: v for k, v in settings_now.items() if k.startswith("sweep.")})})
        data_uri = old["data_uri"] if old and not new_parent else tracking.write_dataset(
            dataset, parent_run_id)
        spec = studies.Spec(
            experiment=configs.to_raw(exp), experiment_name=exp.name,
            digest=studies.config_digest(exp), lr=space[0], epochs=space[1],
            n_trials=studies.recorded_total(study, old, settings.n_trials),
            parent_run_id=parent_run_id, experiment_id=experiment_id,
            tracking_uri=tracking.portable_uri(tracking_uri), data_uri=data_uri,
            data_key=data_key, log_models=settings.log_models, sampler=settings.sampler,
            pruner=settings.pruner, seed=settings.seed,
            batch=settings.batch_size(settings.n_trials - studies.finished(study),
                                      sweep_workers.local_workers(settings)))
        study.set_user_attr(studies.SPEC_ATTR, spec.to_attr())
    except Exception:
        tracking.close_run(parent_run_id, "FAILED")
        raise
    return spec


def _description(exp: Experiment, settings: SweepSettings, space, rates) -> str:
    (lr_low, lr_high), (epochs_low, epochs_high) = space
    objective = ("validation MSE" if exp.val_fraction else
                 "final training loss (no validation split: more epochs only ever lower it)")
    return (f"Optuna sweep ({settings.sampler} sampler, {settings.pruner} pruner) of lr in "
            f"[{lr_low:.3g}, {lr_high:.3g}] (log scale) and epochs in [{epochs_low}, "
            f"{epochs_high}] over `{exp.name}`: {exp.description}\n\nObjective: {objective}. "
            f"Theory: largest stable lr {rates['lr_max_stable']:.4g}, best constant lr "
            f"{rates['lr_best_constant']:.4g}, lowest possible objective "
            f"{rates['optimum_objective']:.6g}. Trials are the child runs; plots/ holds "
            "their curves and Optuna's plots.")


def _have_trials_run(study, storage, ctx, settings: SweepSettings, tracking_uri: str,
                     echo: Echo) -> None:
    missing = settings.n_trials - studies.finished(study)
    if missing <= 0:
        echo(f"sweep {study.study_name}: the study already holds {studies.finished(study)} "
             f"finished trials (--n-trials {settings.n_trials}); nothing to run")
        return
    how = ("in closed form from the rows' statistics" if engine.program_for(
        ctx.exp.train, ctx.split[0].n_rows) == "statistics" else "epoch by epoch")
    echo(f"sweep {study.study_name}: {missing} of {settings.n_trials} trials to run "
         f"(lr in [{ctx.lr[0]:.3g}, {ctx.lr[1]:.3g}], epochs in "
         f"[{ctx.epochs[0]}, {ctx.epochs[1]}]) on {settings.workers or 'remote'} worker(s), "
         f"up to {ctx.batch} at a time, {how}")
    workers = sweep_workers.local_workers(settings)
    if workers < settings.workers:
        echo(f"--workers {settings.workers} is more than this machine's {workers} cores: "
             f"running {workers}, as more would only take turns on them")
    if workers == 0:
        echo("start workers on any machine with:\n  "
             + sweep_workers.worker_command(settings, study))
        sweep_workers.wait_for_total(study, storage, settings.n_trials, settings.timeout)
    elif workers == 1:  # the worker loop, in this process
        worker.loop(study, storage, ctx, settings.n_trials, settings.timeout, echo)
    else:
        sweep_workers.run_local(study, settings, workers, tracking_uri)


def _finalise(study, storage, exp: Experiment, ctx, rates, new_trials: int):
    """Summarise and register once per total reached, whichever coordinator gets here first."""
    with storage.lock(FINALISE_LOCK):
        done = studies.finished(study)
        if study.user_attrs.get(FINALISED_ATTR) == done:
            return sweep_report.already_summarised(study, exp, ctx, rates)
        with lifetime.paused():  # plots and the champion's export import much, make little
            summary = sweep_report.summarise(study, exp, ctx, rates, new_trials)
        study.set_user_attr(FINALISED_ATTR, done)
        return summary


def _parent_params(exp: Experiment, settings: SweepSettings, space) -> dict:
    params = {k: v for k, v in exp.params().items()
              if k not in ("lr", "epochs", "sweep.lr", "sweep.epochs")}
    params.update({
        "sweep.lr_range": list(space[0]), "sweep.epochs_range": list(space[1]),
        "sweep.sampler": settings.sampler, "sweep.pruner": settings.pruner,
        "sweep.seed": settings.seed, "sweep.storage": redact.mask(settings.storage),
    })
    return params
