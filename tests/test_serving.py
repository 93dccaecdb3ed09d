"""Registered models in use: predict, models, promote, compare, and `mlflow models serve`."""

from __future__ import annotations

import io
import re
import subprocess
import sys

import mlflow
import mlflow.pytorch
import numpy as np
import pandas as pd
import pytest
import requests
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from pipeline.cli import cli
from tests.conftest import BIN, free_port, subprocess_env, wait_until_answering

CROP = ["temp", "rainfall", "humidity"]


@pytest.fixture(scope="module")
def registry_store(tmp_path_factory):
    """A store where short sweeps registered a builtin and a manual champion."""
    folder = tmp_path_factory.mktemp("registry")
    store = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        for args in (["-e", "crop_yields_builtin", "--n-trials", "4"],
                     ["-e", "line_fit_15pts", "--n-trials", "3", "--epochs-range", "5", "20"]):
            result = CliRunner().invoke(cli, ["sweep", *args, "--tracking-uri", store])
            assert result.exit_code == 0, result.output
    mlflow.set_tracking_uri(store)
    return folder, store


def pipeline(folder, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=folder,
                          capture_output=True, text=True, timeout=120, env=subprocess_env())


def crop_rows(count: int) -> pd.DataFrame:
    values = np.random.default_rng(count).uniform(30, 140, size=(count, 3))
    return pd.DataFrame(values, columns=CROP)


def in_process(uri: str, rows: pd.DataFrame) -> np.ndarray:
    model = mlflow.pytorch.load_model(uri)
    with torch.no_grad():
        return model(torch.tensor(rows.to_numpy(), dtype=torch.float32)).numpy()


@pytest.mark.parametrize("count", [1, 70_000])  # more rows than one chunk (65,536)
def test_predict_matches_the_model_loaded_in_process(registry_store, count):
    folder, store = registry_store
    rows = crop_rows(count)
    # Columns in another order: they are matched by name, not position.
    rows[list(reversed(CROP))].to_csv(folder / "x.csv", index=False)
    uri = "models:/crop_yields_builtin@champion"
    result = pipeline(folder, "predict", "--model", uri, "--input", "x.csv",
                      "--tracking-uri", store)
    assert result.returncode == 0, result.stderr
    printed = pd.read_csv(io.StringIO(result.stdout))
    assert list(printed.columns) == ["apples", "oranges"] and len(printed) == count
    # Nine significant digits give back the float32 model's own values, exactly.
    np.testing.assert_array_equal(printed.to_numpy().astype(np.float32), in_process(uri, rows))

    written = pipeline(folder, "predict", "--model", uri, "--input", "x.csv", "--output",
                       "y.csv", "--tracking-uri", store)
    assert written.returncode == 0 and written.stdout == ""
    assert (folder / "y.csv").read_text() == result.stdout  # the file holds what was shown


def test_the_latest_version_is_a_model_uri_too(registry_store):
    folder, store = registry_store
    crop_rows(3).to_csv(folder / "x.csv", index=False)
    result = pipeline(folder, "predict", "--model", "models:/crop_yields_builtin/latest",
                      "--input", "x.csv", "--tracking-uri", store)
    assert result.returncode == 0, result.stderr
    np.testing.assert_allclose(pd.read_csv(io.StringIO(result.stdout)).to_numpy(), in_process(
        "models:/crop_yields_builtin/1", crop_rows(3)), rtol=1e-5)


def test_pyfunc_refuses_a_prediction_that_overflows(registry_store):
    # 3e38 is a float32, the weighted sum of such inputs is not: it was answered as inf.
    model = mlflow.pyfunc.load_model("models:/crop_yields_builtin@champion")
    rows = crop_rows(3)
    rows.loc[1, :] = 3e38
    with pytest.raises(mlflow.exceptions.MlflowException,
                       match="the prediction for row 2 overflows the model.s numbers"):
        model.predict(rows)


def test_manual_and_builtin_champions_load_with_pyfunc(registry_store):
    builtin = mlflow.pyfunc.load_model("models:/crop_yields_builtin@champion")
    manual = mlflow.pyfunc.load_model("models:/line_fit_15pts@champion")
    rows = crop_rows(7)
    predicted = builtin.predict(rows[list(reversed(CROP))])
    assert list(predicted.columns) == ["apples", "oranges"]
    np.testing.assert_allclose(predicted.to_numpy(), in_process(
        "models:/crop_yields_builtin@champion", rows), rtol=1e-6)
    many = crop_rows(70_000)  # more rows than the pyfunc's chunk of 65,536
    np.testing.assert_allclose(builtin.predict(many).to_numpy(), in_process(
        "models:/crop_yields_builtin@champion", many), rtol=1e-6)
    x = pd.DataFrame({"x": [3.3, 4.4, 10.791]})
    assert manual.predict(x).shape == (3, 1)
    version = MlflowClient().get_model_version_by_alias("line_fit_15pts", "champion")
    assert version.tags["model_kind"] == "manual" and "Best of Optuna study" in (
        version.description)
    assert {"experiment", "data_key", "objective", "lr", "epochs"} <= set(version.tags)


