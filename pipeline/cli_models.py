"""`pipeline predict`, `models`, `promote` and `compare`: using what the runs produced."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import click

from pipeline.cli import (
    cli,
    connect_store,
    predict_device_option,
    tracking_option,
)
from pipeline.errors import UserError


@cli.command()
@click.option("--model", "model_uri", type=str, required=True,
              help="models:/NAME@ALIAS, models:/NAME/VERSION, models:/NAME/latest, "
                   "models:/m-<id>, runs:/<id>/model, or a model folder.")
@click.option("--input", "input_path", type=click.Path(dir_okay=False, path_type=str),
              required=True,
              help="CSV or Parquet file with the model's feature columns, by name.")
@click.option("--output", "output_path", type=click.Path(dir_okay=False, path_type=str),
              default=None, help="Where to write the predictions (CSV). Default: stdout.")
@predict_device_option
@click.option("--allow-pickle", is_flag=True,
              help="Allow loading a model stored as a pickle (only for sources you trust).")
@tracking_option
def predict(model_uri: str, input_path: str, output_path: str | None, device: str | None,
            allow_pickle: bool, tracking_uri: str) -> None:
    """Predict the targets of every row of a CSV with a logged or registered model.

    Writes one column per target, named as in training.
    """
    import torch

    from pipeline import model_uris, serving
    from pipeline.tables import check_readable
    from pipeline.train import resolve_device

    model_uris.check_uri(model_uri)
    check_readable(Path(input_path).absolute())
    if output_path:
        _check_output(Path(output_path), Path(input_path))
    target_device = resolve_device(device or "auto")
    if model_uris.in_store(model_uri):  # a model folder needs no store
        connect_store(tracking_uri, existing=True)
    model = serving.load(model_uri, target_device, allow_pickle)
    features = serving.read_features(input_path, model)
    frame = serving.prediction_frame(model.predict(features), model.target_names)
    # The digits that give back the model's own float32 (or float64) values, file or screen.
    digits = "%.9g" if model.output_dtype == torch.float32 else "%.17g"
    if output_path:
        try:
            _write(frame, Path(output_path), digits)
        except OSError as err:
            raise UserError(f"--output {output_path}: cannot write it "
                            f"({err.strerror or type(err).__name__})") from None
        click.echo(f"{len(frame)} predictions of {', '.join(frame.columns)} written to "
                   f"{output_path}", err=True)
    else:
        click.echo(frame.to_csv(index=False, float_format=digits), nl=False)


def _write(frame, output: Path, digits: str) -> None:
    """A file is written beside itself, then moved in place: a stop or a full disk leaves the
    file that was there, never half of the new one. Anything else (/dev/null, /dev/stdout, a
    FIFO) is written to as it is, appending: `--output /dev/stdout >> log` keeps the log."""
    target = output.resolve()
    if str(output.absolute()).startswith(("/dev/", "/proc/")) or (
            target.exists() and not target.is_file()):
        frame.to_csv(output, index=False, float_format=digits, mode="a")
        return
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        frame.to_csv(partial, index=False, float_format=digits)
        if target.exists():
            shutil.copymode(target, partial)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def _check_output(output: Path, input_path: Path) -> None:
    """Predictions never overwrite their own input, a database (the tracking store) or an
    Optuna journal (a study)."""
    if not output.resolve().parent.is_dir():
        raise UserError(f"--output {output}: the folder {output.resolve().parent} does not exist")
    if not output.exists():
        return
    if input_path.exists() and output.samefile(input_path):
        raise UserError(f"--output {output} is the input file; write the predictions elsewhere")
    if not output.is_file():
        return  # /dev/null, a FIFO: nothing there to keep, and nothing to read
    from pipeline.tracking import SQLITE_HEADER

    try:
        with output.open("rb") as existing:
            start = existing.read(64)
    except OSError:
        return  # not readable: writing it will say so
    if start.startswith(SQLITE_HEADER):
        raise UserError(f"--output {output} is a SQLite database (a tracking store?); "
                        "refusing to overwrite it")
    if start.startswith(b'{"op_code"'):  # each line of a journal is one operation
        raise UserError(f"--output {output} is an Optuna journal (a study's trials); "
                        "refusing to overwrite it")


@cli.command()
@click.argument("name", required=False)
@click.option("--check", "model_uri", type=str, default=None, metavar="MODEL_URI",
              help="Only check that MODEL_URI names a model that loads safely (exit status "
                   "0), e.g. models:/NAME@champion; `make serve` asks this first.")
@tracking_option
def models(name: str | None, model_uri: str | None, tracking_uri: str) -> None:
    """List registered models: versions, aliases, objective, lr, epochs, source run."""
    from pipeline import model_uris, registry, serving

    if model_uri is not None:
        model_uris.check_uri(model_uri)
        if model_uris.in_store(model_uri):
            connect_store(tracking_uri, existing=True)
        # What safe loading refuses, `mlflow models serve` must not run.
        serving.load(model_uri, refusal_hint="`make serve` serves only a model that passes "
                                             "this check")
        return
    connect_store(tracking_uri, existing=True)
    table = registry.versions_table(name)
    if table.empty:
        click.echo(f"registered model {name!r} has no versions yet" if name else
                   "no registered models yet: `pipeline sweep -e EXPERIMENT` registers one")
        return
    click.echo(table.to_string(index=False, float_format=lambda v: f"{v:.6g}"))


@cli.command()
@click.argument("name")
@click.argument("version", type=str)
@click.option("--alias", type=str, default="champion", show_default=True,
              help="Alias to move to VERSION.")
@click.option("--reason", type=str, default="",
              help="Why; recorded in the version's tags with who and when.")
@tracking_option
def promote(name: str, version: str, alias: str, reason: str, tracking_uri: str) -> None:
    """Move an alias of a registered model to VERSION (models:/NAME@ALIAS follows it)."""
    from pipeline import registry

    if not (version.isascii() and version.isdigit()):
        raise UserError(f"VERSION must be a version number, got {version!r}")
    version = str(int(version))  # "01" is version 1
    connect_store(tracking_uri, existing=True)
    previous = registry.promote(name, version, alias, reason)
    before = f"v{previous}" if previous else "no version"
    click.echo(f"{name}@{alias}: {before} -> v{version} (models:/{name}@{alias})")


@cli.command()
@click.option("-e", "--experiment", "experiment_name", type=str, required=True,
              help="Experiment whose runs to compare.")
@click.option("--metric", type=str, default=None,
              help="Sort by this metric (r2: highest first; others: lowest first). "
                   "Default: each run by its own score (trials and sweeps: objective, "
                   "evaluations: mse, training runs: val_loss, else train_loss).")
@click.option("--top", type=click.IntRange(min=1), default=None, help="Show the best N runs.")
@click.option("--stage", type=click.Choice(["generate", "train", "evaluate", "pipeline",
                                            "sweep", "trial"]), default=None,
              help="Only runs of this stage.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "markdown"]),
              default="table", show_default=True, help="Output format.")
@tracking_option
def compare(experiment_name: str, metric: str | None, top: int | None, stage: str | None,
            fmt: str, tracking_uri: str) -> None:
    """Compare an experiment's runs: model, lr, epochs and final metrics, best first."""
    from pipeline import compare as comparing
    from pipeline import tracking

    # A config name or file, else the name of an MLflow experiment in the store.
    path = Path(experiment_name)
    name = path.stem if path.suffix in (".yaml", ".yml") else experiment_name
    connect_store(tracking_uri, existing=True)
    table = comparing.runs_table(tracking.runs_frame(name), metric, top, stage)
    click.echo(comparing.render(table, fmt), nl=fmt != "csv")
