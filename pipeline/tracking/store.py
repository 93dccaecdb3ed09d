"""Tracking stores: reaching one, checking it, creating its tables once, and experiments.

:func:`connect` answers a bad store in one line before MLflow's minutes of retries (the
checks are in :mod:`.checks`). A fresh database store is created under a lock, so several
first commands at once all succeed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import mlflow
from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline import interrupts, lifetime, redact
from pipeline.errors import UserError, first_line
from pipeline.tracking.checks import (  # noqa: F401  (two constants re-exported)
    HEALTH_TIMEOUT_S,
    SQLITE_HEADER,
    TrackingError,
    check_database_server,
    check_server,
    check_sqlite_file,
)

NOTE = "mlflow.note.content"  # what the UI shows as an experiment's or a run's description


def store_error(err: Exception) -> UserError | None:
    """An error MLflow raised as one line for the user (password masked); None for others."""
    if not isinstance(err, MlflowException):
        return None
    message = first_line(err)
    # A REST call answered by something else than an MLflow server: its page, cut short.
    call, said, body = message.partition(". Response body: ")
    if said and body.lstrip("'\" ").startswith("<"):
        message = f"{call} (the answer is a web page: is an MLflow server at that address?)"
    return UserError(f"tracking store error: {redact.mask(message)[:300]}")


def scheme_lowered(uri: str) -> str:
    """``uri`` with its scheme in lower case, as MLflow and SQLAlchemy read it (``HTTP://``
    is a server, not a database)."""
    scheme, found, rest = uri.partition("://")
    return f"{scheme.lower()}{found}{rest}" if found else uri


def check_store(tracking_uri: str, existing: bool = False) -> str:
    """Refuse, in one line, a tracking store that cannot be used, creating nothing: an empty
    URI, a folder (MLflow's file store), a server that does not answer, an SQLite file that
    cannot be one, a database server that takes no connections. Returns the URI MLflow is to
    be given: credentials in an ``http(s)`` URI move to MLflow's environment variables, so
    that MLflow never prints them (in its "View run" links, were they shown)."""
    tracking_uri = scheme_lowered(tracking_uri)
    shown = redact.mask(tracking_uri)
    if not tracking_uri.strip():
        raise TrackingError("the tracking URI is empty; give one such as sqlite:///mlflow.db "
                            "or http://HOST:5000")
    if ("://" not in tracking_uri or tracking_uri.startswith("file:")) and not (
            tracking_uri.startswith(("sqlite:", "databricks")) or MLFLOW_ALLOW_FILE_STORE.get()):
        if re.match(r"(?!file:)[a-z][a-z0-9+.-]*:(?!//)", tracking_uri, re.I):
            # A scheme with no store behind it here: uc:databricks, a registry's URI
            raise TrackingError(f"tracking URI {shown} names no tracking store; use "
                                "sqlite:///mlflow.db or http://HOST:5000")
        raise TrackingError(f"tracking URI {shown} names a folder, MLflow's file store, which "
                            "MLflow 3 no longer writes; use sqlite:///mlflow.db or an MLflow "
                            "server")
    if tracking_uri.startswith(("http://", "https://")):
        try:
            tracking_uri, user, password = redact.split_credentials(tracking_uri)
        except ValueError as err:  # urllib: "Invalid IPv6 URL", a bad port
            raise TrackingError(f"tracking URI {shown} is malformed ({err})") from None
        if user:
            os.environ["MLFLOW_TRACKING_USERNAME"] = user
        if password is not None:
            os.environ["MLFLOW_TRACKING_PASSWORD"] = password
        check_server(tracking_uri, shown)
    elif tracking_uri.startswith("sqlite:"):
        check_sqlite_file(tracking_uri, shown, existing)
    elif "://" in tracking_uri and not tracking_uri.startswith(("file:", "databricks")):
        check_database_server(tracking_uri, shown)
    return tracking_uri


def connect(tracking_uri: str, existing: bool = False) -> None:
    """Point MLflow at ``tracking_uri`` and make sure the store is usable, in one line if not
    (:func:`check_store`). ``existing``: the command only reads, so a sqlite file that is not there
    is an error, not a new store.

    A database store is migrated here, once, under a lock, so that several processes starting
    on a fresh store do not race to create its tables.
    """
    lifetime.settle()  # torch and MLflow are imported by now (see pipeline.lifetime)
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # MLflow logs a database error's whole traceback before raising it, which the command
    # then reports in one line (a full disk, a store locked too long, a read-only one).
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    # Progress bars for a few small artifacts are noise on stderr; a server's "View run" and
    # "View experiment" links, two lines per run (a hundred trials: two hundred), are noise
    # on stdout, where commands print what scripts read. Each command says where to look.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    tracking_uri = scheme_lowered(tracking_uri)
    shown = redact.mask(tracking_uri)
    remote = tracking_uri.startswith(("http://", "https://"))
    interrupts.shield_store_calls(not remote)
    tracking_uri = check_store(tracking_uri, existing)
    mlflow.set_tracking_uri(tracking_uri)
    if "://" in tracking_uri and not remote:
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
    root, as it would. Anything unusual (another file there, a query in the URI, no cache
    folder, a private MLflow function gone) leaves the store to MLflow."""
    # A query (`?mode=ro`...) is the driver's to read: no copy, under any name.
    path = Path(uri.split(":///", 1)[-1]) if ":///" in uri and "?" not in uri else None
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
            if template.exists() and not _whole(template):  # cut short (a full disk)
                template.unlink()
            if not template.exists():
                partial = template.with_suffix(f".{os.getpid()}.partial")
                engine = sqlalchemy.create_engine(f"sqlite:///{partial}")
                try:
                    _initialize_tables(engine)
                finally:
                    engine.dispose()
                os.replace(partial, template)
        # Copied whole or not at all: a copy cut short by a full disk or kill -9 would stay
        # a "malformed" store after the space came back.
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            shutil.copyfile(template, partial)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
    except Exception:  # noqa: BLE001  (MLflow then creates the store itself)
        return


def _whole(database: Path) -> bool:
    """Whether an SQLite file reads as a whole database (an empty store: milliseconds)."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
            return db.execute("pragma quick_check").fetchone() == ("ok",)
    except sqlite3.Error:
        return False


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
            # As mlflow.set_experiment refuses it: restoring would bring back every run of it,
            # those deleted one by one before too.
            number = found.experiment_id
            raise TrackingError(
                f"experiment {name!r} is deleted in this store: restore it (`mlflow experiments "
                f"restore --experiment-id {number}`), or remove it for good (`mlflow gc "
                f"--experiment-ids {number}`) to start it anew")
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


def filter_value(text: str) -> str:
    """``text`` as a string in an MLflow search filter: in single quotes, or in double quotes
    where it holds a single one (the filters have no escapes), so a model named ``it's`` is
    found too."""
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text:
        return f'"{text}"'
    raise UserError(f"{text!r} holds both kinds of quote, which MLflow's searches cannot match; "
                    "rename it")
