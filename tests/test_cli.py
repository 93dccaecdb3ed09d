"""End to end through the real `pipeline` command and a real MLflow sqlite store."""

from __future__ import annotations

import io
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from pipeline import config, data
from pipeline.cli import cli
from tests.conftest import REPO, free_port, run_statuses, subprocess_env

TUTORIALS = ["line_fit_15pts", "crop_yields_manual", "crop_yields_builtin", "line_2x_plus_1",
             "slope_only", "relu_line"]


def invoke(store: str, *args: str):
    result = CliRunner().invoke(cli, [*args, "--tracking-uri", store])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def runs_of(store: str, experiment: str) -> dict[str, list]:
    """Runs of one experiment grouped by their `stage` tag."""
    mlflow.set_tracking_uri(store)
    found = mlflow.get_experiment_by_name(experiment)
    grouped: dict[str, list] = {}
    for run in mlflow.search_runs([found.experiment_id], output_format="list"):
        grouped.setdefault(run.data.tags.get("stage"), []).append(run)
    return grouped


def history(store: str, run_id: str, key: str) -> list[float]:
    metrics = MlflowClient(store).get_metric_history(run_id, key)
    return [m.value for m in sorted(metrics, key=lambda m: m.step)]


def artifacts(store: str, run_id: str, folder: str) -> set[str]:
    return {a.path for a in MlflowClient(store).list_artifacts(run_id, folder)}


@pytest.mark.parametrize("name", TUTORIALS)
def test_run_records_everything_for_each_tutorial(store, name):
    invoke(store, "run", "-e", name)
    exp = config.load(name)
    runs = runs_of(store, name)
    assert {k: len(v) for k, v in runs.items()} == {
        "pipeline": 1, "generate": 1, "train": 1, "evaluate": 1}
    parent = runs["pipeline"][0]
    for stage in ("generate", "train", "evaluate"):
        run = runs[stage][0]
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.info.status == "FINISHED"

    train_run = runs["train"][0]
    params = train_run.data.params
    assert params["model"] == exp.train.model and float(params["lr"]) == exp.train.lr
    assert int(params["epochs"]) == exp.train.epochs and params["seed"] == str(exp.seed)
    assert {"batch_size", "device", "data.source"} <= set(params)
    assert train_run.data.tags["device"] == "cpu"
    assert train_run.data.tags["torch_version"].startswith("2.")
    expected_name = f"{exp.train.model} lr={exp.train.lr:g} epochs={exp.train.epochs}"
    assert train_run.info.run_name == expected_name
    curve = history(store, train_run.info.run_id, "train_loss")
    assert len(curve) == exp.train.epochs + 1 and curve[-1] < curve[0]
    expected_plots = {"plots/loss_curve.png"} | (
        {"plots/loss_surface.png"} if name == "slope_only" else set())
    assert artifacts(store, train_run.info.run_id, "plots") == expected_plots
    assert len(train_run.inputs.dataset_inputs) == 1

    evaluate_run = runs["evaluate"][0]
    metrics = evaluate_run.data.metrics
    assert {"mse", "rmse", "mae", "r2", "optimality_gap"} <= set(metrics)
    assert metrics["rmse"] == pytest.approx(np.sqrt(metrics["mse"]))
    assert metrics["mse"] == pytest.approx(curve[-1] if exp.train.loss == "mean"
                                           else curve[-1] / 40, rel=1e-4)
    assert artifacts(store, evaluate_run.info.run_id, "plots") == {"plots/fit.png"}

    model_uri = evaluate_run.data.tags["model_uri"]
    model = mlflow.pyfunc.load_model(model_uri)
    dataset = data.build(exp.data, exp.seed)
    features = model.metadata.get_input_schema().input_names()
    targets = model.metadata.get_output_schema().input_names()
    assert (features, targets) == (list(dataset.feature_names), list(dataset.target_names))
    module = mlflow.pytorch.load_model(model_uri)
    dtype = torch.float64 if exp.train.dtype == "float64" else torch.float32
    for count in (1, 10_000):
        rows = np.random.default_rng(count).random((count, len(features)))
        out = model.predict(pd.DataFrame(rows, columns=features)[features[::-1]])
        assert list(out.columns) == targets and out.shape == (count, len(targets))
        with torch.no_grad():
            direct = module(torch.tensor(rows, dtype=dtype)).double().numpy()
        np.testing.assert_allclose(out.to_numpy(), direct, rtol=1e-12)


def test_line_fit_curve_matches_the_tutorial(store):
    invoke(store, "run", "-e", "line_fit_15pts")
    train_run = runs_of(store, "line_fit_15pts")["train"][0]
    curve = history(store, train_run.info.run_id, "train_loss")
    assert curve[0] == pytest.approx(104.9967, rel=1e-4)
    assert curve[10] == pytest.approx(0.20337, rel=1e-4)


