"""The `pipeline` command: generate -> train -> evaluate, each stage tracked in MLflow.

    pipeline experiments                      # list the experiment configs
    pipeline run -e line_fit_15pts            # all three stages under one parent run
    pipeline train -e crop_yields_builtin --set lr=1e-4 --set epochs=200

Heavy libraries (torch, mlflow) are imported inside the commands, so `pipeline --help` is quick.
"""

from __future__ import annotations

import functools
import signal

import click

from pipeline import config as configs
from pipeline import redact
from pipeline.errors import UserError, first_line

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


class Group(click.Group):
    """Turns errors from the tracking store, and interrupts, into one line instead of a
    traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.ClickException as err:
            err.message = redact.mask(err.message)  # no password from any URL on the screen
            raise
        except KeyboardInterrupt as err:
            # Ctrl-C, or SIGTERM (see main): every run the command opened is closed by now,
            # marked KILLED. Sweeps and workers say more and exit on their own.
            signum = getattr(err, "signum", signal.SIGINT)
            click.echo(f"interrupted ({signal.Signals(signum).name}); any run it had opened "
                       "is closed as KILLED", err=True)
            raise SystemExit(128 + signum) from None
        except EOFError as err:  # a file that ends early: Click would call it an interrupt
            raise UserError(f"an input ends early ({first_line(err)})") from None
        except Exception as err:
            from pipeline import tracking

            if (refused := tracking.store_error(err)) is not None:
                raise refused from None
            if isinstance(err, OSError) and err.strerror:  # the disk, not the program
                # An artifact folder that is full, read-only, or a file; the run is closed.
                where = f": {err.filename}" if err.filename else ""
                raise UserError(f"{err.strerror.lower()}{where}") from None
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


def _device(help_text: str):
    return click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
                        help=help_text)


device_option = _device(
    "Where to train: auto takes CUDA when present. Default: the config's device.")
predict_device_option = _device(
    "Where to run the model: auto (the default) takes CUDA when present.")


def with_device(experiment, device):
    return experiment if device is None else configs.with_train(experiment, device=device)


def connect_experiment(experiment, tracking_uri: str) -> str:
    from pipeline import tracking

    tracking.connect(tracking_uri)
    found = tracking.experiment_id(experiment.name, experiment.description)
    tracking.close_dead_runs(found)  # runs of this host's commands killed with -9
    return found


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
    experiment_id = connect_experiment(experiment, tracking_uri)
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
    from pipeline import data, inputs, tracking, workflow
    from pipeline import train as training

    experiment = with_device(experiment, device)
    training.resolve_device(experiment.train.device)
    _check_given(data_uri)
    # The store is reached (and a new one made) only once the input is known to be good.
    dataset = None if data_uri else data.build(experiment.data, experiment.seed)
    connect_store(tracking_uri)
    if data_uri:
        dataset = tracking.read_dataset(data_uri)
        data.check_columns(experiment.data, dataset, data_uri, experiment.name)
        inputs.check_recipe(experiment, data_uri)
    data.check_dtype_range(dataset, experiment.train.dtype, experiment.train.scale == "standard")
    experiment_id = connect_experiment(experiment, tracking_uri)
    trained = workflow.train(experiment, dataset, experiment_id, data_uri=data_uri,
                             echo=click.echo)
    click.echo(trained.model_uri)


def _check_given(data_uri: str | None) -> None:
    if data_uri is not None and not data_uri.strip():
        raise UserError("--data is empty; give runs:/<run id>/dataset (from `pipeline "
                        "generate`) or a folder, or leave it out to build the rows")


@cli.command()
@experiment_options
@click.option("--model", "model_uri", type=str, required=True,
              help="Model to score: models:/m-<id>, models:/NAME@ALIAS, runs:/<id>/model, ...")
@click.option("--data", "data_uri", type=str, default=None,
              help="Dataset from `pipeline generate`. Default: build it from the config.")
def evaluate(experiment, tracking_uri: str, model_uri: str, data_uri: str | None) -> None:
    """Score a model: MSE, RMSE, MAE, R², and the gap to the least-squares optimum."""
    from pipeline import data, inputs, model_uris, serving, tracking, workflow

    model_uris.check_uri(model_uri)
    _check_given(data_uri)
    dataset = None if data_uri else data.build(experiment.data, experiment.seed)
    connect_store(tracking_uri)
    if data_uri:
        dataset = tracking.read_dataset(data_uri)
        data.check_columns(experiment.data, dataset, data_uri, experiment.name)
        inputs.check_recipe(experiment, data_uri)
    model = serving.load(model_uri)
    inputs.model_columns(experiment, dataset, model, model_uri)  # before any run
    experiment_id = connect_experiment(experiment, tracking_uri)  # the input is good
    workflow.evaluate_model(experiment, dataset, model_uri, experiment_id, echo=click.echo,
                            model=model, data_uri=data_uri)


@cli.command()
@experiment_options
@device_option
def run(experiment, tracking_uri: str, device: str | None) -> None:
    """Run generate, train and evaluate as child runs of one parent run."""
    from pipeline import data, tracking, workflow
    from pipeline import train as training

    experiment = with_device(experiment, device)
    training.resolve_device(experiment.train.device)
    built = data.check(experiment.data, experiment.seed, experiment.val_fraction)
    if built is not None:  # synthetic rows are drawn later, and small
        data.check_dtype_range(built, experiment.train.dtype,
                               experiment.train.scale == "standard")
    experiment_id = connect_experiment(experiment, tracking_uri)  # the input is good
    workflow.run_all(experiment, experiment_id, built, echo=click.echo)
    shown = redact.mask(tracking_uri)
    click.echo(f"done: experiment '{tracking.experiment_name(experiment_id)}' in {shown}; "
               f"browse it: {how_to_browse(tracking_uri)}")


def how_to_browse(tracking_uri: str) -> str:
    """How to look at a store in the MLflow UI: a server serves it; a database needs `mlflow ui`."""
    if tracking_uri.lower().startswith(("http://", "https://")):
        return f"open {redact.split_credentials(tracking_uri)[0]} in a browser"
    return f"`mlflow ui --backend-store-uri {redact.mask(tracking_uri)}` (or `make ui`)"


def tracking_option(func):
    return click.option("--tracking-uri", type=str, envvar="MLFLOW_TRACKING_URI",
                        default=DEFAULT_TRACKING_URI, show_default=True,
                        help="MLflow tracking URI (or set MLFLOW_TRACKING_URI).")(func)


def connect_store(tracking_uri: str, existing: bool = False) -> None:
    """Reach the store; ``existing`` for commands that only read it: a missing sqlite file
    is an error there, not a new store left behind."""
    from pipeline import tracking

    tracking.connect(tracking_uri, existing)



# The commands of these modules join the group as they are imported.
from pipeline import cli_models, cli_sweeps  # noqa: E402, F401
