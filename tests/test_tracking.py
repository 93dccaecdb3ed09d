"""The tracking layer: stores that cannot be used say so in one line; first use by many
processes at once; passwords kept out of the store and off the screen."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline import redact
from pipeline.cli import cli
from tests.conftest import run_statuses, subprocess_env


@pytest.mark.parametrize(
    "url, shown",
    [
        ("postgresql://optuna:s3cret@db:5432/optuna", "postgresql://optuna:***@db:5432/optuna"),
        ("http://me:p%40ss@127.0.0.1:5000", "http://me:***@127.0.0.1:5000"),
        ("could not connect to postgresql+psycopg://u:pw@h/db: refused",
         "could not connect to postgresql+psycopg://u:***@h/db: refused"),
        ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
        # Drivers take "/" and "@" in a password unescaped, and a password as a parameter.
        ("postgresql://u:s3c/ret@127.0.0.1:1/db", "postgresql://u:***@127.0.0.1:1/db"),
        ("'http://u:s3c@ret@127.0.0.1:1' refused", "'http://u:***@127.0.0.1:1' refused"),
        ("postgresql://optuna@h/optuna?sslmode=require&password=s3cret",
         "postgresql://optuna@h/optuna?sslmode=require&password=***"),
        ("http://user@host/path", "http://user@host/path"),
        ("cannot open postgresql://bob:hun ter2@127.0.0.1:1/db: refused",
         "cannot open postgresql://bob:***@127.0.0.1:1/db: refused"),
        # A quoted URL's password ends inside its quotes: a host:port is no user:password.
        ("model URI 'http://127.0.0.1:9/m' does not parse; use models:/NAME@ALIAS",
         "model URI 'http://127.0.0.1:9/m' does not parse; use models:/NAME@ALIAS"),
        ("\"postgresql://u:pa'ss@h/db\" refused, see x@y", "\"postgresql://u:***@h/db\" refused, "
                                                        "see x@y"),
        # A quote in the password, the URL quoted by hand: masked to the line's last "@".
        ("'postgresql://u:pa'ss@h/db' refused", "'postgresql://u:***@h/db' refused"),
        ("'postgresql://u:pa' ss@h/db' refused", "'postgresql://u:***@h/db' refused"),
    ],
)
def test_mask_hides_passwords_only(url, shown):
    assert redact.mask(url) == shown


@pytest.mark.parametrize("password", ["x@hunter2/y", "p@ss w/rd%", "se@cret"])
def test_a_store_that_is_not_reachable_names_no_piece_of_the_password(password):
    # SQLAlchemy splits the URL at the first "@": the driver's error quoted the rest as a host.
    uri = f"postgresql://bob:{password}@db.invalid:5432/db"
    result = CliRunner().invoke(cli, ["models", "--tracking-uri", uri])
    assert result.exit_code == 1
    assert result.stderr == ("Error: tracking store postgresql://bob:***@db.invalid:5432/db is "
                             "not reachable (db.invalid:5432: name or service not known)\n")
    storage = subprocess.run(
        [sys.executable, "-m", "pipeline", "sweep", "-e", "slope_only", "--storage",
         f"postgresql://bob:{password}@127.0.0.1:1/db"], capture_output=True, text=True,
        env=subprocess_env(), timeout=120)
    for piece in {password, *password.replace("@", " ").replace("/", " ").split()}:
        if len(piece) >= 4:  # shorter ones are in ordinary words ("se" in "service")
            assert piece not in result.stderr + storage.stderr


@pytest.mark.parametrize("url, portable", [
    ("postgresql://optuna:s3cret@db:5432/mlflow", "postgresql://optuna@db:5432/mlflow"),
    ("postgresql://optuna@db/mlflow?password=s3cret", "postgresql://optuna@db/mlflow"),
    ("postgresql://db/m?password=s3cret&sslmode=require", "postgresql://db/m?sslmode=require"),
    ("http://me:p%40ss@127.0.0.1:5000", "http://me@127.0.0.1:5000"),
    ("sqlite:////abs/mlflow.db", "sqlite:////abs/mlflow.db"),
])
def test_the_uri_workers_read_keeps_the_user_but_no_password(url, portable):
    # A worker elsewhere connects as that user, its password from PGPASSWORD or ~/.pgpass;
    # without the user it tried the machine's login name.
    from pipeline import tracking

    assert tracking.portable_uri(url) == portable


def test_split_credentials_takes_user_and_password_out():
    assert redact.split_credentials("https://me:p%40ss@mlflow.example:8443/x") == (
        "https://mlflow.example:8443/x", "me", "p@ss")
    assert redact.split_credentials("http://127.0.0.1:5000") == (
        "http://127.0.0.1:5000", None, None)


def one_line_failure(args: list[str], expected: str) -> None:
    result = CliRunner().invoke(cli, args)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert len(lines) == 1 and expected in lines[0], result.stderr


def test_store_under_a_file_is_refused(workdir):
    (workdir / "file").write_text("x")
    one_line_failure(["run", "-e", "line_fit_15pts", "--tracking-uri",
                      f"sqlite:///{workdir / 'file' / 'mlflow.db'}"], "is not a folder")


def test_store_in_a_missing_folder_is_refused(workdir):
    one_line_failure(["run", "-e", "line_fit_15pts", "--tracking-uri",
                      f"sqlite:///{workdir / 'nowhere' / 'mlflow.db'}"], "does not exist")


def command(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """The command in its own process: MLflow caches a store per URI, and sqlite:///mlflow.db
    in one test's folder would be another's in this process."""
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=workdir,
                          capture_output=True, text=True, env=subprocess_env(), timeout=120)


def test_store_that_is_a_broken_link_is_refused(workdir):
    # An unmounted share, say: SQLite could not create the file, after minutes of retries.
    (workdir / "mlflow.db").symlink_to(workdir / "unmounted" / "mlflow.db")
    one_line_failure(["run", "-e", "line_fit_15pts"],
                     f"is a link to {workdir / 'unmounted' / 'mlflow.db'}, which does not exist")


def test_a_store_damaged_where_runs_write_is_one_line(workdir):
    # The header and the runs table are whole, the first page of metrics is not: the damage
    # shows only when a run logs its curve. MLflow logs the error's traceback, and SQLAlchemy
    # puts a line on autoflush before the cause.
    import sqlite3

    assert command(workdir, "run", "-e", "line_fit_15pts").returncode == 0
    with sqlite3.connect(workdir / "mlflow.db") as connection:
        size = connection.execute("pragma page_size").fetchone()[0]
        [page] = connection.execute("select pageno from dbstat where name = 'metrics' "
                                    "order by pageno limit 1").fetchone()
    with open(workdir / "mlflow.db", "r+b") as handle:
        handle.seek((page - 1) * size)
        handle.write(b"\xff" * 64)
    result = command(workdir, "run", "-e", "line_fit_15pts")
    assert result.returncode == 1
    assert result.stderr.strip() == ("Error: tracking store error: (sqlite3.DatabaseError) "
                                     "database disk image is malformed")


def test_an_artifact_folder_that_cannot_be_written_is_one_line(workdir):
    # `mlruns` a file (or read-only, or on a full disk): the stage's run ends FAILED.
    assert command(workdir, "generate", "-e", "slope_only").returncode == 0
    shutil.rmtree(workdir / "mlruns")
    (workdir / "mlruns").write_text("")
    result = command(workdir, "run", "-e", "line_fit_15pts")
    assert result.returncode == 1
    assert result.stderr.strip().startswith("Error: not a directory: ")
    assert len(result.stderr.strip().splitlines()) == 1
    assert "RUNNING" not in run_statuses(workdir / "mlflow.db")


@pytest.mark.parametrize("path", ["m.db", "file:m.db"])
@pytest.mark.parametrize("query", ["?mode=ro&uri=true", "?mode=ro", "?uri=true"])
def test_sqlite_uri_parameters_are_refused(workdir, path, query):
    # SQLite would make a file named "m.db?mode=ro", or drop the mode; MLflow, given a file:
    # path, makes a folder named "file:".
    one_line_failure(["run", "-e", "line_fit_15pts", "--tracking-uri",
                      f"sqlite:///{path}{query}"],
                     "MLflow's SQLite store takes no SQLite URI parameters (mode=, uri=)")
    assert list(workdir.iterdir()) == []


def test_corrupt_store_is_refused(workdir):
    (workdir / "mlflow.db").write_bytes(b"this is not a database" * 100)
    one_line_failure(["run", "-e", "line_fit_15pts"], "is not an SQLite database")


@pytest.mark.parametrize("kind", ["app", "optuna"])
def test_another_programs_database_is_refused_and_left_as_it_was(workdir, kind):
    import sqlite3

    import optuna

    path = workdir / "mlflow.db"
    if kind == "optuna":  # Optuna's tables, alembic_version among them
        optuna.create_study(storage=f"sqlite:///{path}")
    else:
        with sqlite3.connect(path) as db:
            db.execute("CREATE TABLE orders (id INTEGER)")
    with sqlite3.connect(path) as db:
        before = sorted(name for (name,) in db.execute("SELECT name FROM sqlite_master"))
    one_line_failure(["run", "-e", "line_fit_15pts"], "is another program's SQLite database")
    with sqlite3.connect(path) as db:
        assert sorted(name for (name,) in db.execute("SELECT name FROM sqlite_master")) == before


def test_a_deleted_experiment_is_not_brought_back_with_its_deleted_runs(workdir, store):
    from mlflow import MlflowClient

    assert CliRunner().invoke(cli, ["train", "-e", "line_fit_15pts", "--tracking-uri",
                                    store]).exit_code == 0
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("line_fit_15pts").experiment_id
    [run] = client.search_runs([experiment])
    client.delete_run(run.info.run_id)  # deleted on purpose, then the whole experiment
    client.delete_experiment(experiment)
    one_line_failure(["train", "-e", "line_fit_15pts", "--tracking-uri", store],
                     f"experiment 'line_fit_15pts' is deleted in this store: restore it "
                     f"(`mlflow experiments restore --experiment-id {experiment}`)")
    assert client.get_experiment(experiment).lifecycle_stage == "deleted"
    assert client.get_run(run.info.run_id).info.lifecycle_stage == "deleted"


def test_truncated_store_is_refused_and_left_as_it_was(workdir, store):
    result = CliRunner().invoke(cli, ["run", "-e", "line_fit_15pts", "--tracking-uri", store])
    assert result.exit_code == 0, result.output
    whole = (workdir / "mlflow.db").read_bytes()
    (workdir / "mlflow.db").write_bytes(whole[: len(whole) // 3])
    one_line_failure(["run", "-e", "line_fit_15pts", "--tracking-uri", store], "cannot be used")
    assert len((workdir / "mlflow.db").read_bytes()) == len(whole) // 3


def _read_only(source, command: str) -> subprocess.CompletedProcess:
    """Run ``command`` inside a read-only bind mount of ``source`` (root cannot be stopped by
    file modes, but a read-only mount stops everyone)."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare")
    mount = source.parent / "read-only"
    mount.mkdir()
    script = (f"mount --bind {source} {mount} && mount -o remount,ro,bind {mount} && "
              f"cd {mount} && {command}")
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True,
                            text=True, timeout=120, env=subprocess_env())
    if "mount:" in result.stderr or "unshare:" in result.stderr:
        pytest.skip(f"cannot make a read-only mount here: {result.stderr.strip()}")
    return result