def test_line_2x_plus_1_fits_with_r2_above_0999(store):
    invoke(store, "run", "-e", "line_2x_plus_1")
    evaluate_run = runs_of(store, "line_2x_plus_1")["evaluate"][0]
    assert evaluate_run.data.metrics["r2"] > 0.999
    assert evaluate_run.data.metrics["weight_error"] < 0.05


def test_generate_reuses_identical_data_and_regenerates_changed_data(store):
    first = invoke(store, "generate", "-e", "slope_only").output.strip().splitlines()[-1]
    second = invoke(store, "generate", "-e", "slope_only").output.strip().splitlines()[-1]
    assert first == second and "reused" in invoke(store, "generate", "-e", "slope_only").output
    third = invoke(store, "generate", "-e", "slope_only", "--set", "data.noise=0.2")
    assert third.output.strip().splitlines()[-1] != first
    assert len(runs_of(store, "slope_only")["generate"]) == 2


def test_stages_chain_through_uris(store):
    data_uri = invoke(store, "generate", "-e", "crop_yields_manual").output.split()[-1]
    model_uri = invoke(store, "train", "-e", "crop_yields_manual", "--data", data_uri,
                       "--set", "epochs=20").output.split()[-1]
    assert data_uri.startswith("runs:/") and model_uri.startswith("models:/")
    invoke(store, "evaluate", "-e", "crop_yields_manual", "--model", model_uri,
           "--data", data_uri)
    runs = runs_of(store, "crop_yields_manual")
    assert runs["train"][0].data.tags["data_uri"] == data_uri
    assert len(history(store, runs["train"][0].info.run_id, "train_loss")) == 21
    assert runs["evaluate"][0].data.tags["model_uri"] == model_uri


def test_validation_split_logs_val_loss_and_evaluates_on_it(store):
    invoke(store, "run", "-e", "synthetic", "--set", "epochs=30 data.n_rows=500")
    runs = runs_of(store, "synthetic")
    assert len(history(store, runs["train"][0].info.run_id, "val_loss")) == 31
    assert runs["evaluate"][0].data.tags["eval_split"] == "validation"
    assert runs["evaluate"][0].data.metrics["weight_error"] < 0.1


def test_experiments_lists_every_config():
    result = CliRunner().invoke(cli, ["experiments"])
    assert result.exit_code == 0
    names = [line.split()[0] for line in result.output.splitlines()]
    assert set(TUTORIALS) | {"synthetic"} == set(names)


# --- bad input: one line on stderr, non-zero exit, no traceback, no RUNNING run -----------------


def pipeline(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], cwd=workdir, capture_output=True, text=True,
        env=subprocess_env(), timeout=120,
    )


def assert_one_line_failure(result: subprocess.CompletedProcess, *expected: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    assert len(lines) == 1, result.stderr
    for text in expected:
        assert text in lines[0]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["-e", "no_such_experiment"], ["unknown experiment", "line_fit_15pts"]),
        (["-e", "line_fit_15pts", "--set", "colour=red"], ["unknown key colour"]),
        (["-e", "line_fit_15pts", "--set", "data.colour=red"], ["unknown key data.colour"]),
        (["-e", "line_fit_15pts", "--set", "epochs=abc"], ["epochs must be an integer"]),
        (["-e", "line_fit_15pts", "--set", "lr"], ["must look like key=value"]),
        (["-e", "line_fit_15pts", "--set", "lr=0"], ["lr must be a finite number > 0"]),
        (["-e", "line_fit_15pts", "--set", "lr=-1"], ["lr must be"]),
        (["-e", "line_fit_15pts", "--set", "lr=inf"], ["lr must be"]),
        (["-e", "line_fit_15pts", "--set", "lr=nan"], ["lr must be"]),
        (["-e", "line_fit_15pts", "--set", "epochs=0"], ["epochs must be >= 1"]),
        (["-e", "line_fit_15pts", "--set", "batch_size=0"], ["batch_size must be >= 1"]),
        (["-e", "line_fit_15pts", "--set", "seed=-1"], ["seed must lie in [0, 2**32)"]),
        (["-e", "line_fit_15pts", "--set", "seed=99999999999999999999"], ["seed must lie"]),
        (["-e", "line_fit_15pts", "--set", "weight_init=1e39"],
         ["weight_init must lie within float32's range"]),
    ],
)
def test_bad_config_input(workdir, args, expected):
    assert_one_line_failure(pipeline(workdir, "run", *args), *expected)
    assert run_statuses(workdir / "mlflow.db") == []


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("latin1.yaml", b"description: caf\xe9\n", ["latin1.yaml: not a UTF-8 text file"]),
        ("noise.yaml", bytes(range(256)), ["not a UTF-8 text file"]),
        ("twice.yaml", b"lr: 0.01\nlr: 5.0\n", ["key 'lr' appears twice"]),
        ("folder.yaml", None, ["folder.yaml is not a file"]),
        ("missing.yaml", b"", ["no such experiment file", "missing.yaml"]),
    ],
)
def test_bad_experiment_files(workdir, name, content, expected):
    path = workdir / name
    if content is None:
        path.mkdir()
    elif name != "missing.yaml":
        path.write_bytes(content)
    assert_one_line_failure(pipeline(workdir, "run", "-e", str(path)), *expected)
    assert run_statuses(workdir / "mlflow.db") == []


