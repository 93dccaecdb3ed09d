"""Tracking stores: reaching one, checking it, creating its tables once, and experiments.

:func:`connect` answers a bad store in one line before MLflow's minutes of retries: a server
that does not answer, a sqlite file under a file, in a missing or read-only folder, corrupt
or truncated. A fresh database store is created under a lock, so several first commands at
once all succeed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import mlflow
from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline import interrupts, lifetime, redact
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


def connect(tracking_uri: str, existing: bool = False) -> None:
    """Point MLflow at ``tracking_uri`` and make sure the store is usable, in one line if not.
    ``existing``: the command only reads, so a sqlite file that is not there is an error, not
    a new store.

    A server must answer its health check; a database store must be writable and is migrated
    here, once, under a lock, so that several processes starting on a fresh store do not race
    to create its tables. Credentials in an ``http(s)`` URI move to MLflow's environment
    variables, so that MLflow never prints them in its "View run" links.
    """
    lifetime.settle()  # torch and MLflow are imported by now (see pipeline.lifetime)
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Progress bars for a few small artifacts are noise on stderr.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    shown = redact.mask(tracking_uri)
    if not tracking_uri.strip():
        raise TrackingError("the tracking URI is empty; give one such as sqlite:///mlflow.db "
                            "or http://HOST:5000")
    if ("://" not in tracking_uri or tracking_uri.startswith("file:")) and not (
            tracking_uri.startswith(("sqlite:", "databricks")) or MLFLOW_ALLOW_FILE_STORE.get()):
        raise TrackingError(f"tracking store {shown} is a folder: MLflow 3 no longer writes "
                            "its file store; use sqlite:///mlflow.db or an MLflow server")
    interrupts.shield_store_calls(not tracking_uri.startswith(("http://", "https://")))
    if tracking_uri.startswith(("http://", "https://")):
        try:
            tracking_uri, user, password = redact.split_credentials(tracking_uri)
        except ValueError as err:  # urllib: "Invalid IPv6 URL", a bad port
            raise TrackingError(f"tracking URI {shown} is malformed ({err})") from None
        if user:
            os.environ["MLFLOW_TRACKING_USERNAME"] = user
        if password is not None:
            os.environ["MLFLOW_TRACKING_PASSWORD"] = password
        mlflow.set_tracking_uri(tracking_uri)
        _check_server(tracking_uri, shown)
        return
    if tracking_uri.startswith("sqlite:"):
        _check_sqlite_file(tracking_uri, shown, existing)
    elif "://" in tracking_uri and not tracking_uri.startswith(("file:", "databricks")):
        _check_database_server(tracking_uri, shown)
    mlflow.set_tracking_uri(tracking_uri)
    if "://" in tracking_uri:
        with store_lock(tracking_uri):
            if tracking_uri.startswith("sqlite:"):
                _start_from_template(tracking_uri)
            try:
                MlflowClient().search_experiments(max_results=1)  # creates or migrates tables
            except Exception as err:  # SQLAlchemy and MLflow raise many kinds here
                raise TrackingError(
                    f"tracking store {shown} cannot be used: {redact.mask(first_line(err))}"
                ) from None


def _start_from_template(uri: str) -> None:
    """A new sqlite store starts as a copy of an empty one that MLflow created and migrated
    before (kept per MLflow version in the user's cache), instead of MLflow running its dozens
    of migrations again: 0.05 s instead of 0.75 s for every first command in a folder. The
    copy holds tables only; MLflow adds the Default experiment, with this store's artifact
    root, as it would. Anything unusual (another file there, no cache folder, a private MLflow
    function gone) leaves the store to MLflow."""
    path = Path(uri.split(":///", 1)[-1]) if ":///" in uri else None
    if path is None or path.exists():
        return
    try:
        import shutil

        import filelock
        import sqlalchemy
        from mlflow.store.db.utils import _initialize_tables

        home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        template = home / "pipeline" / f"mlflow-{mlflow.__version__}-empty.db"
        template.parent.mkdir(parents=True, exist_ok=True)
        with filelock.FileLock(f"{template}.lock"):
            if not template.exists():
                partial = template.with_suffix(f".{os.getpid()}.partial")
                engine = sqlalchemy.create_engine(f"sqlite:///{partial}")
                try:
                    _initialize_tables(engine)
                finally:
                    engine.dispose()
                os.replace(partial, template)
        shutil.copyfile(template, path)
    except Exception:  # noqa: BLE001  (MLflow then creates the store itself)
        return


def _check_server(url: str, shown: str) -> None:
    import requests

    try:
        requests.get(url.rstrip("/") + "/health", timeout=HEALTH_TIMEOUT_S).raise_for_status()
    except requests.HTTPError as err:
        raise TrackingError(f"{shown} answered HTTP {err.response.status_code} to /health; "
                            "is it an MLflow tracking server?") from None
    except requests.RequestException as err:
        reason = type(err).__name__
        raise TrackingError(f"tracking server {shown} is not reachable ({reason})") from None
    # A server can be healthy and still fail every request (its own store broken, full or
    # locked; credentials refused). One real request, tried once: MLflow would retry it with
    # backoff for minutes before saying so.
    try:
        answer = requests.get(url.rstrip("/") + "/api/2.0/mlflow/experiments/search",
                              params={"max_results": 1}, timeout=HEALTH_TIMEOUT_S,
                              **_request_credentials())
    except requests.RequestException as err:
        reason = type(err).__name__
        raise TrackingError(f"tracking server {shown} is not reachable ({reason})") from None
    if not answer.ok:
        raise TrackingError(f"tracking server {shown} answered HTTP {answer.status_code} to "
                            f"a search for experiments: {redact.mask(_server_message(answer))}")
    try:
        body = answer.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):  # a web server answering every path with a page
        raise TrackingError(f"tracking server {shown} answered a search for experiments with "
                            "something other than MLflow's JSON; is it an MLflow tracking "
                            "server?")


def _request_credentials() -> dict:
    """What MLflow would send to a server: basic auth or a token, and its TLS settings."""
    env = os.environ
    options: dict = {}
    if user := env.get("MLFLOW_TRACKING_USERNAME"):
        options["auth"] = (user, env.get("MLFLOW_TRACKING_PASSWORD", ""))
    elif token := env.get("MLFLOW_TRACKING_TOKEN"):
        options["headers"] = {"Authorization": f"Bearer {token}"}
    if env.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        options["verify"] = False
    elif cert := env.get("MLFLOW_TRACKING_SERVER_CERT_PATH"):
        options["verify"] = cert
    return options


def _server_message(answer) -> str:
    """An MLflow error's own message, else the first line of what the server sent."""
    try:
        message = answer.json().get("message")
    except (ValueError, AttributeError):
        message = None
    text = str(message or answer.text).strip() or answer.reason or "no message"
    return text.splitlines()[0][:200]


def _check_database_server(uri: str, shown: str) -> None:
    """A database server (PostgreSQL, MySQL) that does not take connections, in seconds: MLflow
    would retry for about 100 s, printing a warning a try."""
    import socket

    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(uri)
    except (ArgumentError, ValueError) as err:
        raise TrackingError(f"tracking URI {shown} is malformed ({first_line(err)})") from None
    if not url.host:
        return  # a local socket, or a driver's own way of naming the server
    default = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}.get(url.get_backend_name())
    if (port := url.port or default) is None:
        return
    try:
        socket.create_connection((url.host, port), timeout=HEALTH_TIMEOUT_S).close()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        # The host as the URL's last "@" gives it: a password may hold "@" (SQLAlchemy's
        # parser splits at the first, and would show a piece of the password as the host).
        host = uri.rpartition("@")[2].split("/")[0].split("?")[0].rpartition(":")[0] if (
            "@" in uri) else url.host
        where = redact.scrub(f"{host or url.host}:{port}", uri)
        raise TrackingError(f"tracking store {shown} is not reachable "
                            f"({where}: {reason.lower()})") from None
    _check_login(uri, shown)