@pytest.mark.parametrize("with_store", [False, True])
def test_read_only_folder_or_store_fails_at_once(tmp_path, with_store):
    source = tmp_path / "work"
    source.mkdir()
    if with_store:
        made = subprocess.run([sys.executable, "-m", "pipeline", "generate", "-e",
                               "line_fit_15pts"], cwd=source, capture_output=True, text=True,
                              env=subprocess_env(), timeout=120)
        assert made.returncode == 0, made.stderr
    result = _read_only(source, f"{sys.executable} -m pipeline run -e line_fit_15pts")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert ("cannot write" if with_store else "cannot create") in lines[0]
    assert "read-only file system" in lines[0]


def test_four_first_runs_at_once_all_succeed(workdir):
    processes = [
        subprocess.Popen([sys.executable, "-m", "pipeline", "run", "-e", "line_fit_15pts"],
                         cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=subprocess_env())
        for _ in range(4)
    ]
    outcomes = [(p.wait(timeout=300), p.stderr.read()) for p in processes]
    assert [code for code, _ in outcomes] == [0, 0, 0, 0], outcomes
    statuses = run_statuses(workdir / "mlflow.db")
    assert set(statuses) == {"FINISHED"}
    # Four parents, four trainings, four evaluations, and the generate runs (one or more).
    assert 13 <= len(statuses) <= 16