@pytest.mark.parametrize(
    "args, expected",
    [
        (["run"], ["Missing option '-e'", "pipeline run --help"]),
        (["train", "-e", "line_fit_15pts", "--data"],
         ["Option '--data' requires an argument", "pipeline train --help"]),
        (["sweep", "-e", "line_fit_15pts", "--n-trials", "abc"], ["'abc' is not a valid"]),
        (["no_such_command"], ["No such command"]),
        (["compare", "-e", "x", "--top", "-3"], ["--top"]),
        (["predict", "--model", "m", "--input", "x.csv", "--output", "."], ["--output"]),
    ],
)
def test_usage_errors_are_one_line(workdir, args, expected):
    result = pipeline(workdir, *args)
    assert result.returncode == 2
    assert_one_line_failure(result, *expected)


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("", ["the tracking URI is empty"]),
        ("./runs_folder", ["names a folder", "sqlite:///mlflow.db"]),
        ("file:///tmp/runs_folder", ["names a folder"]),
        ("file:runs_folder", ["names a folder"]),
        ("uc:databricks", ["uc:databricks names no tracking store"]),
        ("Databricks-UC:x", ["Databricks-UC:x names no tracking store"]),
    ],
)
def test_unusable_tracking_uris(workdir, uri, expected):
    result = pipeline(workdir, "train", "-e", "line_fit_15pts", "--tracking-uri", uri)
    assert_one_line_failure(result, *expected)
    assert not (workdir / "runs_folder").exists()


def test_a_web_server_that_is_not_mlflow(workdir):
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://someone:hunter2@127.0.0.1:{server.server_address[1]}"
        result = pipeline(workdir, "train", "-e", "line_fit_15pts", "--tracking-uri", url)
    finally:
        server.shutdown()
    assert_one_line_failure(result, "answered HTTP 404", "is it an MLflow tracking server?")
    assert "hunter2" not in result.stderr + result.stdout


class _HealthyButFailing:
    """An MLflow server whose /health passes while every request fails, as one does when its
    own store is broken: MLflow's client would retry each request for minutes. With
    ``page``, a web server that answers every path 200 with a page."""

    def __init__(self, status: int, page: bool = False):
        import http.server
        import json
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802  (http.server's name)
                if self.path == "/health":
                    self.send_response(200)
                    self.end_headers()
                    self.wfile.write(b"OK")
                    return
                self.send_response(status)
                self.send_header("Content-Type", "text/html" if page else "application/json")
                self.end_headers()
                self.wfile.write(b"<html>hi</html>" if page else json.dumps({
                    "error_code": "INTERNAL_ERROR",
                    "message": "attempt to write a readonly database"}).encode())

            do_POST = do_GET

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.port = self.server.server_address[1]


@pytest.mark.parametrize("status", [500, 403])
def test_a_healthy_server_that_fails_requests_is_named_at_once(workdir, status):
    server = _HealthyButFailing(status)
    try:
        url = f"http://someone:hunter2@127.0.0.1:{server.port}"
        result = pipeline(workdir, "train", "-e", "line_fit_15pts", "--tracking-uri", url)
    finally:
        server.server.shutdown()
    assert_one_line_failure(result, f"answered HTTP {status} to a search for experiments: "
                            "attempt to write a readonly database")
    assert "hunter2" not in result.stderr + result.stdout


def test_a_web_server_answering_every_path_with_a_page_is_not_taken_for_mlflow(workdir):
    # It passed the checks, and `models NAME` then said "no registered model named NAME".
    server = _HealthyButFailing(200, page=True)
    try:
        result = pipeline(workdir, "models", "line_fit_15pts", "--tracking-uri",
                          f"http://127.0.0.1:{server.port}")
    finally:
        server.server.shutdown()
    assert_one_line_failure(result, "something other than MLflow's JSON; is it an MLflow "
                            "tracking server?")


def test_a_split_without_training_rows_is_refused_before_any_run(workdir):
    result = pipeline(workdir, "run", "-e", "synthetic", "--set", "data.n_rows=1")
    assert_one_line_failure(result, "val_fraction 0.2 leaves no training rows out of 1")
    assert run_statuses(workdir / "mlflow.db") == []


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("s3://no-bucket/dataset", "cannot fetch dataset s3://no-bucket/dataset: "),
        ("http://127.0.0.1:9/dataset", "not a web address"),
        ("runs:/0123456789abcdef/dataset", "Run with id=0123456789abcdef not found"),
    ],
    ids=["s3", "http", "unknown-run"],
)
def test_data_that_cannot_be_fetched_is_one_line(workdir, uri, expected):
    result = pipeline(workdir, "train", "-e", "line_fit_15pts", "--data", uri)
    assert_one_line_failure(result, expected)
    assert "RUNNING" not in run_statuses(workdir / "mlflow.db")