def test_models_lists_versions_with_aliases(registry_store):
    folder, store = registry_store
    result = pipeline(folder, "models", "--tracking-uri", store)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["name", "version", "aliases", "objective"]
    assert any(line.split()[:3] == ["crop_yields_builtin", "1", "champion"] for line in lines)
    assert any(line.split()[:3] == ["line_fit_15pts", "1", "champion"] for line in lines)


def test_promote_moves_the_alias(registry_store):
    folder, store = registry_store
    client = MlflowClient()
    first = client.get_model_version("crop_yields_builtin", "1")
    second = mlflow.register_model(f"models:/{first.source.rsplit('/', 1)[-1]}"
                                   if first.source.startswith("models:/") else first.source,
                                   "crop_yields_builtin")
    result = pipeline(folder, "promote", "crop_yields_builtin", str(second.version),
                      "--reason", "checked by hand", "--tracking-uri", store)
    assert result.returncode == 0, result.stderr
    assert "v1 -> v2" in result.stdout
    holder = client.get_model_version_by_alias("crop_yields_builtin", "champion")
    assert str(holder.version) == "2"
    assert holder.tags["champion.promoted_reason"] == "checked by hand"
    assert holder.tags["champion.promoted_previous_version"] == "1"
    assert "champion.promoted_by" in holder.tags and "champion.promoted_at" in holder.tags
    back = pipeline(folder, "promote", "crop_yields_builtin", "01", "--tracking-uri", store)
    assert back.returncode == 0 and "v2 -> v1 " in back.stdout  # "01" is version 1


def test_compare_gives_one_sorted_row_per_run(registry_store):
    folder, store = registry_store
    result = pipeline(folder, "compare", "-e", "crop_yields_builtin", "--format", "csv",
                      "--tracking-uri", store)
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(io.StringIO(result.stdout))
    runs = mlflow.search_runs(experiment_names=["crop_yields_builtin"])
    assert len(table) == len(runs) == 5  # the sweep's parent and its four trials
    assert {"run_name", "model", "lr", "epochs", "objective", "run_id"} <= set(table.columns)
    scored = table["objective"].dropna()
    assert list(scored) == sorted(scored) and len(scored) >= 1
    top = pipeline(folder, "compare", "-e", "crop_yields_builtin", "--metric", "train_loss",
                   "--top", "2", "--format", "markdown", "--tracking-uri", store)
    assert top.returncode == 0 and len(re.findall(r"\n\| t\d+ lr=", top.stdout)) == 2


def test_rows_without_names_are_refused_not_read_by_position(registry_store):
    # MLflow checks a column-based signature before the model runs: rows without names cannot
    # be matched to features, so they are refused. The pytorch face takes them in training order.
    uri = "models:/crop_yields_builtin@champion"
    rows = crop_rows(3)
    with pytest.raises(mlflow.MlflowException, match=r"missing inputs \['temp', 'rainfall'"):
        mlflow.pyfunc.load_model(uri).predict(rows.to_numpy())
    module = mlflow.pytorch.load_model(uri)
    named = mlflow.pyfunc.load_model(uri).predict(rows[list(reversed(CROP))]).to_numpy()
    with torch.no_grad():
        positional = module(torch.tensor(rows.to_numpy(), dtype=torch.float32)).numpy()
    np.testing.assert_allclose(positional, named, rtol=1e-6)


