"""The MLflow layer: the one module that talks to the tracking store.

Runs are opened with :func:`run`, which always closes them (FINISHED, FAILED, or KILLED on
Ctrl-C), so no run is left RUNNING. Curves go to the store in one batch per run, never one call
per epoch. Models are logged in torch.export (``pt2``) form with explicit pip requirements.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from pipeline import redact
from pipeline.data import Dataset
from pipeline.errors import UserError, first_line

HEALTH_TIMEOUT_S = 5
SQLITE_HEADER = b"SQLite format 3\x00"


NOTE = "mlflow.note.content"  # what the UI shows as an experiment's or a run's description


class TrackingError(UserError):
    """The tracking store cannot be reached or refuses a request."""


def store_error(err: Exception) -> UserError | None:
    """An error MLflow raised as one line for the user (password masked); None for others."""
    if isinstance(err, MlflowException):
        return UserError(f"tracking store error: {redact.mask(first_line(err))}")
    return None


def connect(tracking_uri: str) -> None:
    """Point MLflow at ``tracking_uri`` and make sure the store is usable, in one line if not.

    A server must answer its health check; a database store must be writable and is migrated
    here, once, under a lock, so that several processes starting on a fresh store do not race
    to create its tables. Credentials in an ``http(s)`` URI move to MLflow's environment
    variables, so that MLflow never prints them in its "View run" links.
    """
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Progress bars for a few small artifacts are noise on stderr.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    shown = redact.mask(tracking_uri)
    if tracking_uri.startswith(("http://", "https://")):
        tracking_uri, user, password = redact.split_credentials(tracking_uri)
        if user:
            os.environ["MLFLOW_TRACKING_USERNAME"] = user
        if password is not None:
            os.environ["MLFLOW_TRACKING_PASSWORD"] = password
        mlflow.set_tracking_uri(tracking_uri)
        _check_server(tracking_uri, shown)
        return
    if tracking_uri.startswith("sqlite:"):
        _check_sqlite_file(tracking_uri, shown)
    mlflow.set_tracking_uri(tracking_uri)
    if "://" in tracking_uri:
        with store_lock(tracking_uri):
            try:
                MlflowClient().search_experiments(max_results=1)  # creates or migrates tables
            except Exception as err:  # SQLAlchemy and MLflow raise many kinds here
                raise TrackingError(
                    f"tracking store {shown} cannot be used: {redact.mask(first_line(err))}"
                ) from None


def _check_server(url: str, shown: str) -> None:
    import requests

    try:
        requests.get(url.rstrip("/") + "/health", timeout=HEALTH_TIMEOUT_S).raise_for_status()
    except requests.RequestException as err:
        reason = type(err).__name__
        raise TrackingError(f"tracking server {shown} is not reachable ({reason})") from None


def _check_sqlite_file(uri: str, shown: str) -> None:
    """Refuse what SQLite would fail on only after minutes of MLflow's retries."""
    # sqlite:///relative.db and sqlite:////absolute.db; sqlite:// alone is in memory.
    name = uri.partition(":///")[2].partition("?")[0]
    if name in ("", ":memory:"):
        return
    path = Path(name).absolute()
    folder = path.parent
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() or _under_a_file(folder) else "does not exist"
        raise TrackingError(f"tracking store {shown}: {folder} {what}")
    if path.exists():
        if not path.is_file():
            raise TrackingError(f"tracking store {shown}: {path} is not a file")
        try:
            with open(path, "r+b") as handle:
                header = handle.read(len(SQLITE_HEADER))
        except OSError as err:
            raise TrackingError(f"tracking store {shown}: cannot write {path} "
                                f"({err.strerror.lower()})") from None
        if header and header != SQLITE_HEADER:
            raise TrackingError(f"tracking store {shown}: {path} is not an SQLite database "
                                "(corrupt, or another kind of file)")
        return
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as err:
        raise TrackingError(f"tracking store {shown}: cannot create {path} "
                            f"({err.strerror.lower()})") from None


def _under_a_file(folder: Path) -> bool:
    return any(parent.is_file() for parent in (folder, *folder.parents))


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """A lock shared by every process on this machine that opens the store ``uri``."""
    import filelock

    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    with filelock.FileLock(Path(tempfile.gettempdir()) / f"pipeline-store-{digest}.lock"):
        yield