def test_system_metrics_are_logged_while_the_block_runs(store):
    import time

    from mlflow import MlflowClient

    from pipeline import tracking

    tracking.connect(store)
    experiment = tracking.experiment_id("machine", "a description")
    with tracking.run(experiment, "busy") as run_id:
        with tracking.system_metrics(run_id):
            time.sleep(2 * tracking.SYSTEM_METRICS_S + 0.5)
    client = MlflowClient()
    run = client.get_run(run_id)
    assert {"system/cpu_utilization_percentage",
            "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    assert len(client.get_metric_history(run.info.run_id,
                                         "system/cpu_utilization_percentage")) >= 2
    # A block shorter than one interval still leaves one sample.
    with tracking.run(experiment, "brief") as brief:
        with tracking.system_metrics(brief):
            pass
    assert "system/cpu_utilization_percentage" in client.get_run(brief).data.metrics
    tags = client.get_experiment(experiment).tags
    assert tags["mlflow.note.content"] == "a description"
    assert tags["mlflow.experimentKind"] == "custom_model_development"


def test_a_new_store_from_the_template_is_mlflows_own(workdir, monkeypatch, tmp_path):
    """The cached empty store is copied, and MLflow adds its Default experiment with this
    folder's artifact root, as when it builds a store itself."""
    from mlflow import MlflowClient

    from pipeline import tracking

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for name in ("first.db", "second.db"):  # the first builds the template, the second copies
        tracking.connect(f"sqlite:///{workdir / name}")
        [default] = MlflowClient().search_experiments()
        assert default.name == "Default"
        assert default.artifact_location.startswith(str(workdir))
    assert list((tmp_path / "cache" / "pipeline").glob("mlflow-*-empty.db"))


