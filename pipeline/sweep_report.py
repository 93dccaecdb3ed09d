"""After a sweep: the trials table and Optuna's plots on the parent run, the best model registered.

The best trial's model is rebuilt by running its settings again through the engine the trial
ran (training is seeded, so the result is the same model) and logged into that trial's run,
unless `--log-models all` already logged it there. The registry's `champion` alias moves to it
only if it beats the holder.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import optuna
from optuna.trial import TrialState

from pipeline import config as configs
from pipeline import data, engine, interrupts, registry, theory, tracking
from pipeline import study as studies


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
    log_study(study, ctx.parent_run_id, rates, ctx.plotted, _curves_floor(ctx.split, exp, rates),
              ctx.curves)
    interrupts.check()  # Ctrl-C while plotting stops before anything is registered
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

def _curves_floor(split, exp: configs.Experiment, rates: dict[str, float]) -> float:
    """The least-squares loss on the rows the plotted curves are measured on, in their
    reduction: mostly one that theory already computed (a least-squares fit on a million rows
    takes a third of a second)."""
    val_set = split[1]
    if val_set is None:
        return rates["optimum_loss"]
    if exp.train.loss == "mean":
        return rates["optimum_objective"]  # the validation MSE's floor
    return theory.optimum_loss(val_set, exp.train.has_bias, exp.train.loss)


# Optuna's own plots, titled; the trials' curves and lr plots are pipeline.plots' (they show
# pruned and diverged trials and theory's rates, which Optuna's leave out).
OPTUNA_PLOTS = {
    "optimization_history": lambda study: optuna.visualization.matplotlib
    .plot_optimization_history(study),
    # fANOVA, Optuna's default evaluator, with 16 trees instead of 64: a quarter of the time.
    "param_importances": lambda study: optuna.visualization.matplotlib
    .plot_param_importances(study, evaluator=optuna.importance.FanovaImportanceEvaluator(
        n_trees=16, seed=0)),
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
    run_id = best.user_attrs["mlflow_run_id"]
    version = tracking.run_tags(run_id).get("registered_version")
    summary = dataclasses.replace(summary, best_value=best.value, best_params=best.params)
    if version is None or not registry.is_version_of_run(exp.name, version, run_id):
        # Deleted from the registry since: registered again, and the champion decided again.
        return dataclasses.replace(summary, **register_best(best, exp, ctx))
    holder = registry.champion(exp.name)
    return dataclasses.replace(
        summary, model_name=exp.name, version=version, decision="already summarised",
        champion_version=holder[0] if holder else None)


@np.errstate(over="ignore", invalid="ignore")  # axes over an lr range up to 1e308 overflow
def log_study(study: optuna.Study, parent_run_id: str, rates: dict[str, float],
              metric: str, optimum: float | None,
              known: Mapping[str, Sequence[float]] | None = None) -> None:
    """The trials table as CSV and the sweep's plots as images, on the parent run: every
    trial's ``metric`` curve together (read from the store, but those in ``known``, by run
    id), lr against the objective and epochs, and Optuna's history and importances."""
    import warnings

    from pipeline import plots

    columns = ("number", "value", "datetime_start", "datetime_complete", "duration", "params",
               "user_attrs", "state")  # not system_attrs: Optuna's own bookkeeping
    tracking.log_text(parent_run_id, study.trials_dataframe(attrs=columns).to_csv(index=False),
                      "trials.csv")
    ended = study.get_trials(deepcopy=False, states=studies.FINISHED)
    if len(ended) < 2:
        return  # the plots need at least two finished trials to say anything
    complete = [t for t in ended if t.state == TrialState.COMPLETE]
    best = study.best_trial.number if complete else None
    title = f"study {study.study_name}"
    diverged = {t.number for t in ended if t.user_attrs.get("diverged")}
    curves = tracking.metric_histories(
        {t.number: t.user_attrs["mlflow_run_id"] for t in ended
         if "mlflow_run_id" in t.user_attrs}, metric, known)
    tracking.log_figure(parent_run_id, plots.trials_overlay(
        curves, diverged, best, f"{title}: {metric} of {len(curves)} trials", metric, optimum),
        "plots/trials_loss_curves.png")
    tracking.log_figure(parent_run_id, plots.trials_scatter(
        [{"number": t.number, "lr": t.params["lr"], "epochs": t.params["epochs"],
          "value": float("nan") if t.value is None else t.value, "state": t.state.name,
          "diverged": t.number in diverged} for t in ended],
        rates, f"{title}: lr, epochs and the objective"), "plots/trials_lr_epochs.png")
    if len(complete) < 2:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        for name, draw in OPTUNA_PLOTS.items():
            interrupts.check()
            try:
                axes = draw(study)
            except (ValueError, RuntimeError):
                continue  # e.g. importances when every trial has the same value
            figure = _figure_of(axes)
            first = np.asarray(axes, dtype=object).flat[0]
            # Optuna titles some plots on the left, some in the centre: one title, ours.
            own = next((first.get_title(loc) for loc in ("center", "left") if first.get_title(loc)),
                       name.replace("_", " "))
            first.set_title("", loc="left")
            first.set_title(f"{title}: {own}")
            if name == "optimization_history":
                plots._log_y_if_wide(first, [t.value for t in complete])
            figure.set_size_inches(8, 6)
            figure.tight_layout()
            tracking.log_figure(parent_run_id, figure, f"plots/{name}.png")


