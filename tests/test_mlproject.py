"""The project as users drive it: `mlflow run .` and a real `mlflow server` on loopback."""

from __future__ import annotations

import subprocess
import sys

import mlflow
import pandas as pd
import pytest

from tests import servers
from tests.conftest import BIN, REPO, free_port, subprocess_env


def test_mlflow_run_main_entry_point(workdir):
    store = f"sqlite:///{workdir / 'mlflow.db'}"
    result = subprocess.run(
        [str(BIN / "mlflow"), "run", str(REPO), "-e", "main", "--env-manager", "local",
         "--experiment-name", "line_2x_plus_1", "-P", "experiment=line_2x_plus_1"],
        cwd=workdir, capture_output=True, text=True, timeout=300,
        env=subprocess_env(MLFLOW_TRACKING_URI=store),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    mlflow.set_tracking_uri(store)
    experiment = mlflow.get_experiment_by_name("line_2x_plus_1")
    runs = mlflow.search_runs([experiment.experiment_id], output_format="list")
    by_stage = {r.data.tags.get("stage"): r for r in runs}
    assert set(by_stage) == {"pipeline", "generate", "train", "evaluate"}
    assert all(r.info.status == "FINISHED" for r in runs)
    # The run `mlflow run` opened is the parent of the three stages.
    parent_id = by_stage["pipeline"].info.run_id
    assert by_stage["pipeline"].data.tags["mlflow.project.entryPoint"] == "main"
    assert all(by_stage[s].data.tags["mlflow.parentRunId"] == parent_id
               for s in ("generate", "train", "evaluate"))
    assert by_stage["evaluate"].data.metrics["r2"] > 0.999


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` (tests/servers.py) shared by this module: its URL and the
    folder its proxied artifacts go to."""
    with servers.mlflow_server(tmp_path_factory.mktemp("server")) as server:
        yield server.url, server.artifacts


def test_pipeline_against_a_real_tracking_server(workdir, mlflow_server):
    mlflow_server, _ = mlflow_server
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "-e", "line_fit_15pts",
         "--tracking-uri", mlflow_server],
        cwd=workdir, capture_output=True, text=True, timeout=300, env=subprocess_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client = mlflow.MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("line_fit_15pts")
    runs = client.search_runs([experiment.experiment_id])
    train_run = next(r for r in runs if r.data.tags.get("stage") == "train")
    curve = sorted(client.get_metric_history(train_run.info.run_id, "train_loss"),
                   key=lambda m: m.step)
    assert len(curve) == 12 and curve[10].value == pytest.approx(0.20337, rel=1e-4)
    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pyfunc.load_model(f"models:/{train_run.outputs.model_outputs[0].model_id}")
    assert model.predict(pd.DataFrame({"x": [1.0, 2.0, 3.0]})).shape == (3, 1)
    assert not (workdir / "mlflow.db").exists()  # nothing went to the default local store


PASSWORD = "pw-4f1c9e"  # distinctive, so a search for it finds nothing by chance


def test_no_password_in_the_store_or_on_the_screen(workdir, mlflow_server):
    url, artifacts = mlflow_server
    with_password = url.replace("http://", f"http://pipeline:{PASSWORD}@")
    storage = f"postgresql://optuna:{PASSWORD}@127.0.0.1:{free_port()}/optuna"
    commands = [
        ["run", "-e", "line_fit_15pts"],
        ["sweep", "-e", "line_fit_15pts", "--n-trials", "3", "--epochs-range", "5", "20"],
        ["sweep", "-e", "line_fit_15pts", "--n-trials", "3", "--storage", storage],
        ["run", "-e", "line_fit_15pts", "--set", "lr=oops"],
    ]
    printed = ""
    for args in commands:
        result = subprocess.run([sys.executable, "-m", "pipeline", *args,
                                 "--tracking-uri", with_password],
                                cwd=workdir, capture_output=True, text=True, timeout=300,
                                env=subprocess_env())
        printed += result.stdout + result.stderr
    assert "in http://pipeline:***@127.0.0.1" in printed  # the URL is shown, masked,
    assert f"open {url} in a browser" in printed  # and without its user where it is to open
    assert "storage postgresql://optuna:***@127.0.0.1" in printed
    assert PASSWORD not in printed
    client = mlflow.MlflowClient(url)
    experiment = client.get_experiment_by_name("line_fit_15pts")
    runs = client.search_runs([experiment.experiment_id])
    assert {r.data.tags.get("stage") for r in runs} >= {"pipeline", "sweep", "trial"}
    for run in runs:
        assert PASSWORD not in repr(run.data.params) + repr(run.data.tags)
    for path in [*artifacts.rglob("*"), *workdir.rglob("*")]:
        if path.is_file() and path.suffix in ("", ".json", ".csv", ".txt", ".yaml", ".py",
                                              ".journal", ".db", ".log"):
            assert PASSWORD.encode() not in path.read_bytes(), path


def test_mlflow_run_generate_train_evaluate_and_sweep_entry_points(workdir):
    """Each stage as its own `mlflow run -e ...`, the runs chained by the URIs they print."""
    store = f"sqlite:///{workdir / 'mlflow.db'}"

    def mlflow_run(entry: str, *params: str) -> subprocess.CompletedProcess:
        args = [str(BIN / "mlflow"), "run", str(REPO), "-e", entry, "--env-manager", "local",
                "--experiment-name", "slope_only", "-P", "experiment=slope_only"]
        for param in params:
            args += ["-P", param]
        result = subprocess.run(args, cwd=workdir, capture_output=True, text=True, timeout=300,
                                env=subprocess_env(MLFLOW_TRACKING_URI=store))
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    data_uri = mlflow_run("generate").stdout.split()[-1]
    assert data_uri.startswith("runs:/") and data_uri.endswith("/dataset")
    model_uri = mlflow_run("train", f"data={data_uri}", "overrides=lr=0.05 epochs=20"
                           ).stdout.split()[-1]
    assert model_uri.startswith("models:/")
    mlflow_run("evaluate", f"model_uri={model_uri}", f"data={data_uri}")
    mlflow_run("sweep", "n_trials=3", f"storage={workdir / 'optuna.journal'}")

    mlflow.set_tracking_uri(store)
    experiment = mlflow.get_experiment_by_name("slope_only")
    runs = mlflow.search_runs([experiment.experiment_id], output_format="list")
    entry = {r.data.tags.get("mlflow.project.entryPoint"): r for r in runs
             if "mlflow.project.entryPoint" in r.data.tags}
    assert set(entry) == {"generate", "train", "evaluate", "sweep"}
    assert {entry[e].data.tags["stage"] for e in entry} == {"generate", "train", "evaluate",
                                                            "sweep"}
    assert all(r.info.status == "FINISHED" for r in runs)
    assert entry["train"].data.params["lr"] == "0.05"
    assert entry["evaluate"].data.tags["model_uri"] == model_uri
    trials = [r for r in runs if r.data.tags.get("stage") == "trial"]
    assert len(trials) == 3
    assert {t.data.tags["mlflow.parentRunId"] for t in trials} == {entry["sweep"].info.run_id}


def test_conda_yaml_installs_what_pyproject_does():
    # `mlflow run .` builds its environment from conda.yaml's pip list: the same packages at
    # the same versions as `pip install -e .`, or a command fails there for a missing one.
    import tomllib
    import yaml

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    environment = yaml.safe_load((REPO / "conda.yaml").read_text())["dependencies"]
    [pip] = [item["pip"] for item in environment if isinstance(item, dict)]
    assert sorted(pip) == sorted(project)


def test_mlflow_run_again_leaves_no_stray_run_and_a_study_stays_in_its_experiment(workdir):
    # A generate whose data are cached, and a study resumed, record nothing of their own: the
    # run `mlflow run` opened says so and nests under the study's parent. Resumed under another
    # experiment name, or none, the study's trials stay in its parent's experiment.
    store = f"sqlite:///{workdir / 'mlflow.db'}"
    storage = str(workdir / "optuna.journal")

    def run(*args: str) -> None:
        result = subprocess.run(args, cwd=workdir, capture_output=True, text=True, timeout=300,
                                env=subprocess_env(MLFLOW_TRACKING_URI=store))
        assert result.returncode == 0, result.stderr[-3000:]

    project = [str(BIN / "mlflow"), "run", str(REPO), "--env-manager", "local",
               "--experiment-name", "elsewhere", "-P", "experiment=line_fit_15pts"]
    run(*project, "-e", "generate")
    run(*project, "-e", "generate")  # the same data: reused
    run(*project, "-e", "sweep", "-P", "n_trials=2", "-P", f"storage={storage}")
    run(sys.executable, "-m", "pipeline", "sweep", "-e", "line_fit_15pts", "--n-trials", "3",
        "--storage", storage, "--epochs-range", "5", "20")
    run(*project, "-e", "sweep", "-P", "n_trials=3", "-P", f"storage={storage}")  # resumed

    client = mlflow.MlflowClient(store)
    assert client.get_experiment_by_name("line_fit_15pts") is None  # nothing went there
    runs = client.search_runs([client.get_experiment_by_name("elsewhere").experiment_id])
    stages = sorted(r.data.tags.get("stage", "") for r in runs)
    assert stages == ["generate", "generate", "resume", "sweep", "trial", "trial", "trial"]
    [parent] = [r for r in runs if r.data.tags["stage"] == "sweep"]
    for run_ in runs:
        if run_.data.tags["stage"] in ("trial", "resume"):
            assert run_.data.tags["mlflow.parentRunId"] == parent.info.run_id
    reused = [r for r in runs if "data_uri" in r.data.tags]
    assert len(reused) == 1 and "reused" in reused[0].data.tags["mlflow.note.content"]


@pytest.mark.parametrize(
    "parameter, reason",
    [("overrides=colour=red", "unknown key colour"),
     ("device=gpu", "Invalid value for '--device': 'gpu' is not one of")],  # Click's own
    ids=["config", "option"],
)
def test_mlflow_run_refused_for_bad_input_says_why_on_its_run(workdir, parameter, reason):
    store = f"sqlite:///{workdir / 'mlflow.db'}"
    result = subprocess.run(
        [str(BIN / "mlflow"), "run", str(REPO), "-e", "train", "--env-manager", "local",
         "--experiment-name", "refused", "-P", "experiment=line_fit_15pts", "-P", parameter],
        cwd=workdir, capture_output=True, text=True, timeout=300,
        env=subprocess_env(MLFLOW_TRACKING_URI=store))
    assert result.returncode != 0 and f"Error: {reason}" in result.stderr
    client = mlflow.MlflowClient(store)
    [run] = client.search_runs([client.get_experiment_by_name("refused").experiment_id])
    assert run.info.status == "FAILED"  # mlflow run's own status for a failed command
    assert run.data.tags["mlflow.note.content"].startswith(f"Refused: {reason}")