def test_a_template_cut_short_is_built_again(workdir, monkeypatch, tmp_path):
    # A full disk (or kill -9) while the template was written: every new store copied from
    # it would be "malformed".
    from mlflow import MlflowClient

    from pipeline import tracking

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    tracking.connect(f"sqlite:///{workdir / 'first.db'}")
    [template] = (tmp_path / "cache" / "pipeline").glob("mlflow-*-empty.db")
    whole = template.read_bytes()
    template.write_bytes(whole[:len(whole) // 2])
    tracking.connect(f"sqlite:///{workdir / 'second.db'}")
    assert [e.name for e in MlflowClient().search_experiments()] == ["Default"]
    from pipeline.tracking import store

    assert store._whole(template) and len(template.read_bytes()) == len(whole)
    assert sorted(p.name for p in workdir.glob("*.db*")) == ["first.db", "second.db"]


def test_a_sqlite_uri_with_a_query_is_left_to_mlflow(workdir, monkeypatch, tmp_path):
    # No template copied to a file named after the whole URI ("store.db?mode=ro", or one
    # carrying a password given in the query).
    from pipeline.tracking import store

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    store._start_from_template(f"sqlite:///{workdir / 'store.db'}?password=s3cret")
    assert list(workdir.iterdir()) == []


def test_a_run_interrupted_mid_read_is_closed_killed(store):
    # A signal cutting into a store call leaves that call's SQLite read lock with the frames
    # of the traceback; closing the run KILLED must not wait on it ("database is locked").
    import signal
    import sqlite3

    from pipeline import interrupts, tracking

    tracking.connect(store)
    experiment = tracking.experiment_id("interrupted")

    def read_then_stop():
        reader = sqlite3.connect(store.removeprefix("sqlite:///"))
        rows = reader.execute("SELECT run_uuid FROM runs UNION ALL SELECT run_uuid FROM runs")
        rows.fetchone()  # a read in progress: SQLite holds a shared lock until it ends
        raise interrupts.Interrupted(signal.SIGTERM)

    with pytest.raises(interrupts.Interrupted):
        with tracking.run(experiment, "cut short") as run_id:
            read_then_stop()
    from mlflow.tracking import MlflowClient

    assert MlflowClient(store).get_run(run_id).info.status == "KILLED"


@pytest.fixture
def sigterm_stops(monkeypatch):
    """SIGTERM handled as `pipeline` commands handle it, in this process, state reset after."""
    import signal

    from pipeline import interrupts

    monkeypatch.setattr(interrupts, "_requested", None)
    monkeypatch.setattr(interrupts, "_held", None, raising=False)
    previous = signal.signal(signal.SIGTERM, interrupts.raise_interrupted)
    yield lambda: os.kill(os.getpid(), signal.SIGTERM)
    signal.signal(signal.SIGTERM, previous)


def _signal_around(monkeypatch, method: str, send, before: bool) -> None:
    from mlflow.tracking import MlflowClient

    original = getattr(MlflowClient, method)

    def call(self, *args, **kwargs):
        if before:
            send()
        result = original(self, *args, **kwargs)
        if not before:
            send()
        return result

    monkeypatch.setattr(MlflowClient, method, call)


def test_a_signal_as_a_run_is_created_stops_once_its_id_is_known(store, monkeypatch,
                                                                 sigterm_stops):
    from pipeline import interrupts, tracking

    tracking.connect(store)
    experiment = tracking.experiment_id("created")
    _signal_around(monkeypatch, "create_run", sigterm_stops, before=False)
    ran = []
    with pytest.raises(interrupts.Interrupted):
        with tracking.run(experiment, "stopped as it opens"):
            ran.append(True)
    assert ran == [] and run_statuses(Path(store.removeprefix("sqlite:///"))) == ["KILLED"]


def test_a_signal_as_a_run_ends_lets_its_status_be_written(store, monkeypatch, sigterm_stops):
    from pipeline import interrupts, tracking

    tracking.connect(store)
    experiment = tracking.experiment_id("ended")
    _signal_around(monkeypatch, "set_terminated", sigterm_stops, before=True)
    with pytest.raises(interrupts.Interrupted):
        with tracking.run(experiment, "stopped as it closes"):
            pass
    assert run_statuses(Path(store.removeprefix("sqlite:///"))) == ["FINISHED"]


def test_a_stop_a_finalizer_swallowed_ends_the_run_killed(store, monkeypatch, sigterm_stops):
    # After the last epoch (a model being exported, say) nothing checks for a stop until the
    # run ends: a signal landing in a weakref callback there must still end it KILLED.
    import signal
    import weakref

    from pipeline import interrupts, tracking

    tracking.connect(store)
    experiment = tracking.experiment_id("swallowed")
    monkeypatch.setattr(sys, "unraisablehook", interrupts._unraisable)  # as `pipeline` sets it

    class Thing:
        pass

    went_on = []
    with pytest.raises(interrupts.Interrupted) as stop:
        with tracking.run(experiment, "exporting"):
            thing = Thing()
            ref = weakref.ref(thing, lambda _: interrupts.raise_interrupted(signal.SIGTERM,
                                                                              None))
            del thing  # the handler raises inside the callback, and Python drops it
            went_on.append(ref() is None)
    assert went_on == [True] and stop.value.exit_code == 143
    assert run_statuses(Path(store.removeprefix("sqlite:///"))) == ["KILLED"]


def test_a_stop_a_finalizer_swallowed_prints_nothing(tmp_path):
    # Python would print "Exception ignored in ..." and a traceback for it; the command says
    # "interrupted" in one line when the stop is raised again.
    script = (
        "import signal, weakref\n"
        "from pipeline import interrupts\n"
        "interrupts.immediate()\n"
        "class Thing: pass\n"
        "thing = Thing()\n"
        "ref = weakref.ref(thing, lambda _: interrupts.raise_interrupted(signal.SIGINT, None))\n"
        "del thing\n"
        "print(int(interrupts.requested()))\n"
        "def fail(_): raise ValueError('other unraisables are still printed')\n"
        "other = Thing()\n"
        "ref = weakref.ref(other, fail)\n"
        "del other\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=subprocess_env(), cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "2"  # SIGINT
    assert "Interrupted" not in done.stderr and done.stderr.count("Exception ignored") == 1
    assert "other unraisables" in done.stderr  # only its own is left out


def test_a_store_write_finishes_before_the_stop_and_a_second_signal_is_at_once(
        store, monkeypatch, sigterm_stops):
    import signal

    from mlflow.tracking import MlflowClient

    from pipeline import interrupts, tracking

    tracking.connect(store)
    experiment = tracking.experiment_id("written")
    _signal_around(monkeypatch, "log_batch", sigterm_stops, before=True)
    with pytest.raises(interrupts.Interrupted):
        with tracking.run(experiment, "logging") as run_id:
            tracking.log_to_run(run_id, metrics={"m": 2.5})
    run = MlflowClient(store).get_run(run_id)
    assert run.data.metrics == {"m": 2.5} and run.info.status == "KILLED"
    with pytest.raises(interrupts.Interrupted):  # asked again: no waiting
        with interrupts.shield():
            interrupts.raise_interrupted(signal.SIGINT, None)
            pytest.fail("a second signal must not wait for the shielded block")


def test_a_stop_during_a_long_curve_waits_for_one_call_not_the_curve(store, monkeypatch,
                                                                       sigterm_stops):
    from mlflow.tracking import MlflowClient

    from pipeline import interrupts, tracking
    from pipeline.tracking import records

    tracking.connect(store)
    experiment = tracking.experiment_id("long curve")
    monkeypatch.setattr(records, "CURVE_CHUNK", 100)
    original, written = MlflowClient.log_batch, []

    def log_batch(self, run_id, *args, **kwargs):
        written.append(len(kwargs.get("metrics") or []))
        if len(written) == 2:
            sigterm_stops()  # during the second call
        return original(self, run_id, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", log_batch)
    with pytest.raises(interrupts.Interrupted):
        with tracking.run(experiment, "long curve") as run_id:
            tracking.log_curves(run_id, {"train_loss": [float(n) for n in range(1000)]})
    assert written == [100, 100]  # the call under way was finished, no other begun
    run = MlflowClient(store).get_run(run_id)
    assert run.info.status == "KILLED"
    assert len(MlflowClient(store).get_metric_history(run_id, "train_loss")) == 200


@pytest.mark.parametrize("uri, message", [
    ("sqlite://", "in memory"), ("sqlite:///:memory:", "in memory"),
    ("http://[::1", "malformed"),
])
def test_a_store_that_keeps_nothing_or_a_malformed_uri_is_refused(workdir, uri, message):
    result = CliRunner().invoke(cli, ["train", "-e", "line_fit_15pts", "--tracking-uri", uri])
    assert result.exit_code == 1 and message in result.output
    assert "Traceback" not in result.output


def test_a_web_page_in_place_of_mlflow_s_answer_is_one_short_line():
    # Another web server at the tracking URI's address: MLflow quotes its whole error page.
    from mlflow.exceptions import MlflowException

    from pipeline import tracking

    page = "<!DOCTYPE HTML>\n<html lang='en'>\n<head>" + "x" * 5000 + "</html>"
    err = MlflowException("API request to endpoint /api/2.0/mlflow/runs/log-batch failed "
                          f"with error code 501 != 200. Response body: '{page}'")
    message = tracking.store_error(err).message
    assert message == ("tracking store error: API request to endpoint "
                       "/api/2.0/mlflow/runs/log-batch failed with error code 501 != 200 (the "
                       "answer is a web page: is an MLflow server at that address?)")
    long = tracking.store_error(MlflowException("no such run " + "y" * 1000)).message
    assert len(long) == len("tracking store error: ") + 300 and "\n" not in long
    assert tracking.store_error(ValueError("not MLflow's")) is None