def test_data_generated_for_another_experiment_is_refused(store):
    data_uri = invoke(store, "generate", "-e", "line_fit_15pts").output.split()[-1]
    for command in ("train", "evaluate"):
        extra = ["--model", "models:/m-0"] if command == "evaluate" else []
        result = CliRunner().invoke(cli, [command, "-e", "crop_yields_manual", "--data",
                                          data_uri, *extra, "--tracking-uri", store])
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
        assert "has columns x -> y but crop_yields_manual expects temp, rainfall, humidity" in (
            result.stderr), result.stderr
    assert "crop_yields_manual" not in [e.name for e in MlflowClient(store).search_experiments()]


def test_data_from_another_recipe_says_so(store):
    # line_2x_plus_1's rows have line_fit_15pts's columns (x -> y), made another way.
    data_uri = invoke(store, "generate", "-e", "line_2x_plus_1").output.split()[-1]
    result = CliRunner().invoke(cli, ["train", "-e", "line_fit_15pts", "--data", data_uri,
                                      "--tracking-uri", store])
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: --data {data_uri} was generated from a line recipe, but line_fit_15pts makes "
        "its rows from a table recipe; give --data generated with line_fit_15pts's settings as "
        "they are now (or no --data, to build the rows)\n")


def test_data_of_a_deleted_run_is_refused(store):
    data_uri = invoke(store, "generate", "-e", "line_fit_15pts").output.split()[-1]
    run_id = data_uri.split("/")[1]
    MlflowClient(store).delete_run(run_id)
    result = CliRunner().invoke(cli, ["train", "-e", "line_fit_15pts", "--data", data_uri,
                                      "--tracking-uri", store])
    assert result.exit_code == 1
    assert f"run {run_id} is deleted; restore it" in result.stderr


def test_data_generated_with_other_settings_is_refused(store):
    # The run would record data.n_rows=300 for rows made with 200.
    data_uri = invoke(store, "generate", "-e", "synthetic", "--set",
                      "data.n_rows=200").output.split()[-1]
    for command in ("train", "evaluate"):
        extra = ["--model", "models:/m-0"] if command == "evaluate" else []
        result = CliRunner().invoke(cli, [command, "-e", "synthetic", "--set", "data.n_rows=300",
                                          "--data", data_uri, *extra, "--tracking-uri", store])
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
        assert (f"--data {data_uri} was generated with data.n_rows=200, but synthetic has "
                "data.n_rows=300 now") in result.stderr, result.stderr
    # Training settings may differ: the data are the same.
    invoke(store, "train", "-e", "synthetic", "--set", "data.n_rows=200", "--set", "epochs=2",
           "--set", "lr=0.05", "--data", data_uri)
    # Another seed draws other rows: the run would record seed=1 for rows of seed 0.
    result = CliRunner().invoke(cli, ["train", "-e", "synthetic", "--set", "data.n_rows=200",
                                      "--set", "seed=1", "--data", data_uri,
                                      "--tracking-uri", store])
    assert result.exit_code == 1 and "was generated with seed=0, but synthetic has seed=1 now" \
        in result.stderr, result.stderr


def test_data_generated_with_a_feature_list_longer_than_a_param_is_taken(store, workdir):
    # MLflow keeps 6000 characters of a param: the list as logged is cut, and compared cut.
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    from pipeline.tracking import records

    assert records.PARAM_CHARS == MAX_PARAM_VAL_LENGTH
    names = [f"sensor_reading_from_station_number_{i:03d}_in_millimetres" for i in range(120)]
    rows = np.random.default_rng(0).random((20, 120))
    frame = pd.DataFrame(rows, columns=names).assign(y=rows.sum(axis=1))
    frame.to_csv(workdir / "wide.csv", index=False)
    (workdir / "e.yaml").write_text(yaml.safe_dump(
        {"lr": 1e-3, "epochs": 3, "data": {"csv": "wide.csv", "features": names,
                                            "targets": ["y"]}}))
    data_uri = invoke(store, "generate", "-e", "e.yaml").output.split()[-1]
    result = CliRunner().invoke(cli, ["train", "-e", "e.yaml", "--data", data_uri,
                                      "--tracking-uri", store])
    assert result.exit_code == 0, result.output
    [run] = [r for r in MlflowClient(store).search_runs(["1"]) if r.data.tags["stage"] == "train"]
    assert len(run.data.params["data.features"]) == MAX_PARAM_VAL_LENGTH


