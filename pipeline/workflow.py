"""The stages wired to tracking: what ``pipeline generate | train | evaluate | run`` do.

Each function validates what it can before it opens a run (so bad input leaves no run behind),
calls the pure stage (``data``, ``train``, ``evaluate``) and records the outcome in MLflow.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

from pipeline import data, engine, evaluate, inputs, plots, serving, theory, tracking
from pipeline import train as training
from pipeline.config import Experiment, run_name
from pipeline.dataset import Dataset
from pipeline.errors import DivergedError

Echo = Callable[[str], None]


@dataclass(frozen=True)
class DataRef:
    uri: str
    run_id: str  # the run holding the data: a new one, or the earlier one reused
    built: Dataset | None = None  # the rows, where this process made them

    @functools.cached_property
    def dataset(self) -> Dataset:
        """The rows: those built here, or those of the run reused, read when first asked for
        (`pipeline generate` reusing a run only prints its URI)."""
        return self.built if self.built is not None else tracking.read_dataset(self.uri)


@dataclass(frozen=True)
class Trained:
    run_id: str
    model_uri: str


@dataclass(frozen=True)
class PreparedData:
    key: str
    dataset: Dataset | None  # None when a cached run holds the same content
    cached_run_id: str | None


def prepare_data(exp: Experiment, experiment: str, built: Dataset | None = None) -> PreparedData:
    """Find cached data with the same content key, else take ``built`` or build it; opens no
    run.

    Bad data (a missing or malformed CSV) fails here, before any run exists.
    """
    key = data.content_key(exp.data, exp.seed)
    if cached := tracking.find_cached_dataset(experiment, key):
        return PreparedData(key, None, cached)
    return PreparedData(key, built or data.build(exp.data, exp.seed), None)


def generate(exp: Experiment, experiment: str, parent_run_id: str | None = None,
             prepared: PreparedData | None = None, echo: Echo = print) -> DataRef:
    """Build the dataset and log it, unless a finished run already holds the same content."""
    prepared = prepared or prepare_data(exp, experiment)
    if prepared.cached_run_id:
        uri = f"runs:/{prepared.cached_run_id}/dataset"
        echo(f"generate: same content as run {prepared.cached_run_id}, reused ({uri})")
        if parent_run_id is None:
            tracking.record_launched(f"Same data as run {prepared.cached_run_id}, reused: "
                                     f"{uri}.", {"stage": "generate", "data_uri": uri})
        return DataRef(uri, prepared.cached_run_id)
    dataset = prepared.dataset
    shape = f"{dataset.n_rows}×{dataset.features.shape[1]}→{dataset.targets.shape[1]}"
    tags = {"stage": "generate", "data_key": prepared.key}
    with tracking.run(experiment, f"generate {exp.data.source} {shape}", parent_run_id, tags,
                      f"The dataset of `{exp.name}` ({exp.data.source}): {dataset.n_rows} rows, "
                      f"features {', '.join(dataset.feature_names)} → targets "
                      f"{', '.join(dataset.target_names)}.") as run_id:
        tracking.log_params(
            run_id, {k: v for k, v in exp.params().items() if k.startswith("data.") or k == "seed"}
        )
        uri = tracking.write_dataset(dataset, run_id)
        tracking.log_dataset(run_id, dataset, exp.name, uri, context="generated")
    echo(f"generate: {shape} (rows×features→targets) written to {uri}")
    return DataRef(uri, run_id, dataset)


def train(exp: Experiment, dataset: Dataset, experiment: str,
          parent_run_id: str | None = None, data_uri: str | None = None,
          echo: Echo = print) -> Trained:
    """Fit the model, log its curves, plots and the model itself."""
    config = exp.train
    device = training.resolve_device(config.device)
    raw = data.split(dataset, exp.val_fraction, exp.seed)
    train_set, val_set = data.scaled(*raw, config.scale)
    tags = {"stage": "train", "device": str(device), **({"data_uri": data_uri} if data_uri else {})}
    with tracking.run(experiment, run_name(config), parent_run_id, tags,
                      describe_training(exp)) as run_id:
        tracking.log_params(run_id, exp.params())
        # The rows as the source holds them (the digest is theirs), not as scaled for training.
        tracking.log_dataset(run_id, raw[0], exp.name, data_uri, context="training")
        if raw[1] is not None:
            tracking.log_dataset(run_id, raw[1], exp.name, data_uri, context="validation")
        with tracking.system_metrics(run_id):
            result = (_from_statistics if config.engine == "statistics" else training.train)(
                config, train_set, val_set)
        curves = {"train_loss": result.train_loss}
        if result.val_loss:
            curves["val_loss"] = result.val_loss
        tracking.log_curves(run_id, curves)
        tracking.log_figure(
            run_id, plots.loss_curve(result.train_loss, result.val_loss, run_name(config),
                             theory.optimum_loss(train_set, config.has_bias, config.loss)),
            "plots/loss_curve.png",
        )
        if _single_weight(result) and dataset.features.shape[1] == 1:
            tracking.log_figure(
                run_id, plots.loss_surface(train_set.features, train_set.targets,
                                           result.parameter_path, config.loss, "loss over w",
                                           config.activation),
                "plots/loss_surface.png",
            )
        if result.diverged:
            epoch = result.diverged_at
            loss = result.train_loss[-1]
            tracking.set_tags(run_id, {"diverged": "true", "diverged_at_epoch": str(epoch)})
            raise DivergedError(_divergence(config, train_set, epoch, loss, run_id))
        tracking.set_tags(run_id, {"diverged": "false"})
        model_uri = tracking.log_model(run_id, result.model.to_module(), train_set, config.dtype)
    echo(
        f"train: {run_name(config)} on {device}: train_loss {result.train_loss[0]:.6g} → "
        f"{result.train_loss[-1]:.6g}; model {model_uri}"
    )
    return Trained(run_id, model_uri)


def _divergence(config, train_set: Dataset, epoch: int, loss: float, run_id: str) -> str:
    """Why training diverged and what to try: a smaller lr, or data that fit the dtype."""
    said = f"training diverged at epoch {epoch}: train_loss became {loss:.6g}"
    if epoch == 0 and not math.isfinite(loss):  # no lr helps: the first loss overflowed
        largest = max(abs(train_set.features).max(), abs(train_set.targets).max())
        starts = [f"{key}={value:g}" for key, value in (("weight_init", config.weight_init),
                                                        ("bias_init", config.bias_init))
                  if isinstance(value, float) and abs(value) > 1]
        if starts:
            return (f"{said} before the first step: the starting parameters "
                    f"({', '.join(starts)}) on the data's values (up to {largest:.3g}) overflow "
                    f"{config.dtype} arithmetic; start smaller, or set dtype=float64 "
                    f"(run {run_id} marked FAILED)")
        features = abs(train_set.features).max() >= abs(train_set.targets).max()
        scaling = "scale=standard or " if features and config.scale == "none" else ""
        return (f"{said} before the first step: the data's values (up to {largest:.3g}) "
                f"overflow {config.dtype} arithmetic; rescale them, or set {scaling}"
                f"dtype=float64 (run {run_id} marked FAILED)")
    edge = theory.learning_rates(train_set, config.has_bias, config.loss)["lr_max_stable"]
    guide = "" if theory.exact_for(config, train_set.n_rows) else (
        ", exact for full batches, a guide here")
    return (f"{said} with lr={config.lr:g}; the largest stable lr for this data is {edge:.4g} "
            f"(theory{guide}): try --set lr={edge / 2:.2g} (run {run_id} marked FAILED)")


def describe_training(exp: Experiment) -> str:
    """One sentence on how a run trains, for the run's description in the UI."""
    config = exp.train
    batches = ("full batch" if config.batch_size is None else
               f"batches of {config.batch_size}{', shuffled' if config.shuffle else ''}")
    held_out = f", {exp.val_fraction:.0%} of rows held out" if exp.val_fraction else ""
    kind = ("torch.nn, torch.optim" if config.model == "builtin"
            else "raw tensors, hand-written descent")
    closed = ", descent in closed form from the data's statistics" if (
        config.engine == "statistics") else ""
    return (f"{config.model} model ({kind}), lr={config.lr:g}, {config.epochs} epochs, "
            f"{batches}, {config.loss} squared error{held_out}{closed}.")


