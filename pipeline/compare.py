"""Compare the runs of an experiment side by side: one row per run, sorted by a metric.

Pure pandas on the DataFrame that ``mlflow.search_runs`` returns.
"""

from __future__ import annotations

import pandas as pd

from pipeline.errors import UserError

HIGHER_IS_BETTER = {"r2"}
METRICS = ["mse", "rmse", "mae", "r2", "optimality_gap", "objective", "train_loss", "val_loss"]
PARAMS = ["model", "lr", "epochs", "batch_size"]


DEFAULT_METRICS = ("mse", "objective", "train_loss")  # evaluate runs, sweep trials, train runs


def default_metric(runs: pd.DataFrame) -> str:
    """The first of mse, objective, train_loss that some run has."""
    for metric in DEFAULT_METRICS:
        column = f"metrics.{metric}"
        if column in runs.columns and runs[column].notna().any():
            return metric
    return DEFAULT_METRICS[0]


def runs_table(runs: pd.DataFrame, metric: str | None = None,
               top: int | None = None) -> pd.DataFrame:
    """One row per run, best ``metric`` first (runs without it last), with run name, stage,
    model, lr, epochs and final metrics."""
    metric = metric or default_metric(runs)
    column = f"metrics.{metric}"
    if runs.empty or column not in runs.columns or runs[column].isna().all():
        known = sorted(c.removeprefix("metrics.") for c in runs.columns
                       if c.startswith("metrics.") and runs[c].notna().any())
        listing = ", ".join(known) or "none"
        raise UserError(f"no run has metric {metric!r} (metrics here: {listing})")
    scored = runs
    table = pd.DataFrame({
        "run_name": scored.get("tags.mlflow.runName"),
        "stage": scored.get("tags.stage"),
        "status": scored["status"],
    })
    for name in PARAMS:
        if f"params.{name}" in scored.columns:
            values = scored[f"params.{name}"]
            numeric = pd.to_numeric(values, errors="coerce")
            table[name] = values if numeric.isna().all() else numeric
    for name in METRICS:
        if f"metrics.{name}" in scored.columns and scored[f"metrics.{name}"].notna().any():
            table[name] = scored[f"metrics.{name}"]
    table["run_id"] = scored["run_id"]
    if metric not in table.columns:
        table[metric] = scored[column]
    table = table.sort_values(metric, ascending=metric not in HIGHER_IS_BETTER,
                              na_position="last", ignore_index=True, kind="stable")
    return table.head(top) if top else table


def render(table: pd.DataFrame, fmt: str) -> str:
    if fmt == "csv":
        return table.to_csv(index=False)
    if fmt == "markdown":
        return table.to_markdown(index=False, floatfmt=".6g")
    return table.to_string(index=False, float_format=lambda v: f"{v:.6g}")