def _figure_of(axes):
    return np.asarray(axes, dtype=object).flat[0].figure


def register_best(best: optuna.trial.FrozenTrial, exp: configs.Experiment, ctx) -> dict:
    """Log the best trial's model (if not yet), register it, and decide on the champion."""
    run_id = best.user_attrs["mlflow_run_id"]
    run_tags = tracking.run_tags(run_id)
    name = exp.name
    version = run_tags.get("registered_version")
    if version is not None and not registry.is_version_of_run(name, version, run_id):
        version = None  # deleted from the registry since: registered again below
    version = version or registry.version_of_run(name, run_id)
    if version is None:
        model_uri = run_tags.get("model_uri") or _log_best_model(best, exp, ctx, run_id)
        version = registry.register(
            name, model_uri, best.value,
            tags={"experiment": exp.name, "study": ctx.study_name, "trial": str(best.number),
                  "lr": repr(best.params["lr"]), "epochs": str(best.params["epochs"]),
                  "model_kind": exp.train.model,
                  "data_key": data.content_key(exp.data, exp.seed)[:16],
                  registry.BASIS_TAG: objective_basis(exp),
                  "source_run_id": run_id},
            description=(
                f"Best of Optuna study '{ctx.study_name}' (trial {best.number}): "
                f"{exp.train.model} model, lr={best.params['lr']:.4g}, "
                f"epochs={best.params['epochs']}, objective {best.value:.6g} "
                f"({'validation MSE' if exp.val_fraction else 'final training loss'})."
            ),
        )
    if run_tags.get("registered_version") != version:
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


def objective_basis(exp: configs.Experiment) -> str:
    """What a sweep's objective measures, in words: champions are compared only when equal."""
    rows = f"rows of data {data.content_key(exp.data, exp.seed)[:12]}"
    if exp.val_fraction:
        return f"validation MSE on {exp.val_fraction:g} of the {rows} (split seed {exp.seed})"
    return f"final training loss ({exp.train.loss}) on the {rows}"


def _log_best_model(best, exp: configs.Experiment, ctx, run_id: str) -> str:
    best_exp = configs.with_train(exp, lr=best.params["lr"], epochs=best.params["epochs"])
    train_set, val_set = ctx.split
    # The program the trial ran (pipeline.engine), so the model is the one its curve describes.
    [result] = engine.train_many(best_exp.train, train_set, val_set, [best.params["lr"]],
                                 [best.params["epochs"]], kept=ctx.kept)
    model_uri = tracking.log_model(run_id, result.model.to_module(), train_set,
                                   best_exp.train.dtype)
    tracking.set_tags(run_id, {"model_uri": model_uri})
    return model_uri
