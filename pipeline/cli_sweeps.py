"""`pipeline sweep` and `pipeline worker`: the Optuna commands of the `pipeline` group."""

from __future__ import annotations

import click

from pipeline import redact
from pipeline.cli import (
    cli,
    device_option,
    experiment_options,
    how_to_browse,
    with_device,
)
from pipeline.sweep_settings import SweepSettings, storage_patience


class WholeNumber(click.ParamType):
    """An integer, also written as a float with nothing after the point (``3.0``): MLproject
    has no integer type, so `mlflow run -P n_trials=3.0` passes one."""

    name = "integer"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a valid integer.", param, ctx)
        if not number.is_integer():
            self.fail(f"{value!r} is not a whole number.", param, ctx)
        return int(number)


WHOLE = WholeNumber()


@cli.command()
@experiment_options
@device_option
@click.option("--n-trials", type=WHOLE, default=20, show_default=True,
              help="Trials the study should hold in total; a rerun runs only the missing ones.")
@click.option("--timeout", type=float, default=None, help="Stop starting trials after S seconds.")
@click.option("--storage", type=str, default="optuna.journal", show_default=True,
              envvar="PIPELINE_OPTUNA_STORAGE",
              help="Optuna storage: a journal file path, or a database URL "
                   "(sqlite:///optuna.db, postgresql://...).")
@click.option("--study-name", type=str, default=None,
              help="Study to create or resume. Default: the experiment's name.")
@click.option("--workers", type=WHOLE, default=1, show_default=True,
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
@click.option("--batch", type=int, default=None,
              help="Trials each worker asks for at once and trains together, as one program. "
                   "Default: up to 8, fewer where --workers K would leave a worker idle.")
def sweep(experiment, tracking_uri: str, device: str | None, n_trials: int,
          timeout: float | None, storage: str, study_name: str | None, workers: int,
          sampler: str, pruner: str, seed: int | None, lr_range, epochs_range,
          log_models: str, batch: int | None) -> None:
    """Search lr and epochs with Optuna; one MLflow parent run, a child run per trial.

    The best trial's model is registered under the experiment's name; the alias `champion`
    moves to it when it beats the current champion. A database storage that stops answering
    is waited for 30 s (PIPELINE_STORAGE_PATIENCE=SECONDS).
    """
    experiment = with_device(experiment, device)
    # Checked as it is built, before the heavy imports: bad input answers at once.
    settings = SweepSettings(
        n_trials=n_trials, storage=storage, study_name=study_name, workers=workers,
        timeout=timeout, sampler=sampler, pruner=pruner,
        seed=experiment.seed if seed is None else seed, log_models=log_models,
        lr_range=lr_range, epochs_range=epochs_range, batch=batch,
    )
    storage_patience()
    from pipeline import interrupts, outages, tracking
    from pipeline import sweep as sweeps

    try:
        summary = sweeps.run(experiment, settings, tracking_uri, echo=click.echo)
    except interrupts.Interrupted as stop:
        _stopped(stop)
    except Exception as err:
        if (failed := outages.storage_failure(err, storage)) is not None:
            raise failed from None
        raise
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
    the storage, log to the sweep's MLflow parent run, and never finalise the sweep. A
    storage that stops answering is waited for 30 s (PIPELINE_STORAGE_PATIENCE=SECONDS).
    """
    import os

    storage_patience()
    from pipeline import interrupts, outages
    from pipeline import worker as workers

    with interrupts.deferred():
        try:
            outcome = workers.run(storage, study_name, tracking_uri, offset=os.getpid(),
                                  timeout=timeout, echo=click.echo)
        except interrupts.Interrupted as stop:
            _stopped(stop)
        except Exception as err:
            if (failed := outages.storage_failure(err, storage)) is not None:
                raise failed from None
            raise
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
    holder = (f"champion is v{summary.champion_version}: models:/{summary.model_name}@champion"
              if summary.champion_version else
              f"no version holds @champion (`pipeline promote {summary.model_name} "
              f"{summary.version}` gives it)")
    click.echo(f"model: {summary.model_name} v{summary.version} ({summary.decision}); {holder}")
    click.echo(f"look: {how_to_browse(tracking_uri)}, experiment '{experiment_name}', "
               f"run 'sweep {summary.study_name}'")