def experiment_name(experiment: str) -> str:
    return MlflowClient().get_experiment(experiment).name


EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # the UI's training view


def experiment_id(name: str, description: str = "") -> str:
    """The MLflow experiment named after the config, created on first use with the config's
    description as its note, marked for the UI's model-training view (not the GenAI one).

    Under ``mlflow run`` the run already exists (``MLFLOW_RUN_ID``) in the experiment chosen
    there, and everything this process logs joins that experiment.
    """
    client = MlflowClient()
    tags = {**EXPERIMENT_KIND, **({NOTE: description} if description else {})}
    try:
        if run_id := os.environ.get("MLFLOW_RUN_ID"):
            found = client.get_experiment(client.get_run(run_id).info.experiment_id)
        else:
            found = client.get_experiment_by_name(name)
        if found is None:
            try:
                return client.create_experiment(name, tags=tags)
            except MlflowException:
                found = client.get_experiment_by_name(name)  # another process made it first
                if found is None:
                    raise
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        for key, value in tags.items():  # an experiment made elsewhere, or before these tags
            if key not in found.tags:
                client.set_experiment_tag(found.experiment_id, key, value)
        return found.experiment_id
    except MlflowException as err:
        raise TrackingError(f"tracking store refused experiment {name!r}: {err.message}") from None


@contextlib.contextmanager
def run(experiment: str, name: str, parent_run_id: str | None = None,
        tags: dict | None = None, description: str = "") -> Iterator[str]:
    """A run, by id, that ends FINISHED, FAILED on any error, or KILLED on interrupt.

    ``description`` is the note the UI shows on the run's page. A top-level run under
    ``mlflow run`` is the run `mlflow run` opened. Every call here takes the run's id, never
    MLflow's active-run stack, so the same code is safe in worker processes and threads.
    """
    tags = {**(tags or {}), **({NOTE: description} if description else {})}
    if parent_run_id is None:
        run_id, _ = open_parent(experiment, name, tags)
    else:
        run_id = MlflowClient().create_run(
            experiment, run_name=name,
            tags={**environment_tags(), **tags, "mlflow.parentRunId": parent_run_id},
        ).info.run_id
    status = "FAILED"
    try:
        yield run_id
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        MlflowClient().set_terminated(run_id, status)


@functools.cache
def environment_tags() -> dict[str, str]:
    """Torch version and git commit: computed once per process, not once per run."""
    tags = {"torch_version": torch.__version__}
    if commit := _git_commit():
        tags["git_commit"] = commit
    return tags


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


# --- logging ------------------------------------------------------------------------------------


def _param_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)


def log_params(run_id: str, params: dict[str, Any]) -> None:
    """Log the flattened config; lists become JSON so the UI shows them as written."""
    log_to_run(run_id, params=params)


def _curve_metrics(curves: dict[str, list[float]], final: dict[str, float] | None = None):
    now = int(time.time() * 1000)
    metrics = [
        Metric(key, float(value), now, step)
        for key, values in curves.items()
        for step, value in enumerate(values)
    ]
    metrics += [Metric(key, float(value), now, 0) for key, value in (final or {}).items()]
    return metrics


def log_curves(run_id: str, curves: dict[str, list[float]]) -> None:
    """Log whole curves (step = epoch) in batches: one store call per 1,000 points."""
    MlflowClient().log_batch(run_id, metrics=_curve_metrics(curves))


# --- runs opened by id, safe in worker processes (no active-run stack involved) -----------------


def open_child(experiment: str, parent_run_id: str, name: str, tags: dict[str, str]) -> str:
    """Create a run under ``parent_run_id`` explicitly (one store call); return its id. Its
    params, like its curves, come with :func:`close_run`."""
    run = MlflowClient().create_run(
        experiment, run_name=name,
        tags={**environment_tags(), **tags, "mlflow.parentRunId": parent_run_id},
    )
    return run.info.run_id


def find_child(experiment: str, parent_run_id: str, tags: dict[str, str]) -> str | None:
    """The id of the run under ``parent_run_id`` carrying ``tags``, if there is one."""
    clauses = [f"tags.mlflow.parentRunId = '{parent_run_id}'"]
    clauses += [f"tags.{key} = '{value}'" for key, value in tags.items()]
    found = MlflowClient().search_runs([experiment], " and ".join(clauses), max_results=1)
    return found[0].info.run_id if found else None