def test_data_generated_from_rows_that_differ_past_a_param_is_refused(store, workdir):
    # 1200 rows written out: the logged params keep their first 6000 characters, so the last
    # target is compared through the data's key.
    rows = {"lr": 1e-7, "epochs": 3, "data": {"source": "table",
                                             "features": [[i] for i in range(1200)],
                                             "targets": [[1.0]] * 1200}}
    (workdir / "e.yaml").write_text(yaml.safe_dump(rows))
    data_uri = invoke(store, "generate", "-e", "e.yaml").output.split()[-1]
    invoke(store, "train", "-e", "e.yaml", "--data", data_uri)  # the same rows are taken
    rows["data"]["targets"][-1] = [999.0]
    (workdir / "e.yaml").write_text(yaml.safe_dump(rows))
    result = CliRunner().invoke(cli, ["train", "-e", "e.yaml", "--data", data_uri,
                                      "--tracking-uri", store])
    assert result.exit_code == 1
    assert "they differ past what a param keeps" in result.stderr, result.output


def test_data_generated_from_another_csv_is_refused(store, workdir):
    (workdir / "a.csv").write_text("x,y\n1,3\n2,5\n3,7\n")
    (workdir / "b.csv").write_text("x,y\n10,30\n20,50\n")
    (workdir / "e.yaml").write_text("seed: 0\nlr: 0.01\nepochs: 3\ndata:\n  csv: a.csv\n"
                                    "  features: [x]\n  targets: [y]\n")
    data_uri = invoke(store, "generate", "-e", "e.yaml").output.split()[-1]
    result = CliRunner().invoke(cli, ["train", "-e", "e.yaml", "--set", "data.csv=b.csv",
                                      "--data", data_uri, "--tracking-uri", store])
    assert result.exit_code == 1, result.output
    assert f"was generated from {workdir / 'a.csv'}, but e reads b.csv now" in result.stderr
    # The same file, written another way, is the same data.
    invoke(store, "train", "-e", "e.yaml", "--set", "data.csv=./a.csv", "--data", data_uri)


def test_a_reader_leaving_stdout_does_not_fail_the_run(workdir):
    # `pipeline run | head -1`: the work goes on and every run finishes.
    result = subprocess.run(
        f"{sys.executable} -m pipeline run -e line_fit_15pts | head -1; "
        "exit ${PIPESTATUS[0]}", shell=True, executable="/bin/bash", cwd=workdir,
        capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("generate: "), result.stderr
    assert result.stderr == ""
    assert sorted(run_statuses(workdir / "mlflow.db")) == ["FINISHED"] * 4


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_a_training_run_cleanly(workdir, signum, status):
    # Started by a shell as a background job, where SIGINT is ignored unless a program asks.
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", "-e", "synthetic", "--set", "epochs=1000000"],
        cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=subprocess_env(), preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.monotonic() + 120
    while len(run_statuses(workdir / "mlflow.db")) < 3:  # the parent, generate, train
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.2)
    process.send_signal(signum)
    out, err = process.communicate(timeout=60)
    assert process.returncode == status, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("interrupted"), err
    assert "Traceback" not in out + err
    statuses = run_statuses(workdir / "mlflow.db")
    assert sorted(statuses) == ["FINISHED", "KILLED", "KILLED"]  # generate done; train, parent


def csv_experiment(workdir: Path, content: str | None, features=("temp",)) -> str:
    path = workdir / "data.csv"
    if content is not None:
        path.write_text(content)
    (workdir / "mine.yaml").write_text(
        f"lr: 0.01\nepochs: 3\ndata:\n  csv: {path}\n  features: {list(features)}\n"
        "  targets: [yield]\n"
    )
    return str(workdir / "mine.yaml")


@pytest.mark.parametrize(
    "content, expected",
    [
        ("", ["the file is empty"]),
        ("temp,yield\n", ["no data rows"]),
        ("temp,rain\n1,2\n", ["no column named yield"]),
        ("temp,yield\n1,2\nwarm,3\n", ["column temp", "'warm'", "row 2"]),
        (None, ["no such file"]),
    ],
)
def test_bad_csv(workdir, content, expected):
    config_path = csv_experiment(workdir, content)
    assert_one_line_failure(pipeline(workdir, "run", "-e", config_path), *expected)
    assert "RUNNING" not in run_statuses(workdir / "mlflow.db")
    assert "FAILED" not in run_statuses(workdir / "mlflow.db")  # caught before any run


def test_good_csv_runs(store, workdir):
    rows = "\n".join(f"{x},{3 * x + 1}" for x in range(10))
    config_path = csv_experiment(workdir, "temp,yield\n" + rows + "\n")
    invoke(store, "run", "-e", config_path, "--set", "epochs=200")
    evaluate_run = runs_of(store, "mine")["evaluate"][0]
    assert evaluate_run.data.metrics["r2"] > 0.99