def _from_statistics(config, train_set: Dataset, val_set: Dataset | None):
    """``engine: statistics``: the closed form of the loop's descent (:mod:`pipeline.engine`),
    each epoch costing the same whatever the number of rows."""
    [result] = engine.train_many(config, train_set, val_set, [config.lr], [config.epochs],
                                 paths=True)
    return result


def _single_weight(result: training.TrainResult) -> bool:
    return bool(result.parameter_path) and len(result.parameter_path[0]) == 1


def evaluate_model(exp: Experiment, dataset: Dataset, model_uri: str, experiment: str,
                   parent_run_id: str | None = None, echo: Echo = print,
                   model: serving.LoadedModel | None = None,
                   data_uri: str | None = None) -> dict[str, float]:
    """Score a logged model on the evaluation split (validation rows, else the training rows),
    fed the data's columns by the names the model takes."""
    model = model or serving.load(model_uri)
    dataset = inputs.model_columns(exp, dataset, model, model_uri)
    train_set, val_set = data.split(dataset, exp.val_fraction, exp.seed)
    eval_set, split_name = (val_set, "validation") if val_set is not None else (train_set, "train")
    tags = {"stage": "evaluate", "model_uri": model_uri, "eval_split": split_name,
            **({"data_uri": data_uri} if data_uri else {})}
    # Under `pipeline run` the model is the one trained with this config; alone, it may come
    # from anywhere, so the run records only what chose the rows, not training settings.
    params = exp.params() if parent_run_id else {
        key: value for key, value in exp.params().items()
        if key.startswith("data.") or key in ("seed", "val_fraction")}
    name = f"evaluate {run_name(exp.train)}" if parent_run_id else f"evaluate {model_uri}"
    with tracking.run(experiment, name, parent_run_id, tags,
                      f"Scores model {model_uri} on the {split_name} rows of `{exp.name}`: "
                      "mse, rmse, mae, r2, and the gap to the least-squares optimum.") as run_id:
        tracking.log_params(run_id, params)
        tracking.log_dataset(run_id, eval_set, exp.name, data_uri, context="evaluation")
        predictions = model.predict(eval_set.features)
        metrics = evaluate.evaluate(predictions, eval_set, fit_bias=exp.train.has_bias)
        weight, bias = model.parameters()
        metrics.update(evaluate.parameter_errors(weight, bias, eval_set))
        tracking.log_metrics(run_id, metrics)
        tracking.log_figure(
            run_id, plots.fit(eval_set.features, eval_set.targets, predictions,
                      eval_set.feature_names, eval_set.target_names,
                      f"{exp.name}: {split_name} rows"),
            "plots/fit.png",
        )
    shown = ", ".join(f"{k}={metrics[k]:.6g}" for k in ("mse", "rmse", "mae", "r2",
                                                         "optimality_gap"))
    echo(f"evaluate: on {split_name} rows: {shown}")
    return metrics


