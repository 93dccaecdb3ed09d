"""After a sweep: the trials table and Optuna's plots on the parent run, the best model registered.

The best trial's model is rebuilt by training its settings again (training is seeded, so the
result is the same model) and logged into that trial's run, unless `--log-models all` already
logged it there. The registry's `champion` alias moves to it only if it beats the holder.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from pipeline import config as configs
from pipeline import data, registry, tracking
from pipeline import study as studies
from pipeline import train as training


@dataclass(frozen=True)
class Summary:
    study_name: str
    experiment_id: str
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


def summarise(study: optuna.Study, exp: configs.Experiment, ctx, rates: dict[str, float],
              new_trials: int) -> Summary:
    """Trials table, plots, best params on the parent run; the best model registered."""
    states = studies.counts(study)
    summary = Summary(study.study_name, ctx.experiment_id, ctx.parent_run_id,
                      sum(states.values()), new_trials, states, None, {}, rates)
    log_study(study, ctx.parent_run_id)
    if not states.get(TrialState.COMPLETE.name):
        return summary
    best = study.best_trial
    summary = dataclasses.replace(summary, best_value=best.value, best_params=best.params)
    tracking.log_to_run(
        ctx.parent_run_id,
        # objective too, so that the parent sorts with its trials in the UI and in compare.
        metrics={"objective": best.value, "best_value": best.value, "best_lr": best.params["lr"],
                 "best_epochs": best.params["epochs"],
                 "best_lr_over_lr_best_constant": best.params["lr"] / rates["lr_best_constant"]},
        tags={"best_trial": str(best.number),
              "best_run_id": best.user_attrs.get("mlflow_run_id", ""),
              "best_params": json.dumps(best.params)},
    )
    return dataclasses.replace(summary, **register_best(best, exp, ctx))

PLOTS = {
    "optimization_history": lambda study: optuna.visualization.matplotlib
    .plot_optimization_history(study),
    "contour_lr_epochs": lambda study: optuna.visualization.matplotlib
    .plot_contour(study, params=["lr", "epochs"]),
    "param_importances": lambda study: optuna.visualization.matplotlib
    .plot_param_importances(study),
    "slice": lambda study: optuna.visualization.matplotlib.plot_slice(study),
}


def already_summarised(study: optuna.Study, exp: configs.Experiment, ctx,
                       rates: dict[str, float]) -> Summary:
    """What :func:`summarise` reported when the study last reached this total."""
    states = studies.counts(study)
    summary = Summary(study.study_name, ctx.experiment_id, ctx.parent_run_id,
                      sum(states.values()), 0, states, None, {}, rates)
    if not states.get(TrialState.COMPLETE.name):
        return summary
    best = study.best_trial
    tags = tracking.run_tags(best.user_attrs["mlflow_run_id"])
    holder = registry.champion(exp.name)
    return dataclasses.replace(
        summary, best_value=best.value, best_params=best.params, model_name=exp.name,
        version=tags.get("registered_version"), decision="already summarised",
        champion_version=holder[0] if holder else None)


def log_study(study: optuna.Study, parent_run_id: str) -> None:
    """The trials table as CSV and Optuna's plots as images, on the parent run."""
    import warnings

    tracking.log_text(parent_run_id, study.trials_dataframe().to_csv(index=False), "trials.csv")
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return  # the plots need at least two finished trials to say anything
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        for name, draw in PLOTS.items():
            try:
                axes = draw(study)
            except (ValueError, RuntimeError):
                continue  # e.g. importances when every trial has the same value
            figure = _figure_of(axes)
            figure.set_size_inches(8, 6)
            figure.tight_layout()
            tracking.log_figure_to(parent_run_id, figure, f"plots/{name}.png")


def _figure_of(axes):
    import numpy as np

    first = np.asarray(axes, dtype=object).flat[0]
    return first.figure


def register_best(best: optuna.trial.FrozenTrial, exp: configs.Experiment, ctx) -> dict:
    """Log the best trial's model (if not yet), register it, and decide on the champion."""
    run_id = best.user_attrs["mlflow_run_id"]
    run_tags = tracking.run_tags(run_id)
    name = exp.name
    version = run_tags.get("registered_version")
    if version is None:
        model_uri = run_tags.get("model_uri") or _log_best_model(best, exp, ctx, run_id)
        version = registry.register(
            name, model_uri, best.value,
            tags={"experiment": exp.name, "study": ctx.study_name, "trial": str(best.number),
                  "lr": repr(best.params["lr"]), "epochs": str(best.params["epochs"]),
                  "model_kind": exp.train.model,
                  "data_key": data.content_key(exp.data, exp.seed)[:16],
                  "source_run_id": run_id},
            description=(
                f"Best of Optuna study '{ctx.study_name}' (trial {best.number}): "
                f"{exp.train.model} model, lr={best.params['lr']:.4g}, "
                f"epochs={best.params['epochs']}, objective {best.value:.6g} "
                f"({'validation MSE' if exp.val_fraction else 'final training loss'})."
            ),
        )
        tracking.log_to_run(run_id, tags={"registered_model": name,
                                          "registered_version": version})
    decision = registry.promote_if_better(name, version, best.value)
    metrics = {}
    if decision.previous_objective is not None and math.isfinite(decision.previous_objective):
        metrics["champion_previous_objective"] = decision.previous_objective
    tracking.log_to_run(
        ctx.parent_run_id,
        metrics=metrics,
        tags={"registered_model": name, "registered_version": version,
              "champion_version": decision.champion_version,
              "champion_decision": decision.reason},
    )
    return {"model_name": name, "version": version, "decision": decision.reason,
            "champion_version": decision.champion_version}


def _log_best_model(best, exp: configs.Experiment, ctx, run_id: str) -> str:
    best_exp = configs.with_train(exp, lr=best.params["lr"], epochs=best.params["epochs"])
    train_set, val_set = data.split(ctx.dataset, best_exp.val_fraction, best_exp.seed)
    result = training.train(best_exp.train, train_set, val_set)
    with tracking.resumed(run_id):
        model_uri = tracking.log_model(result.model.to_module(), train_set, best_exp.train.dtype)
        tracking.set_tags({"model_uri": model_uri})
    return model_uri