def close_run(run_id: str, status: str, curves: dict[str, list[float]] | None = None,
              metrics: dict[str, float] | None = None, tags: dict[str, str] | None = None,
              params: dict[str, Any] | None = None) -> None:
    """Log params, curves, final metrics and tags in one batch, then end the run with
    ``status``: two store calls, whatever the length of the curves."""
    client = MlflowClient()
    client.log_batch(
        run_id,
        metrics=_curve_metrics(curves or {}, metrics),
        params=[Param(k, _param_value(v)) for k, v in (params or {}).items()],
        tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
    )
    client.set_terminated(run_id, status)


def open_parent(experiment: str, name: str, tags: dict[str, str],
                run_id: str | None = None) -> tuple[str, bool]:
    """Mark an existing top-level run RUNNING again, or start one; return (id, is_new).

    Under ``mlflow run`` a new parent is the run `mlflow run` opened (``MLFLOW_RUN_ID``),
    renamed and tagged as a parent made here would be.
    """
    client = MlflowClient()
    launched = os.environ.pop("MLFLOW_RUN_ID", None)
    if run_id is not None:
        try:
            if client.get_run(run_id).info.lifecycle_stage == "active":
                client.update_run(run_id, status="RUNNING")
                return run_id, False
        except MlflowException:
            pass  # deleted from the store: start a new parent
    all_tags = {**environment_tags(), **tags}
    if launched is not None:
        client.update_run(launched, status="RUNNING", name=name)
        client.log_batch(launched, tags=[RunTag(k, str(v)) for k, v in all_tags.items()])
        return launched, True
    run = client.create_run(experiment, run_name=name, tags=all_tags)
    return run.info.run_id, True


def log_to_run(run_id: str, params: dict[str, Any] | None = None,
               metrics: dict[str, float] | None = None,
               tags: dict[str, str] | None = None) -> None:
    MlflowClient().log_batch(
        run_id,
        metrics=_curve_metrics({}, metrics),
        params=[Param(k, _param_value(v)) for k, v in (params or {}).items()],
        tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
    )


SYSTEM_METRICS_S = 2.0  # how often MLflow's monitor samples and logs the machine's load


