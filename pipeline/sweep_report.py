"""After a sweep: the trials table and Optuna's plots on the parent run, the best model registered.

The best trial's model is rebuilt by training its settings again (training is seeded, so the
result is the same model) and logged into that trial's run, unless `--log-models all` already
logged it there. The registry's `champion` alias moves to it only if it beats the holder.
"""

from __future__ import annotations

import math

import optuna
from optuna.trial import TrialState

from pipeline import config as configs
from pipeline import data, registry, tracking
from pipeline import train as training

PLOTS = {
    "optimization_history": lambda study: optuna.visualization.matplotlib
    .plot_optimization_history(study),
    "contour_lr_epochs": lambda study: optuna.visualization.matplotlib
    .plot_contour(study, params=["lr", "epochs"]),
    "param_importances": lambda study: optuna.visualization.matplotlib
    .plot_param_importances(study),
    "slice": lambda study: optuna.visualization.matplotlib.plot_slice(study),
}


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
