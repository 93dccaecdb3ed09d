"""The `pipeline` command: generate -> train -> evaluate, each stage tracked in MLflow.

    pipeline experiments                      # list the experiment configs
    pipeline run -e line_fit_15pts            # all three stages under one parent run
    pipeline train -e crop_yields_builtin --set lr=1e-4 --set epochs=200

Heavy libraries (torch, mlflow) are imported inside the commands, so `pipeline --help` is quick.
"""

from __future__ import annotations

import functools
from pathlib import Path

import click

from pipeline import config as configs
from pipeline import redact
from pipeline.errors import UserError
from pipeline.sweep_settings import SweepSettings

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


class Group(click.Group):
    """Turns errors from the tracking store into one line instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.ClickException as err:
            err.message = redact.mask(err.message)  # no password from any URL on the screen
            raise
        except Exception as err:
            from pipeline import tracking

            if (refused := tracking.store_error(err)) is not None:
                raise refused from None
            raise


@click.group(cls=Group)
@click.version_option(package_name="pipeline")
def cli() -> None:
    """Tracked, reproducible PyTorch regression experiments (MLflow + Optuna)."""


def experiment_options(func):
    """-e/--experiment, --set and --tracking-uri, shared by every stage command."""

    @click.option("-e", "--experiment", "experiment_name", type=str, required=True,
                  help="Experiment name (see `pipeline experiments`) or path to a YAML config.")
    @click.option("--set", "overrides", type=str, multiple=True, metavar="KEY=VALUE",
                  help="Override a config value, e.g. --set lr=0.05 --set data.noise=0.2. "
                       "Repeatable; one value may also hold several space-separated pairs.")
    @click.option("--tracking-uri", type=str, envvar="MLFLOW_TRACKING_URI",
                  default=DEFAULT_TRACKING_URI, show_default=True,
                  help="MLflow tracking URI (or set MLFLOW_TRACKING_URI).")
    @functools.wraps(func)
    def wrapper(experiment_name, overrides, tracking_uri, **kwargs):
        experiment = configs.load(experiment_name, overrides)
        return func(experiment=experiment, tracking_uri=tracking_uri, **kwargs)

    return wrapper


def device_option(func):
    return click.option(
        "--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
        help="Where to train: auto takes CUDA when present. Default: the config's device.",
    )(func)


def _with_device(experiment, device):
    return experiment if device is None else configs.with_train(experiment, device=device)


def _connect(experiment, tracking_uri: str) -> str:
    from pipeline import tracking

    tracking.connect(tracking_uri)
    return tracking.experiment_id(experiment.name, experiment.description)


@cli.command()
def experiments() -> None:
    """List the experiment configs with a one-line description each."""
    found = configs.available()
    if not found:
        raise UserError(f"no experiment configs in {configs.experiments_dir()}")
    width = max(map(len, found))
    for name in found:
        try:
            description = configs.load(name).description
        except UserError as err:
            description = f"(invalid: {err.message})"
        click.echo(f"{name:<{width}}  {description}")


@cli.command()
@experiment_options
def generate(experiment, tracking_uri: str) -> None:
    """Build the experiment's dataset and log it as a run artifact and MLflow dataset.

    Prints the dataset's URI (runs:/<run id>/dataset) for `pipeline train --data`.
    Identical inputs reuse the earlier run's data instead of generating again.
    """
    from pipeline import data, workflow

    built = data.check(experiment.data, experiment.seed)  # before any experiment is made
    experiment_id = _connect(experiment, tracking_uri)
    ref = workflow.generate(experiment, experiment_id,
                            prepared=workflow.prepare_data(experiment, experiment_id, built),
                            echo=click.echo)
    click.echo(ref.uri)


@cli.command()
@experiment_options
@device_option
@click.option("--data", "data_uri", type=str, default=None,
              help="Dataset from `pipeline generate` (runs:/<id>/dataset or a local folder). "
                   "Default: build it from the config.")
def train(experiment, tracking_uri: str, device: str | None, data_uri: str | None) -> None:
    """Train the experiment's model; log loss curves, plots and the model.

    Prints the logged model's URI for `pipeline evaluate --model`.
    """
    from pipeline import data, tracking, workflow
    from pipeline import train as training

    experiment = _with_device(experiment, device)
    training.resolve_device(experiment.train.device)
    _connect_store(tracking_uri)
    if data_uri:
        dataset = tracking.read_dataset(data_uri)
    else:
        dataset = data.build(experiment.data, experiment.seed)
    experiment_id = _connect(experiment, tracking_uri)  # the input is good: now it may exist
    trained = workflow.train(experiment, dataset, experiment_id, data_uri=data_uri,
                             echo=click.echo)
    click.echo(trained.model_uri)


@cli.command()
@experiment_options
@click.option("--model", "model_uri", type=str, required=True,
              help="Model to score: models:/m-<id>, models:/NAME@ALIAS, runs:/<id>/model, ...")
@click.option("--data", "data_uri", type=str, default=None,
              help="Dataset from `pipeline generate`. Default: build it from the config.")
def evaluate(experiment, tracking_uri: str, model_uri: str, data_uri: str | None) -> None:
    """Score a model: MSE, RMSE, MAE, R², and the gap to the least-squares optimum."""
    from pipeline import data, serving, tracking, workflow

    _connect_store(tracking_uri)
    if data_uri:
        dataset = tracking.read_dataset(data_uri)
    else:
        dataset = data.build(experiment.data, experiment.seed)
    serving.check_uri(model_uri)
    model = serving.load(model_uri)
    workflow.check_fits(experiment, dataset, model, model_uri)
    experiment_id = _connect(experiment, tracking_uri)  # the input is good: now it may exist
    workflow.evaluate_model(experiment, dataset, model_uri, experiment_id, echo=click.echo,
                            model=model)


@cli.command()
@experiment_options
@device_option
def run(experiment, tracking_uri: str, device: str | None) -> None:
    """Run generate, train and evaluate as child runs of one parent run."""
    from pipeline import data, tracking, workflow
    from pipeline import train as training

    experiment = _with_device(experiment, device)
    training.resolve_device(experiment.train.device)
    built = data.check(experiment.data, experiment.seed)
    experiment_id = _connect(experiment, tracking_uri)  # the input is good: now it may exist
    workflow.run_all(experiment, experiment_id, built, echo=click.echo)
    shown = redact.mask(tracking_uri)
    click.echo(
        f"done: experiment '{tracking.experiment_name(experiment_id)}' in {shown}; "
        f"browse it with `mlflow ui --backend-store-uri {shown}` (or `make ui`)"
    )


@cli.command()
@experiment_options
@device_option
@click.option("--n-trials", type=int, default=20, show_default=True,
              help="Trials the study should hold in total; a rerun runs only the missing ones.")
@click.option("--timeout", type=float, default=None, help="Stop starting trials after S seconds.")
@click.option("--storage", type=str, default="optuna.journal", show_default=True,
              envvar="PIPELINE_OPTUNA_STORAGE",
              help="Optuna storage: a journal file path, or a database URL "
                   "(sqlite:///optuna.db, postgresql://...).")
@click.option("--study-name", type=str, default=None,
              help="Study to create or resume. Default: the experiment's name.")
@click.option("--workers", type=int, default=1, show_default=True,
              help="Local worker processes sharing the storage; 0: print the `pipeline "
                   "worker` command to run on other machines, and wait for them.")
@click.option("--sampler", type=click.Choice(["tpe", "random"]), default="tpe",
              show_default=True, help="Optuna sampler.")
@click.option("--pruner", type=click.Choice(["median", "percentile", "hyperband", "none"]),
              default="median", show_default=True, help="Optuna pruner for slow trials.")
@click.option("--seed", type=int, default=None,
              help="Sampler seed. Default: the experiment's seed.")
@click.option("--lr-range", type=(float, float), default=None, metavar="LOW HIGH",
              help="Log-uniform lr range. Default: the config's sweep.lr, else from theory.")
@click.option("--epochs-range", type=(int, int), default=None, metavar="LOW HIGH",
              help="Integer epochs range. Default: the config's sweep.epochs.")
@click.option("--log-models", type=click.Choice(["best", "all"]), default="best",
              show_default=True, help="Log a model for the best trial only, or for every trial.")
@click.option("--batch", type=int, default=8, show_default=True,
              help="Trials each worker asks for at once and trains together, as one program.")
def sweep(experiment, tracking_uri: str, device: str | None, n_trials: int,
          timeout: float | None, storage: str, study_name: str | None, workers: int,
          sampler: str, pruner: str, seed: int | None, lr_range, epochs_range,
          log_models: str, batch: int) -> None:
    """Search lr and epochs with Optuna; one MLflow parent run, a child run per trial.

    The best trial's model is registered under the experiment's name; the alias `champion`
    moves to it when it beats the current champion.
    """
    experiment = _with_device(experiment, device)
    # Checked as it is built, before the heavy imports: bad input answers at once.
    settings = SweepSettings(
        n_trials=n_trials, storage=storage, study_name=study_name, workers=workers,
        timeout=timeout, sampler=sampler, pruner=pruner,
        seed=experiment.seed if seed is None else seed, log_models=log_models,
        lr_range=lr_range, epochs_range=epochs_range, batch=batch,
    )
    from pipeline import interrupts, tracking
    from pipeline import sweep as sweeps

    _connect_store(tracking_uri)
    try:
        summary = sweeps.run(experiment, settings, tracking_uri, echo=click.echo)
    except interrupts.Interrupted as stop:
        _stopped(stop)
    _print_sweep(summary, redact.mask(tracking_uri),
                 tracking.experiment_name(summary.experiment_id))


def _stopped(stop) -> None:
    """Ctrl-C or SIGTERM: one line, and the exit status a shell expects (130, 143)."""
    click.echo(stop.message(), err=True)
    raise SystemExit(stop.exit_code)


@cli.command()
@click.option("--storage", type=str, required=True, envvar="PIPELINE_OPTUNA_STORAGE",
              help="The study's Optuna storage (postgresql://... for several machines).")
@click.option("--study", "study_name", type=str, required=True,
              help="Study to work on, set up by `pipeline sweep`.")
@click.option("--tracking-uri", type=str, envvar="MLFLOW_TRACKING_URI", default=None,
              help="MLflow tracking URI. Default: the one `pipeline sweep` recorded.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop starting trials after S seconds.")
def worker(storage: str, study_name: str, tracking_uri: str | None,
           timeout: float | None) -> None:
    """Join a sweep from any machine: run its trials until the study holds its total.

    Start as many as you like (any launcher: ssh, a SLURM array, a Kubernetes Job); they share
    the storage, log to the sweep's MLflow parent run, and never finalise the sweep.
    """
    import os

    from pipeline import interrupts
    from pipeline import worker as workers

    with interrupts.deferred():
        try:
            outcome = workers.run(storage, study_name, tracking_uri, offset=os.getpid(),
                                  timeout=timeout, echo=click.echo)
        except interrupts.Interrupted as stop:
            _stopped(stop)
    click.echo(f"worker: ran {outcome.ran} trials; study {study_name} holds "
               f"{outcome.finished} of {outcome.total} finished")


def _print_sweep(summary, tracking_uri: str, experiment_name: str) -> None:
    states = ", ".join(f"{n} {s.lower()}" for s, n in sorted(summary.states.items()))
    click.echo(f"study {summary.study_name}: {summary.n_trials} trials ({states}); "
               f"{summary.new_trials} new; parent run {summary.parent_run_id}")
    rates = summary.rates
    rows = "training" if rates["optimum_objective"] == rates["optimum_loss"] else "validation"
    click.echo(f"theory: largest stable lr {rates['lr_max_stable']:.4g}, best constant lr "
               f"{rates['lr_best_constant']:.4g}, lowest possible objective "
               f"{rates['optimum_objective']:.6g} (least squares on the {rows} rows)")
    if summary.best_value is None:
        click.echo("no trial completed, so no model was registered")
        return
    params = summary.best_params
    click.echo(f"best: value {summary.best_value:.6g} with lr={params['lr']:.4g} "
               f"(theory's best {rates['lr_best_constant']:.4g}), epochs={params['epochs']}")
    click.echo(f"model: {summary.model_name} v{summary.version} ({summary.decision}); "
               f"champion is v{summary.champion_version}: "
               f"models:/{summary.model_name}@champion")
    click.echo(f"look: `mlflow ui --backend-store-uri {tracking_uri}` (or `make ui`), "
               f"experiment '{experiment_name}', run 'sweep {summary.study_name}'")


def tracking_option(func):
    return click.option("--tracking-uri", type=str, envvar="MLFLOW_TRACKING_URI",
                        default=DEFAULT_TRACKING_URI, show_default=True,
                        help="MLflow tracking URI (or set MLFLOW_TRACKING_URI).")(func)


def _connect_store(tracking_uri: str) -> None:
    from pipeline import tracking

    tracking.connect(tracking_uri)


@cli.command()
@click.option("--model", "model_uri", type=str, required=True,
              help="models:/NAME@ALIAS, models:/NAME/VERSION, models:/m-<id>, runs:/<id>/PATH.")
@click.option("--input", "input_path", type=click.Path(dir_okay=False, path_type=str),
              required=True, help="CSV with the model's feature columns, by name.")
@click.option("--output", "output_path", type=click.Path(dir_okay=False, path_type=str),
              default=None, help="Where to write the predictions (CSV). Default: stdout.")
@device_option
@click.option("--allow-pickle", is_flag=True,
              help="Allow loading a model stored as a pickle (only for sources you trust).")
@tracking_option
def predict(model_uri: str, input_path: str, output_path: str | None, device: str | None,
            allow_pickle: bool, tracking_uri: str) -> None:
    """Predict the targets of every row of a CSV with a logged or registered model.

    Writes one column per target, named as in training.
    """
    from pipeline import serving
    from pipeline.train import resolve_device

    serving.check_uri(model_uri)
    if output_path and not Path(output_path).resolve().parent.is_dir():
        raise UserError(f"--output {output_path}: the folder "
                        f"{Path(output_path).resolve().parent} does not exist")
    target_device = resolve_device(device or "auto")
    _connect_store(tracking_uri)
    model = serving.load(model_uri, target_device, allow_pickle)
    features = serving.read_features(input_path, model.feature_names)
    frame = serving.prediction_frame(model.predict(features), model.target_names)
    if output_path:
        frame.to_csv(output_path, index=False)
        click.echo(f"{len(frame)} predictions of {', '.join(frame.columns)} written to "
                   f"{output_path}", err=True)
    else:  # for reading: float32 models carry about seven significant digits
        click.echo(frame.to_csv(index=False, float_format="%.7g"), nl=False)


@cli.command()
@click.argument("name", required=False)
@click.option("--check", "model_uri", type=str, default=None, metavar="MODEL_URI",
              help="Only check that MODEL_URI names a model (exit status 0), e.g. "
                   "models:/NAME@champion; `make serve` asks this first.")
@tracking_option
def models(name: str | None, model_uri: str | None, tracking_uri: str) -> None:
    """List registered models: versions, aliases, objective, lr, epochs, source run."""
    from pipeline import registry, serving

    _connect_store(tracking_uri)
    if model_uri is not None:
        serving.check_uri(model_uri)
        serving.check_registered(model_uri)
        return
    table = registry.versions_table(name)
    if table.empty:
        click.echo("no registered models yet: `pipeline sweep -e EXPERIMENT` registers one")
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

    if not version.isdigit():
        raise UserError(f"VERSION must be a version number, got {version!r}")
    _connect_store(tracking_uri)
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
    _connect_store(tracking_uri)
    table = comparing.runs_table(tracking.runs_frame(name), metric, top, stage)
    click.echo(comparing.render(table, fmt), nl=fmt != "csv")


def main() -> None:
    cli(prog_name="pipeline")