def run_all(exp: Experiment, experiment: str, built: Dataset | None = None,
            echo: Echo = print) -> dict[str, float]:
    """generate → train → evaluate as child runs of one parent run (``built``: the dataset
    :func:`data.check` built, if it did)."""
    training.resolve_device(exp.train.device)  # fail before any run opens
    prepared = prepare_data(exp, experiment, built)
    with tracking.run(experiment, f"{exp.name}: {run_name(exp.train)}",
                      tags={"stage": "pipeline"},
                      description=f"{exp.description}\n\ngenerate → train → evaluate: "
                                  f"{describe_training(exp)}") as parent_id:
        tracking.log_params(parent_id, exp.params())
        data_ref = generate(exp, experiment, parent_id, prepared, echo)
        tracking.set_tags(parent_id, {"data_run_id": data_ref.run_id, "data_uri": data_ref.uri})
        try:
            trained = train(exp, data_ref.dataset, experiment, parent_id, data_ref.uri, echo)
        except DivergedError:
            tracking.set_tags(parent_id, {"diverged": "true"})
            raise
        tracking.set_tags(parent_id, {"train_run_id": trained.run_id,
                                      "model_uri": trained.model_uri})
        metrics = evaluate_model(exp, data_ref.dataset, trained.model_uri, experiment,
                                 parent_id, echo, data_uri=data_ref.uri)
        tracking.log_metrics(parent_id, metrics)
    return metrics
