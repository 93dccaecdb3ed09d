"""What runs hold besides numbers: datasets (Parquet rows and MLflow dataset inputs) and
models (a torch.export program with a named signature and explicit pip requirements).
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.entities import DatasetInput, InputTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from pipeline import interrupts, redact, tables
from pipeline.dataset import Dataset
from pipeline.errors import first_line
from pipeline.tracking.store import TrackingError


@interrupts.shielded
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
    digest = pandas_digest(frame)
    with warnings.catch_warnings():
        # A local artifact path matches two equivalent source classes; MLflow picks one and warns.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        try:
            mlflow_dataset = mlflow.data.from_pandas(frame, source=source, name=name,
                                                     digest=digest)
        except MlflowException:  # e.g. mlflow-artifacts:/ behind a tracking server
            mlflow_dataset = mlflow.data.from_pandas(frame, name=name, digest=digest)
    # The schema MLflow would infer, from the columns' types: its inference looks at every
    # cell in Python for a missing value (15 s for 1,000,000 rows x 34 columns), and the data
    # stage lets none through. Set on the dataset, where MLflow caches what it infers.
    mlflow_dataset.schema = _schema(frame)
    MlflowClient().log_inputs(run_id, datasets=[DatasetInput(
        mlflow_dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])])


def pandas_digest(frame) -> str:
    """MLflow's digest of a DataFrame of numbers (``mlflow.data.from_pandas`` computes the
    same), without its look at the type of every cell, which took 1.7 s on 1,000,000 rows."""
    import numpy as np
    import pandas as pd
    from mlflow.data.digest_utils import MAX_ROWS, get_normalized_md5_digest

    return get_normalized_md5_digest(
        [pd.util.hash_pandas_object(frame.head(MAX_ROWS)).values, np.int64(len(frame))]
        + [str(column).encode() for column in frame.columns])


def _schema(frame):
    from mlflow.types import ColSpec, DataType, Schema

    return Schema([ColSpec(DataType.double, str(column)) for column in frame.columns])


def _artifact_location(uri: str) -> str | None:
    """The storage location behind a ``runs:/ID/path`` URI, which MLflow can resolve."""
    if not uri.startswith("runs:/"):
        return str(Path(uri).resolve())
    from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository

    return RunsArtifactRepository.get_underlying_uri(uri)


@interrupts.shielded
def write_dataset(dataset: Dataset, run_id: str) -> str:
    """Log the rows (Parquet) and schema as artifacts of ``run_id``; return their URI."""

    with tempfile.TemporaryDirectory() as tmp:
        MlflowClient().log_artifacts(run_id, str(tables.write(dataset, Path(tmp))), "dataset")
    return f"runs:/{run_id}/dataset"


def portable_uri(tracking_uri: str) -> str:
    """``tracking_uri`` as another process in another folder can use it: the user but no
    password (each machine has its own: ``PGPASSWORD``, ``~/.pgpass``,
    ``MLFLOW_TRACKING_PASSWORD``), and a relative SQLite path made absolute."""
    if tracking_uri.startswith("sqlite:///") and not tracking_uri.startswith("sqlite:////"):
        name = tracking_uri.removeprefix("sqlite:///")
        if name and not name.startswith(":memory:"):
            return f"sqlite:///{Path(name).absolute()}"
    return redact.without_password(tracking_uri)


@interrupts.shielded
def read_dataset(uri: str) -> Dataset:
    """Read a dataset logged by :func:`write_dataset`, from a ``runs:/`` URI or a local folder."""

    if Path(uri).is_dir():
        return tables.read(Path(uri))
    if uri.split("://")[0].lower() in ("http", "https"):
        raise TrackingError(f"cannot fetch dataset {uri}: give runs:/<run id>/dataset, a "
                            "folder, or an artifact store's URI, not a web address")
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri)
    except Exception as err:  # noqa: BLE001 - each scheme's client fails in its own way
        # (s3:// without boto3: ModuleNotFoundError; http:// that is no artifact: ValueError)
        message = first_line(err)
        raise TrackingError(f"cannot fetch dataset {uri}: {message}") from None
    return tables.read(Path(local))


@interrupts.shielded
def runs_frame(experiment_name: str):
    """Every run of an experiment as ``mlflow.search_runs`` gives it (a pandas DataFrame)."""
    found = MlflowClient().get_experiment_by_name(experiment_name)
    if found is None:
        raise TrackingError(f"no runs recorded for experiment {experiment_name!r} in this store")
    return mlflow.search_runs(experiment_ids=[found.experiment_id])


@interrupts.shielded
def find_cached_dataset(experiment: str, key: str) -> str | None:
    """The run id of a finished generate run whose data key is ``key`` and whose files are
    still there (an artifact folder deleted by hand would otherwise be "reused" forever)."""
    runs = mlflow.search_runs(
        experiment_ids=[experiment],
        filter_string=(f"tags.data_key = '{key}' and tags.stage = 'generate' "
                       "and attributes.status = 'FINISHED'"),
        max_results=5,
        output_format="list",
    )
    client = MlflowClient()
    for run in runs:
        try:
            if client.list_artifacts(run.info.run_id, "dataset"):
                return run.info.run_id
        except OSError:  # its artifact folder is gone or cannot be read
            continue
    return None


def pip_requirements() -> list[str]:
    """Pinned requirements of a logged model; explicit, so MLflow skips its slow inference."""
    torch_version = torch.__version__.split("+")[0]
    return [f"torch=={torch_version}", f"numpy=={np.__version__}", f"mlflow=={mlflow.__version__}"]


@interrupts.shielded
def _new_logged_model(run_id: str) -> str:
    """A logged model in its run's experiment, with the run's params and source tags, as
    ``Model.log`` would make it, except that ``Model.log`` alone files it under the active
    experiment: with no active run, the Default one, where ``runs:/<id>/model`` is not found.
    """
    client = MlflowClient()
    run = client.get_run(run_id)
    tags = {key: value for key, value in run.data.tags.items()
            if key == "mlflow.user" or key.startswith("mlflow.source.")}
    return client.create_logged_model(
        run.info.experiment_id, name="model", source_run_id=run_id, tags=tags,
        params={key: str(value) for key, value in run.data.params.items()}).model_id


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
    if dataset.scaler is not None:  # trained on scaled rows: the logged model takes raw ones,
        module = models.Standardized(module, dataset.scaler.mean, dataset.scaler.std,
                                     models.DTYPES[dtype])
        example = dataset.scaler.undo(example)
        dtype = "float64"  # in float64 (see models.Standardized)
    info = Model.log(
        artifact_path=None,
        name="model",
        run_id=run_id,
        model_id=_new_logged_model(run_id),
        flavor=model_format,
        module=module,
        example=example.astype(dtype),
        feature_names=dataset.feature_names,
        target_names=dataset.target_names,
        pip_requirements=pip_requirements(),
        validate_serving_input=validate,
    )
    return info.model_uri