def test_empty_recipe_is_refused_before_any_run(workdir):
    result = pipeline(workdir, "run", "-e", "slope_only", "--set", "data.x_range=[1,0,1]")
    assert_one_line_failure(result, "gives no rows")
    assert "FAILED" not in run_statuses(workdir / "mlflow.db")


@pytest.mark.parametrize(
    "command, rows, extra, expected",
    [
        ("train", "x,y\n1,2\n2,3e19\n3,4\n", (),
         "column y: the sum of its squares overflows float32, the dtype training computes in "
         "(its largest value: 3e+19, data row 2); rescale the column or set dtype=float64"),
        ("run", "x,y\n1,2\n2e20,3\n3,4\n", (),
         "column x: the sum of its squares overflows float32, the dtype training computes in "
         "(its largest value: 2e+20, data row 2); rescale the column, set scale=standard or "
         "set dtype=float64"),
        # Each square fits in float32, their sum does not.
        ("sweep", "x,y\n" + "".join(f"{i},1e19\n" for i in range(8)), ("--n-trials", "2"),
         "column y: the sum of its squares overflows float32"),
    ],
    ids=["train-target", "run-feature", "sweep-a-sum"],
)
def test_values_whose_squares_overflow_float32_are_refused_before_any_run(
        workdir, command, rows, extra, expected):
    # Their loss is inf from the first epoch whatever the learning rate: not a divergence.
    (workdir / "big.csv").write_text(rows)
    (workdir / "e.yaml").write_text("lr: 0.01\nepochs: 3\nval_fraction: 0\ndata:\n"
                                    "  csv: big.csv\n  features: [x]\n  targets: [y]\n")
    result = pipeline(workdir, command, "-e", "e.yaml", *extra)
    assert_one_line_failure(result, expected)
    assert run_statuses(workdir / "mlflow.db") == []
    # In float64 they train; scaled, a large feature does too.
    assert pipeline(workdir, "train", "-e", "e.yaml", "--set", "dtype=float64",
                    "--set", "lr=1e-42").returncode == 0
    if command == "run":
        assert pipeline(workdir, "train", "-e", "e.yaml", "--set", "scale=standard",
                        "--set", "lr=0.1").returncode == 0


def test_evaluate_refuses_a_model_of_another_width(store):
    model_uri = invoke(store, "train", "-e", "slope_only").output.split()[-1]
    result = CliRunner().invoke(cli, ["evaluate", "-e", "crop_yields_builtin", "--model",
                                      model_uri, "--tracking-uri", store])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "takes features x but crop_yields_builtin's data has temp, rainfall, humidity " \
           "(no x)" in result.stderr and len(result.stderr.splitlines()) == 1