def test_mlflow_models_serve_matches_columns_by_name(registry_store):
    folder, store = registry_store
    port = free_port()
    uri = "models:/crop_yields_builtin@champion"
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port)],
        cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        # As `make serve` runs it: MLflow checks the pt2 archive for pickles too.
        env=subprocess_env(MLFLOW_TRACKING_URI=store, MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false"),
    )
    url = f"http://127.0.0.1:{port}/invocations"
    rows = crop_rows(5).round(1)
    shuffled = rows[["humidity", "temp", "rainfall"]]
    expected = in_process(uri, rows)
    requests_by_format = {
        "dataframe_records": {"json": {"dataframe_records": shuffled.to_dict("records")}},
        "dataframe_split": {"json": {"dataframe_split": shuffled.to_dict("split")}},
        "inputs as columns": {"json": {"inputs": shuffled.to_dict("list")}},
        "text/csv": {"data": shuffled.to_csv(index=False),
                     "headers": {"Content-Type": "text/csv"}},
    }
    try:
        wait_until_answering(f"http://127.0.0.1:{port}/ping", 90)
        for name, request in requests_by_format.items():
            reply = requests.post(url, timeout=30, **request)
            assert reply.status_code == 200, (name, reply.text)
            served = pd.DataFrame(reply.json()["predictions"])
            assert list(served.columns) == ["apples", "oranges"], name
            np.testing.assert_allclose(served.to_numpy(), expected, rtol=1e-6, err_msg=name)
        whole_numbers = requests.post(url, timeout=30, json={"dataframe_records": [
            {"humidity": 43, "rainfall": 67, "temp": 73}]})
        assert whole_numbers.status_code == 200, whole_numbers.text
        unknown = requests.post(url, timeout=30, json={"dataframe_records": [
            {"humidity": 43.0, "rainfall": 67.0, "tmp": 73.0}]})
        assert unknown.status_code == 400
        assert "missing inputs ['temp']" in unknown.json()["message"]
        assert "tmp" in unknown.json()["message"]
        positional = requests.post(url, timeout=30, json={"inputs": [[73.0, 67.0, 43.0]]})
        assert positional.status_code == 400
        assert "missing inputs ['temp', 'rainfall', 'humidity']" in positional.json()["message"]
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_pickled_model_needs_the_users_say(registry_store, tmp_path):
    folder, store = registry_store
    mlflow.pytorch.save_model(torch.nn.Linear(3, 2), tmp_path / "pickled",
                              serialization_format="pickle",
                              input_example=np.ones((2, 3), dtype=np.float32))
    # Without recorded names, the features are x0, x1, x2 by position.
    crop_rows(2).set_axis(["x0", "x1", "x2"], axis=1).to_csv(tmp_path / "x.csv", index=False)
    args = ["predict", "--model", str(tmp_path / "pickled"), "--input", str(tmp_path / "x.csv"),
            "--tracking-uri", store]
    refused = pipeline(folder, *args)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode != 0 and len(lines) == 1 and "--allow-pickle" in lines[0]
    allowed = pipeline(folder, *args, "--allow-pickle")
    assert allowed.returncode == 0, allowed.stderr
    assert len(pd.read_csv(io.StringIO(allowed.stdout))) == 2


def test_predictions_never_overwrite_their_input_or_the_store(registry_store, tmp_path):
    folder, store = registry_store
    rows = tmp_path / "rows.csv"
    crop_rows(2).to_csv(rows, index=False)
    before = rows.read_bytes()
    database = folder / "mlflow.db"
    stored = database.stat().st_size
    journal = tmp_path / "optuna.journal"
    journal.write_text('{"op_code":0,"worker_id":"w","study_name":"s","directions":[1]}\n')
    for output, expected in ((rows, "is the input file"), (database, "is a SQLite database"),
                             (journal, "is an Optuna journal")):
        result = CliRunner().invoke(cli, [
            "predict", "--model", "models:/crop_yields_builtin@champion", "--input", str(rows),
            "--output", str(output), "--tracking-uri", store])
        assert result.exit_code == 1 and expected in result.stderr, result.stderr
    assert rows.read_bytes() == before and database.stat().st_size >= stored


def test_predictions_stopped_while_written_leave_the_old_file(registry_store, tmp_path):
    # SIGTERM while a million rows are written: the file there before is kept whole.
    import signal
    import time

    folder, store = registry_store
    crop_rows(1_000_000).to_csv(tmp_path / "rows.csv", index=False)
    (tmp_path / "out.csv").write_text("apples,oranges\n1,2\n")
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "predict", "--model",
         "models:/crop_yields_builtin@champion", "--input", "rows.csv", "--output", "out.csv",
         "--tracking-uri", store], cwd=tmp_path, env=subprocess_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".out.csv.*.partial")) and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    assert (tmp_path / "out.csv").read_text() == "apples,oranges\n1,2\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv", "rows.csv"]


