"""What is checked before MLflow sees a tracking URI: a server that does not answer, answers
something else, or fails every request; a database server that takes no connection or refuses
the login; a sqlite file under a file, in a missing or read-only folder, corrupt or truncated,
or another program's database.
Each is one line in seconds, where MLflow would retry for minutes.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from pipeline import redact
from pipeline.errors import UserError, first_line

HEALTH_TIMEOUT_S = 5
SQLITE_HEADER = b"SQLite format 3\x00"


class TrackingError(UserError):
    """The tracking store cannot be reached or refuses a request."""


def check_server(url: str, shown: str) -> None:
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
    """What MLflow would send to a server: basic auth or a token, and its TLS settings. The
    probe is a plain request because MLflow's own, told not to retry, drops the server's
    message and keeps only "too many 500 error responses"."""
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


def check_database_server(uri: str, shown: str) -> None:
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


def check_sqlite_file(uri: str, shown: str, existing: bool = False) -> None:
    """Refuse what SQLite would fail on only after minutes of MLflow's retries."""
    # sqlite:///relative.db and sqlite:////absolute.db; sqlite:// alone is in memory.
    name, _, query = uri.partition(":///")[2].partition("?")
    # SQLite's own URI parameters (mode=ro, uri=true): without a file: path the query becomes
    # part of the file's name ("mlflow.db?mode=ro") or is dropped with a warning, and with
    # one MLflow makes a folder named "file:". Neither is what was asked for.
    keys = {part.partition("=")[0].lower() for part in query.split("&") if part}
    if keys & {"mode", "uri"}:
        raise TrackingError(f"tracking store {shown}: MLflow's SQLite store takes no SQLite URI "
                            "parameters (mode=, uri=); give the file alone, e.g. "
                            "sqlite:///mlflow.db")
    if name in ("", ":memory:"):
        raise TrackingError(f"tracking store {shown} is a database in memory: nothing would be "
                            "kept; give a file, e.g. sqlite:///mlflow.db")
    path = Path(name).absolute()
    folder = path.parent
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() or _under_a_file(folder) else "does not exist"
        raise TrackingError(f"tracking store {shown}: {folder} {what}")
    if path.is_symlink() and not path.exists():  # SQLite would fail on it after minutes
        raise TrackingError(f"tracking store {shown}: {path} is a link to "
                            f"{os.readlink(path)}, which does not exist")
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
        if others := _foreign_tables(path):
            # MLflow would add its tables beside another program's.
            raise TrackingError(f"tracking store {shown}: {path} is another program's SQLite "
                                f"database (tables {', '.join(others[:3])}"
                                f"{', ...' if len(others) > 3 else ''}), not an MLflow store; "
                                "give another file")
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


def _foreign_tables(path: Path) -> list[str]:
    """The tables of a SQLite file that holds some but not MLflow's (``experiments``, ``runs``;
    an Optuna storage has an ``alembic_version`` too); nothing where it cannot tell (locked,
    damaged: MLflow says)."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True,
                                                timeout=1)) as db:
            tables = [name for (name,) in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
    except sqlite3.Error:
        return []
    return [] if not tables or {"experiments", "runs"} & set(tables) else tables


def _under_a_file(folder: Path) -> bool:
    return any(parent.is_file() for parent in (folder, *folder.parents))