def test_cuda_asked_for_where_there_is_none(workdir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = pipeline(workdir, "run", "-e", "line_fit_15pts", "--device", "cuda")
    assert_one_line_failure(result, "device cuda was asked for")
    assert run_statuses(workdir / "mlflow.db") == []


def test_a_damaged_registry_is_not_read_as_a_missing_model(workdir):
    # The first pages of the registry's tables overwritten: the store's own error, not "no
    # registered model named ...", which sent the user off to sweep again.
    import sqlite3

    assert pipeline(workdir, "sweep", "-e", "line_fit_15pts", "--n-trials", "2").returncode == 0
    with sqlite3.connect(workdir / "mlflow.db") as connection:
        size = connection.execute("pragma page_size").fetchone()[0]
        pages = connection.execute(
            "select min(pageno) from dbstat where name in ('registered_models', "
            "'model_versions', 'registered_model_aliases') group by name").fetchall()
    with open(workdir / "mlflow.db", "r+b") as handle:
        for (page,) in pages:
            handle.seek((page - 1) * size)
            handle.write(b"\xff" * 64)
    (workdir / "rows.csv").write_text("x\n1\n")
    for command in (["promote", "line_fit_15pts", "1"], ["models", "line_fit_15pts"],
                    ["predict", "--model", "models:/line_fit_15pts@champion",
                     "--input", "rows.csv"]):
        assert_one_line_failure(pipeline(workdir, *command), "Error: tracking store error: "
                                "(sqlite3.DatabaseError) database disk image is malformed")


def test_data_whose_files_were_deleted_are_generated_again(workdir):
    # The generate run is FINISHED and keyed on the same rows, but its dataset/ is gone.
    import shutil

    assert pipeline(workdir, "run", "-e", "slope_only").returncode == 0
    shutil.rmtree(workdir / "mlruns")
    again = pipeline(workdir, "run", "-e", "slope_only")
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("generate: 60×1→1") and "reused" not in again.stdout
    assert "reused" in pipeline(workdir, "generate", "-e", "slope_only").stdout


@pytest.mark.parametrize("scheme", ["http", "HTTP"])
def test_unreachable_tracking_server(workdir, scheme):
    port = free_port()
    result = pipeline(workdir, "run", "-e", "line_fit_15pts",
                      "--tracking-uri", f"{scheme}://127.0.0.1:{port}")
    # A server, in any case, as MLflow reads the scheme; not a database.
    assert_one_line_failure(result, f"tracking server http://127.0.0.1:{port} is not reachable")


@pytest.mark.parametrize("storage", [None, "sqlite:///optuna.db"], ids=["journal", "sqlite"])
def test_a_sweep_refused_its_tracking_store_makes_no_storage(workdir, storage):
    port = free_port()
    result = pipeline(workdir, "sweep", "-e", "line_fit_15pts", "--n-trials", "2",
                      "--tracking-uri", f"http://127.0.0.1:{port}",
                      *(["--storage", storage] if storage else []))
    assert result.returncode == 1 and "not reachable" in result.stderr
    assert sorted(p.name for p in workdir.iterdir()) == []


def test_unreachable_database_store_fails_at_once(workdir):
    # MLflow alone retries for about 100 s, with a warning line a try.
    port = free_port()
    result = pipeline(workdir, "train", "-e", "line_fit_15pts", "--tracking-uri",
                      f"postgresql://u:s3cret@127.0.0.1:{port}/mlflow")
    assert_one_line_failure(result, "not reachable")
    assert "s3cret" not in result.stderr + result.stdout


def test_divergence_is_recorded_not_crashed(workdir):
    result = pipeline(workdir, "run", "-e", "slope_only", "--set", "lr=10 epochs=500")
    assert_one_line_failure(result, "diverged at epoch")
    # The message names the stable edge theory gives for slope_only's rows (2/λ_max ≈ 0.333).
    edge = float(re.search(r"largest stable lr for this data is ([0-9.e-]+)",
                           result.stderr).group(1))
    assert edge == pytest.approx(0.3331, rel=1e-3)
    statuses = run_statuses(workdir / "mlflow.db")
    assert "RUNNING" not in statuses and statuses.count("FAILED") == 2  # train and parent
    runs = runs_of(f"sqlite:///{workdir / 'mlflow.db'}", "slope_only")
    train_run = runs["train"][0]
    assert train_run.data.tags["diverged"] == "true"
    assert train_run.info.status == "FAILED"
    assert runs["pipeline"][0].data.tags["diverged"] == "true"


def test_help_is_quick_to_import():
    # `pipeline --help` must not import torch or mlflow.
    code = "import sys, pipeline.entry; print(any(m in sys.modules for m in ('torch', 'mlflow')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.stdout.strip() == "False"


def experiment_names(db_path: Path) -> list[str]:
    import sqlite3

    if not db_path.exists():
        return []
    with sqlite3.connect(db_path) as connection:
        try:
            return sorted(row[0] for row in connection.execute("select name from experiments"))
        except sqlite3.OperationalError:
            return []


def own_data(folder: Path, csv_name: str = "apples.csv") -> Path:
    """An experiment file in ``folder`` naming a CSV beside it by a relative path."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [[73, 67, 43, 56], [91, 88, 64, 81], [87, 134, 58, 119], [102, 43, 37, 22],
            [69, 96, 70, 103]]
    (folder / "apples.csv").write_text(
        "temp,rainfall,humidity,apples\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    config = folder / "apples.yaml"
    config.write_text(f"description: apples from a CSV beside this file\nlr: 1.0e-5\n"
                      f"epochs: 20\ndata:\n  csv: {csv_name}\n"
                      "  features: [temp, rainfall, humidity]\n  targets: [apples]\n")
    return config


def test_a_csv_named_in_a_config_is_found_beside_it(workdir):
    config = own_data(workdir / "elsewhere" / "configs")
    result = pipeline(workdir, "run", "-e", str(config.relative_to(workdir)))
    assert result.returncode == 0, result.stderr
    assert experiment_names(workdir / "mlflow.db") == ["Default", "apples"]
    runs = runs_of(f"sqlite:///{workdir / 'mlflow.db'}", "apples")
    assert runs["train"][0].data.params["data.csv"] == str(config.parent / "apples.csv")


@pytest.mark.parametrize("case", ["missing csv", "train missing csv", "sweep missing csv",
                                  "no cuda", "bad storage", "unknown model"])
def test_a_failing_command_leaves_no_experiment_behind(workdir, case):
    config = own_data(workdir / "configs",
                      "nowhere.csv" if "missing csv" in case else "apples.csv")
    args = {
        "missing csv": ["run", "-e", str(config)],
        "train missing csv": ["train", "-e", str(config)],
        "sweep missing csv": ["sweep", "-e", str(config), "--n-trials", "2"],
        "no cuda": ["run", "-e", str(config), "--device", "cuda"],
        "bad storage": ["sweep", "-e", str(config), "--n-trials", "2", "--storage",
                        str(config / "under-a-file.journal")],
        "unknown model": ["evaluate", "-e", str(config), "--model", "models:/nothing@champion"],
    }[case]
    if torch.cuda.is_available() and case == "no cuda":
        pytest.skip("this machine has a GPU")
    result = pipeline(workdir, *args)
    assert_one_line_failure(result)
    if "missing csv" in case:  # the error says exactly where it looked, and no store is made
        assert str(workdir / "configs" / "nowhere.csv") in result.stderr
        assert not (workdir / "mlflow.db").exists()
    assert experiment_names(workdir / "mlflow.db") in ([], ["Default"])


def test_models_check_answers_in_one_line(workdir):
    result = pipeline(workdir, "models", "--check", "models:/nothing@champion")
    assert_one_line_failure(result, "there is no", "mlflow.db, so nothing was tracked there")
    invoke(f"sqlite:///{workdir / 'mlflow.db'}", "train", "-e", "slope_only")
    result = pipeline(workdir, "models", "--check", "models:/nothing@champion")
    assert_one_line_failure(result, "no registered model named 'nothing'")


@pytest.mark.parametrize("args", [
    ["models"], ["compare", "-e", "slope_only"], ["promote", "slope_only", "1"],
    ["predict", "--model", "models:/slope_only@champion", "--input", "rows.csv"],
])
def test_commands_that_only_read_leave_no_store_behind(workdir, args):
    (workdir / "rows.csv").write_text("x\n1\n")
    assert_one_line_failure(pipeline(workdir, *args), "nothing was tracked there")
    assert not (workdir / "mlflow.db").exists()


def test_standard_scaling_trains_raw_data_at_a_plain_lr_and_predicts_raw_units(workdir):
    """Unscaled columns (temperatures, rainfall) diverge at lr 0.1; scaled, they converge to
    the least-squares fit, and the logged model still takes raw units by name."""
    config = own_data(workdir / "data")
    text = config.read_text().replace("lr: 1.0e-5", "lr: 0.1").replace("epochs: 20",
                                                                        "epochs: 400")
    config.write_text(text)
    unscaled = pipeline(workdir, "run", "-e", str(config))
    assert_one_line_failure(unscaled, "diverged", "largest stable lr")
    config.write_text(text + "scale: standard\n")
    result = pipeline(workdir, "run", "-e", str(config))
    assert result.returncode == 0, result.stderr
    runs = runs_of(f"sqlite:///{workdir / 'mlflow.db'}", "apples")
    train_run = next(r for r in runs["train"] if r.info.status == "FINISHED")
    assert train_run.data.params["scale"] == "standard"
    frame = pd.read_csv(config.parent / "apples.csv")
    x = np.hstack([frame[["temp", "rainfall", "humidity"]].to_numpy(float), np.ones((5, 1))])
    solution = np.linalg.lstsq(x, frame[["apples"]].to_numpy(float), rcond=None)[0]
    [evaluated] = [r.data.metrics for r in runs["evaluate"]]
    assert evaluated["mse"] == pytest.approx(evaluated["optimum_mse"], rel=1e-3, abs=1e-3)
    # Raw rows, columns in another order: the model scales them itself.
    frame[["humidity", "temp", "rainfall"]].to_csv(workdir / "rows.csv", index=False)
    [parent] = [r for r in runs["pipeline"] if r.info.status == "FINISHED"]
    predicted = pipeline(workdir, "predict", "--model", parent.data.tags["model_uri"],
                         "--input", "rows.csv")
    assert predicted.returncode == 0, predicted.stderr
    values = pd.read_csv(io.StringIO(predicted.stdout))["apples"].to_numpy()
    np.testing.assert_allclose(values, (x @ solution)[:, 0], rtol=1e-3, atol=0.05)
    # Raw features in float64, predictions in the model's float32: printed in float32's digits.
    printed = predicted.stdout.splitlines()[1]
    assert len(printed.lstrip("-").replace(".", "").lstrip("0")) <= 9, printed


@pytest.mark.parametrize("args, expected", [
    (["train", "-e", "line_fit_15pts", "--data", ""], ["--data is empty"]),
    (["evaluate", "-e", "line_fit_15pts", "--model", "models:/m-1", "--data", " "],
     ["--data is empty"]),
    (["worker", "--storage", "", "--study", "s"], ["the Optuna storage is empty"]),
])
def test_an_empty_value_is_refused_not_taken_for_none(workdir, args, expected):
    result = pipeline(workdir, *args)
    assert result.returncode == 1
    assert_one_line_failure(result, *expected)
    assert not (workdir / "mlflow.db").exists()