def test_predictions_to_a_device_or_a_fifo_write_through_it(registry_store, tmp_path):
    # Not replaced by a file (as root, /dev/null would have been), not read first (a FIFO
    # would block), and appended to: `--output /dev/stdout >> log` keeps the log.
    import os
    import stat
    import threading

    folder, store = registry_store
    crop_rows(2).to_csv(tmp_path / "rows.csv", index=False)
    args = ["--model", "models:/crop_yields_builtin@champion", "--input", "rows.csv",
            "--tracking-uri", store]
    shown = pipeline(tmp_path, "predict", *args).stdout
    try:  # a copy of /dev/null (making one needs root)
        os.mknod(tmp_path / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        pass
    else:
        assert pipeline(tmp_path, "predict", *args, "--output", "null").returncode == 0
        assert stat.S_ISCHR((tmp_path / "null").stat().st_mode)
    os.mkfifo(tmp_path / "fifo")
    read = []
    reader = threading.Thread(target=lambda: read.append((tmp_path / "fifo").read_text()))
    reader.start()
    assert pipeline(tmp_path, "predict", *args, "--output", "fifo").returncode == 0
    reader.join(timeout=60)
    assert read == [shown]
    (tmp_path / "log.txt").write_text("header\n")
    with open(tmp_path / "log.txt", "a") as log:
        subprocess.run([sys.executable, "-m", "pipeline", "predict", *args, "--output",
                        "/dev/stdout"], cwd=tmp_path, stdout=log, env=subprocess_env(),
                       check=True, timeout=120)
    assert (tmp_path / "log.txt").read_text() == "header\n" + shown


@pytest.mark.parametrize(
    "args, csv, expected",
    [
        (["predict", "--model", "models:/nobody@champion"], "ok", "no registered model named"),
        (["predict", "--model", "models:/crop_yields_builtin@nope"], "ok", "has no alias 'nope'"),
        (["predict", "--model", "models:/crop_yields_builtin/99"], "ok", "has no version 99"),
        (["predict", "--model", "models/crop_yields_builtin"], "ok", "neither a model URI"),
        (["predict", "--model", "models:crop_yields_builtin"], "ok", "does not parse"),
        (["predict", "--model", "models:/m-nosuch"], "ok", "names no logged model"),
        (["predict", "--model", "models:/crop_yields_builtin"], "ok",
         "names no version of 'crop_yields_builtin': add @champion"),
        (["predict", "--model", "models:/crop_yields_builtin@champion"],
         " temp,rainfall ,humidity\n1,2,3\n", "the file has ' temp', 'rainfall ', humidity)"),
        (["predict", "--model", "models:/crop_yields_builtin@champion"],
         "temp,rainfall\n1,2\n", "no column named humidity"),
        (["predict", "--model", "models:/crop_yields_builtin@champion"],
         "temp,rainfall,humidity,wind\n1,2,3,4\n", "unexpected column wind"),
        (["predict", "--model", "models:/crop_yields_builtin@champion"],
         "temp,rainfall,humidity\n1,two,3\n", "column rainfall"),
        (["predict", "--model", "models:/crop_yields_builtin@champion"],
         "temp,rainfall,humidity\n", "no data rows"),
        (["predict", "--model", "models:/crop_yields_builtin@champion", "--output",
          "/no/such/folder/y.csv"], "ok", "the folder /no/such/folder does not exist"),
        (["predict", "--model", "models:/crop_yields_builtin@champion"],
         "temp,rainfall,humidity\n1,NaN,3\n", "('NaN')"),
        (["predict", "--model", "models:/crop_yields_builtin@champion"],
         "temp,rainfall,humidity\n1,2,3\n1,-1e39,3\n",
         "column rainfall holds -1e+39 in data row 2, beyond the model's float32 range"),
        (["predict", "--model", "models:/crop_yields_builtin@champion"],
         "temp,rainfall,humidity\n1,2,3\n3e38,3e38,3e38\n",
         "the prediction for data row 2 overflows the model's numbers"),
        (["models", "nobody"], None, "no registered model named 'nobody'"),
        (["promote", "nobody", "1"], None, "no registered model named 'nobody'"),
        (["promote", "crop_yields_builtin", "99"], None, "has no version 99"),
        (["promote", "crop_yields_builtin", "\u0661"], None, "must be a version number"),
        (["predict", "--model", ""], "ok", "the model URI is empty"),
        (["predict", "--model", "models:/crop_yields_builtin/\u0661"], "ok", "does not parse"),
        (["promote", "crop_yields_builtin", "1", "--alias", "v7"], None, "refused"),
        (["compare", "-e", "never_ran"], None, "no runs recorded"),
        (["compare", "-e", "crop_yields_builtin", "--metric", "nope"], None, "no run has metric"),
    ],
)
def test_bad_input_gets_one_line(registry_store, tmp_path, args, csv, expected):
    # In-process for speed; test_cli.py checks the same contract through real subprocesses.
    folder, store = registry_store
    if csv is not None:
        (tmp_path / "x.csv").write_text("temp,rainfall,humidity\n1,2,3\n" if csv == "ok" else csv)
        args = [*args, "--input", str(tmp_path / "x.csv")]
    result = CliRunner().invoke(cli, [*args, "--tracking-uri", store])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)  # a handled error, not a crash
    assert len(lines) == 1 and expected in lines[0], result.stderr