@contextlib.contextmanager
def system_metrics(run_id: str) -> Iterator[None]:
    """While the block runs, MLflow's monitor thread logs this machine's CPU, memory, disk,
    network (and GPU, where there is one) to the run as ``system/*`` metrics, one batch every
    :data:`SYSTEM_METRICS_S` seconds; continuing the steps of a resumed run."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_S,
                                   resume_logging=True)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


def metric_histories(run_ids: dict[Any, str], key: str) -> dict[Any, list[float]]:
    """The ``key`` curve (by step) of each run; one store call per run."""
    client = MlflowClient()
    curves = {}
    for name, run_id in run_ids.items():
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        if history:
            curves[name] = [m.value for m in history]
    return curves


def log_text(run_id: str, text: str, path: str) -> None:
    MlflowClient().log_text(run_id, text, path)


def log_figure(run_id: str, fig, path: str) -> None:
    from pipeline import plots

    MlflowClient().log_figure(run_id, fig, path)
    plots.close(fig)


def run_tags(run_id: str) -> dict[str, str]:
    return MlflowClient().get_run(run_id).data.tags


def log_metrics(run_id: str, metrics: dict[str, float]) -> None:
    log_to_run(run_id, metrics=metrics)


def set_tags(run_id: str, tags: dict[str, str]) -> None:
    log_to_run(run_id, tags=tags)


def log_dataset(run_id: str, dataset: Dataset, name: str, data_uri: str | None,
                context: str) -> None:
    """Record ``dataset`` as an MLflow dataset input of the run (with its digest).

    The source is where the rows are stored (the generate run's artifacts) where MLflow can
    name that place (local, S3, GCS, ...), else the code that built them; the run's
    ``data_uri`` tag always holds the ``runs:/`` URI.
    """
    import mlflow.data

    frame = dataset.frame()
    source = _artifact_location(data_uri) if data_uri else None
    with warnings.catch_warnings():
        # A local artifact path matches two equivalent source classes; MLflow picks one and warns.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        try:
            mlflow_dataset = mlflow.data.from_pandas(frame, source=source, name=name)
        except MlflowException:  # e.g. mlflow-artifacts:/ behind a tracking server
            mlflow_dataset = mlflow.data.from_pandas(frame, name=name)
    MlflowClient().log_inputs(run_id, datasets=[DatasetInput(
        mlflow_dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])])


def _artifact_location(uri: str) -> str | None:
    """The storage location behind a ``runs:/ID/path`` URI, which MLflow can resolve."""
    if not uri.startswith("runs:/"):
        return str(Path(uri).resolve())
    from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository

    return RunsArtifactRepository.get_underlying_uri(uri)


def write_dataset(dataset: Dataset, run_id: str) -> str:
    """Log the rows (Parquet) and schema as artifacts of ``run_id``; return their URI."""
    from pipeline import data

    with tempfile.TemporaryDirectory() as tmp:
        MlflowClient().log_artifacts(run_id, str(data.write(dataset, Path(tmp))), "dataset")
    return f"runs:/{run_id}/dataset"


def portable_uri(tracking_uri: str) -> str:
    """``tracking_uri`` as another process in another folder can use it: no credentials, and
    a relative SQLite path made absolute."""
    if tracking_uri.startswith("sqlite:///") and not tracking_uri.startswith("sqlite:////"):
        name = tracking_uri.removeprefix("sqlite:///")
        if name and not name.startswith(":memory:"):
            return f"sqlite:///{Path(name).absolute()}"
    return redact.split_credentials(tracking_uri)[0]


def read_dataset(uri: str) -> Dataset:
    """Read a dataset logged by :func:`write_dataset`, from a ``runs:/`` URI or a local folder."""
    from pipeline import data

    if Path(uri).is_dir():
        return data.read(Path(uri))
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri)
    except (MlflowException, OSError) as err:
        message = first_line(err)
        raise TrackingError(f"cannot fetch dataset {uri}: {message}") from None
    return data.read(Path(local))


def runs_frame(experiment_name: str):
    """Every run of an experiment as ``mlflow.search_runs`` gives it (a pandas DataFrame)."""
    found = MlflowClient().get_experiment_by_name(experiment_name)
    if found is None:
        raise TrackingError(f"no runs recorded for experiment {experiment_name!r} in this store")
    return mlflow.search_runs(experiment_ids=[found.experiment_id])


def find_cached_dataset(experiment: str, key: str) -> str | None:
    """The run id of a finished generate run whose data key is ``key``, if any."""
    runs = mlflow.search_runs(
        experiment_ids=[experiment],
        filter_string=(f"tags.data_key = '{key}' and tags.stage = 'generate' "
                       "and attributes.status = 'FINISHED'"),
        max_results=1,
        output_format="list",
    )
    return runs[0].info.run_id if runs else None


def pip_requirements() -> list[str]:
    """Pinned requirements of a logged model; explicit, so MLflow skips its slow inference."""
    torch_version = torch.__version__.split("+")[0]
    return [f"torch=={torch_version}", f"numpy=={np.__version__}", f"mlflow=={mlflow.__version__}"]


def log_model(run_id: str, module: torch.nn.Module, dataset: Dataset, dtype: str,
              validate: bool = True) -> str:
    """Log ``module`` as an MLflow model of the run; return its ``models:/`` URI.

    The model takes the dataset's features by name (see :mod:`pipeline.model_format`); a few of
    its rows, cast to the model's dtype, are the input example the program is exported with.
    ``validate=False`` skips MLflow's check that the saved model answers its example (it loads
    the model back: half the cost), for the many models of one sweep, all built alike.
    """
    from mlflow.models import Model

    from pipeline import model_format, models

    example = dataset.features[:model_format.EXAMPLE_ROWS]
    if dataset.scaler is not None:  # trained on scaled rows: the logged model takes raw ones
        module = models.Standardized(module, dataset.scaler.mean, dataset.scaler.std,
                                     models.DTYPES[dtype])
        example = dataset.scaler.undo(example)
    info = Model.log(
        artifact_path=None,
        name="model",
        run_id=run_id,
        flavor=model_format,
        module=module,
        example=example.astype(dtype),
        feature_names=dataset.feature_names,
        target_names=dataset.target_names,
        pip_requirements=pip_requirements(),
        validate_serving_input=validate,
    )
    return info.model_uri
