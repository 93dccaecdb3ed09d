"""Compare the runs of an experiment side by side: one row per run, best first.

Pure pandas on the DataFrame that ``mlflow.search_runs`` returns.
"""

from __future__ import annotations

import pandas as pd

from pipeline.errors import UserError

HIGHER_IS_BETTER = {"r2"}
METRICS = ["mse", "rmse", "mae", "r2", "optimality_gap", "objective", "train_loss", "val_loss"]
PARAMS = ["model", "lr", "epochs", "batch_size"]


# Each kind of run scored by its own measure, all lower-is-better errors: a sweep trial (and the
# sweep's parent) by its objective, an evaluation (and the pipeline around it) by its mse, a
# training run by its last validation loss, else its last training loss.
SCORES = ("objective", "mse", "val_loss", "train_loss")
STAGES = ("generate", "train", "evaluate", "pipeline", "sweep", "trial")


def score(runs: pd.DataFrame) -> pd.Series:
    """Each run's own score: the first of :data:`SCORES` it has."""
    result = pd.Series(float("nan"), index=runs.index, dtype=float)
    for metric in SCORES:
        column = f"metrics.{metric}"
        if column in runs.columns:
            result = result.fillna(pd.to_numeric(runs[column], errors="coerce"))
    return result


def runs_table(runs: pd.DataFrame, metric: str | None = None, top: int | None = None,
               stage: str | None = None) -> pd.DataFrame:
    """One row per run, best first, with run name, stage, model, lr, epochs and final metrics.

    Without ``metric``, each run is ranked by its own score (:data:`SCORES`), so the best
    trial, the best evaluation and the best training run all sort among each other; with it,
    by that metric (``r2`` highest first, others lowest), runs without it last.
    """
    if stage is not None:
        present = sorted(set(runs.get("tags.stage", pd.Series(dtype=str)).dropna()))
        runs = runs[runs.get("tags.stage") == stage] if "tags.stage" in runs else runs.iloc[:0]
        if runs.empty:
            raise UserError(f"no {stage} runs here (stages present: "
                            f"{', '.join(present) or 'none'})")
    if metric is None:
        order = score(runs)
        # Runs of one stage are listed even unscored (generate runs: oldest first).
        if runs.empty or (order.isna().all() and stage is None):
            raise UserError("no run has a score yet (objective, mse, val_loss or train_loss)")
    else:
        column = f"metrics.{metric}"
        if runs.empty or column not in runs.columns or runs[column].isna().all():
            known = sorted(c.removeprefix("metrics.") for c in runs.columns
                           if c.startswith("metrics.") and runs[c].notna().any())
            listing = ", ".join(known) or "none"
            raise UserError(f"no run has metric {metric!r} (metrics here: {listing})")
        order = runs[column]
    table = pd.DataFrame({
        "run_name": runs.get("tags.mlflow.runName"),
        "stage": runs.get("tags.stage"),
        "status": runs["status"],
    })
    for name in PARAMS:
        if f"params.{name}" in runs.columns:
            values = runs[f"params.{name}"]
            numeric = pd.to_numeric(values, errors="coerce")
            if numeric.dropna().mod(1).eq(0).all():  # epochs stay 1000 where a run has none
                numeric = numeric.astype("Int64")
            table[name] = values if numeric.isna().all() else numeric
    if metric is None:
        table["score"] = order
    for name in METRICS:
        if f"metrics.{name}" in runs.columns and runs[f"metrics.{name}"].notna().any():
            table[name] = runs[f"metrics.{name}"]
    table["run_id"] = runs["run_id"]
    key = "score" if metric is None else metric
    if key not in table.columns:
        table[key] = order
    # Ties go to the run that got there first: the trial Optuna calls best, and its sweep.
    table["started"] = runs["start_time"] if "start_time" in runs else pd.Series(
        range(len(runs)), index=runs.index)
    table = table.sort_values([key, "started"], ascending=[key not in HIGHER_IS_BETTER, True],
                              na_position="last", ignore_index=True, kind="stable")
    table = table.drop(columns="started")
    return table.head(top) if top else table


def render(table: pd.DataFrame, fmt: str) -> str:
    if fmt == "csv":
        return table.to_csv(index=False)
    if fmt == "markdown":
        return table.to_markdown(index=False, floatfmt=".6g")
    return table.to_string(index=False, float_format=lambda v: f"{v:.6g}")