def _check_login(uri: str, shown: str) -> None:
    """One connection, tried once: a wrong password or an unknown user is named at once (MLflow
    would retry for about 100 s). A database not made yet is MLflow's to create."""
    import sqlalchemy
    from sqlalchemy.exc import OperationalError
    from sqlalchemy.pool import NullPool

    try:
        engine = sqlalchemy.create_engine(uri, poolclass=NullPool)
    except Exception:  # noqa: BLE001  (a missing driver: MLflow names it, see connect)
        return
    try:
        engine.connect().close()
    except OperationalError as err:
        reason = " ".join(str(err.orig or err).split())  # psycopg's message spans lines
        if "does not exist" in reason and "database" in reason:
            return
        raise TrackingError(f"tracking store {shown} refuses the connection: "
                            f"{redact.scrub(reason, uri)[:300]}") from None
    except Exception:  # noqa: BLE001  (anything else: MLflow's own checks say it)
        return
    finally:
        engine.dispose()


def _check_sqlite_file(uri: str, shown: str, existing: bool = False) -> None:
    """Refuse what SQLite would fail on only after minutes of MLflow's retries."""
    # sqlite:///relative.db and sqlite:////absolute.db; sqlite:// alone is in memory.
    name = uri.partition(":///")[2].partition("?")[0]
    if name in ("", ":memory:"):
        raise TrackingError(f"tracking store {shown} is a database in memory: nothing would be "
                            "kept; give a file, e.g. sqlite:///mlflow.db")
    path = Path(name).absolute()
    folder = path.parent
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() or _under_a_file(folder) else "does not exist"
        raise TrackingError(f"tracking store {shown}: {folder} {what}")
    if path.exists():
        if not path.is_file():
            raise TrackingError(f"tracking store {shown}: {path} is not a file")
        try:  # a command that only reads needs only to read it
            with open(path, "rb" if existing else "r+b") as handle:
                header = handle.read(len(SQLITE_HEADER))
        except OSError as err:
            raise TrackingError(f"tracking store {shown}: cannot {'read' if existing else 'write'}"
                                f" {path} ({err.strerror.lower()})") from None
        if header and header != SQLITE_HEADER:
            raise TrackingError(f"tracking store {shown}: {path} is not an SQLite database "
                                "(corrupt, or another kind of file)")
        return
    if existing:
        raise TrackingError(f"tracking store {shown}: there is no {path}, so nothing was "
                            "tracked there; give --tracking-uri (or MLFLOW_TRACKING_URI) to "
                            "read another store")
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
    # One lock per user: another user's lock file would not be writable here.
    user = os.getuid() if hasattr(os, "getuid") else os.getlogin()
    with filelock.FileLock(Path(tempfile.gettempdir()) / f"pipeline-store-{user}-{digest}.lock"):
        yield


@interrupts.shielded
def experiment_name(experiment: str) -> str:
    return MlflowClient().get_experiment(experiment).name


EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # the UI's training view


@interrupts.shielded
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
        # The first line, and not all of it: a web server that is not MLflow's answers with
        # a whole HTML page, which MLflow quotes.
        reason = redact.mask(first_line(err))
        reason = reason if len(reason) <= 200 else reason[:200] + "..."
        raise TrackingError(f"tracking store refused experiment {name!r}: {reason}") from None
