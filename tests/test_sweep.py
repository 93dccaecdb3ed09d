"""Sweeps: Optuna trials as nested MLflow runs, resuming, parallel workers, theory, the registry."""

from __future__ import annotations

import subprocess
import sys

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from pipeline import config, data, sweep_report, theory
from pipeline import sweep as sweep_module
from pipeline.cli import cli
from pipeline.storages import open_storage
from pipeline.study import make_pruner
from pipeline.train import train
from tests.conftest import run_statuses, subprocess_env


def sweep(store: str, *args: str):
    result = CliRunner().invoke(cli, ["sweep", *args, "--tracking-uri", store])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def study_of(name: str, storage: str = "optuna.journal") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(storage))


def sweep_runs(store: str, experiment: str):
    client = MlflowClient(store)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("stage") == "sweep"]
    children = [r for r in runs if r.data.tags.get("stage") == "trial"]
    return parents, children


def curve_length(store: str, run_id: str) -> int:
    return len(MlflowClient(store).get_metric_history(run_id, "train_loss"))


def test_sweep_resume_and_extend(store):
    output = sweep(store, "-e", "crop_yields_builtin", "--n-trials", "20")
    assert "champion is v1" in output and "models:/crop_yields_builtin@champion" in output

    study = study_of("crop_yields_builtin")
    trials = study.get_trials()
    assert len(trials) == 20
    assert {t.state for t in trials} <= {optuna.trial.TrialState.COMPLETE,
                                         optuna.trial.TrialState.PRUNED}
    parents, children = sweep_runs(store, "crop_yields_builtin")
    assert len(parents) == 1 and len(children) == 20
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    by_run = {c.info.run_id: c for c in children}
    expected_status = {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}
    for trial in trials:
        child = by_run[trial.user_attrs["mlflow_run_id"]]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["optuna_state"] == trial.state.name
        assert child.info.status == expected_status[trial.state.name]
        assert float(child.data.params["lr"]) == pytest.approx(trial.params["lr"])
        assert int(child.data.params["epochs"]) == trial.params["epochs"]
        length = curve_length(store, child.info.run_id)
        if trial.state.name == "COMPLETE":
            assert length == trial.params["epochs"] + 1
            assert child.data.metrics["objective"] == pytest.approx(trial.value)
        else:
            assert length <= trial.params["epochs"] + 1

    best = study.best_trial
    assert parent.data.metrics["best_value"] == pytest.approx(best.value)
    assert parent.data.metrics["best_lr"] == pytest.approx(best.params["lr"])
    assert {"lr_max_stable", "lr_best_constant", "optimum_loss",
            "optimum_objective"} <= set(parent.data.metrics)
    assert parent.data.metrics["optimum_objective"] <= best.value
    # The parent sorts with its trials (objective), and the UI shows its description.
    assert parent.data.metrics["objective"] == pytest.approx(best.value)
    assert "Optuna sweep" in parent.data.tags["mlflow.note.content"]
    artifacts = {a.path for a in MlflowClient(store).list_artifacts(parent.info.run_id)}
    assert "trials.csv" in artifacts
    plots = {a.path for a in MlflowClient(store).list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/optimization_history.png", "plots/trials_loss_curves.png",
            "plots/trials_lr_epochs.png"} <= plots
    table = mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/trials.csv")
    assert len(table.strip().splitlines()) == 21
    assert "system_attrs" not in table.splitlines()[0]

    mlflow.set_tracking_uri(store)
    champion = MlflowClient(store).get_model_version_by_alias("crop_yields_builtin", "champion")
    assert champion.tags["trial"] == str(best.number)
    assert float(champion.tags["objective"]) == pytest.approx(best.value)
    model = mlflow.pyfunc.load_model("models:/crop_yields_builtin@champion")
    for rows in (1, 10_000):
        ones = pd.DataFrame(np.ones((rows, 3)), columns=["temp", "rainfall", "humidity"])
        assert model.predict(ones).shape == (rows, 2)
    # The registered model is the best trial's: it reproduces the trial's objective.
    exp = config.load("crop_yields_builtin")
    dataset = data.build(exp.data, exp.seed)
    predictions = mlflow.pytorch.load_model("models:/crop_yields_builtin@champion")(
        __import__("torch").as_tensor(dataset.features, dtype=__import__("torch").float32))
    mse = float(((predictions.detach().numpy() - dataset.targets) ** 2).mean())
    assert mse == pytest.approx(best.value, rel=1e-4)

    output = sweep(store, "-e", "crop_yields_builtin", "--n-trials", "20")
    assert "nothing to run" in output
    assert len(study_of("crop_yields_builtin").trials) == 20
    parents, children = sweep_runs(store, "crop_yields_builtin")
    assert len(parents) == 1 and len(children) == 20

    # Resuming with another sampler is allowed; params stay as first logged.
    sweep(store, "-e", "crop_yields_builtin", "--n-trials", "30", "--sampler", "random")
    trials = study_of("crop_yields_builtin").trials
    assert len(trials) == 30
    # A resumed sampler proposes new points, not the first trials again.
    assert len({(t.params["lr"], t.params["epochs"]) for t in trials}) == 30
    parents, children = sweep_runs(store, "crop_yields_builtin")
    assert len(parents) == 1 and len(children) == 30
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert "RUNNING" not in run_statuses(store_path(store))
    assert parents[0].info.status == "FINISHED"
    # The sweep's parent carries the data key too, but is no dataset: runs still work.
    result = CliRunner().invoke(cli, ["run", "-e", "crop_yields_builtin", "--tracking-uri", store])
    assert result.exit_code == 0, result.output


def store_path(store: str):
    from pathlib import Path

    return Path(store.removeprefix("sqlite:///"))


def test_parallel_workers_share_one_study(store):
    output = sweep(store, "-e", "line_fit_15pts", "--n-trials", "24", "--workers", "3",
                   "--epochs-range", "5", "60")
    import os

    if (os.cpu_count() or 1) < 3:  # more workers than cores only take turns: capped, said
        assert f"running {os.cpu_count()}, as more would only take turns" in output
    trials = study_of("line_fit_15pts").get_trials()
    assert len(trials) == 24
    assert sorted(t.number for t in trials) == list(range(24))
    parents, children = sweep_runs(store, "line_fit_15pts")
    assert len(parents) == 1 and len(children) == 24
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert sorted(int(c.data.tags["optuna_trial"]) for c in children) == list(range(24))
    assert {t.user_attrs["mlflow_run_id"] for t in trials} == {c.info.run_id for c in children}
    assert "RUNNING" not in run_statuses(store_path(store))


def test_divergent_learning_rates_are_pruned(store):
    exp = config.load("slope_only")
    dataset = data.build(exp.data, exp.seed)
    edge = theory.learning_rates(dataset, fit_bias=False, reduction="mean")["lr_max_stable"]
    sweep(store, "-e", "slope_only", "--n-trials", "12", "--lr-range", "0.01", "3",
          "--sampler", "random", "--pruner", "none")
    trials = study_of("slope_only").get_trials()
    assert len(trials) == 12 and all(t.state.is_finished() for t in trials)
    divergent = [t for t in trials if t.params["lr"] > 1.2 * edge]
    stable = [t for t in trials if t.params["lr"] < edge]
    assert divergent and stable  # the random draws cover both sides of the edge
    assert all(t.state == optuna.trial.TrialState.PRUNED for t in divergent)
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in stable)
    _, children = sweep_runs(store, "slope_only")
    tags = {c.info.run_id: c.data.tags for c in children}
    assert all(tags[t.user_attrs["mlflow_run_id"]]["diverged"] == "true" for t in divergent)


def test_theory_finds_the_stability_edge():
    # slope_only: loss mean((w x - y)²) has curvature 2 mean(x²), so the edge is 1 / mean(x²).
    exp = config.load("slope_only", ["dtype=float64"])
    dataset = data.build(exp.data, exp.seed)
    rates = theory.learning_rates(dataset, fit_bias=False, reduction="mean")
    mean_square = np.mean(dataset.features**2)
    assert rates["lr_max_stable"] == pytest.approx(1 / mean_square)
    # One direction only: the best rate is half the edge and lands on the optimum in one step.
    assert rates["lr_best_constant"] == pytest.approx(0.5 / mean_square)
    below = train(config.with_train(exp, lr=0.98 * rates["lr_max_stable"], epochs=30).train,
                  dataset)
    above = train(config.with_train(exp, lr=1.02 * rates["lr_max_stable"], epochs=30).train,
                  dataset)
    assert below.train_loss[-1] < below.train_loss[0]
    assert above.train_loss[-1] > above.train_loss[0]
    at_best = train(config.with_train(exp, lr=rates["lr_best_constant"], epochs=1).train,
                    dataset)
    assert at_best.train_loss[-1] == pytest.approx(rates["optimum_loss"], rel=1e-9)


def test_theory_for_several_parameters_matches_eigenvalues():
    exp = config.load("crop_yields_manual", ["dtype=float64"])
    dataset = data.build(exp.data, exp.seed)
    rates = theory.learning_rates(dataset, fit_bias=True, reduction="mean")
    x = np.hstack([dataset.features, np.ones((5, 1))])
    eigenvalues = np.linalg.eigvalsh(2 * x.T @ x / dataset.targets.size)
    assert rates["lr_max_stable"] == pytest.approx(2 / eigenvalues[-1])
    assert rates["lr_best_constant"] == pytest.approx(2 / (eigenvalues[0] + eigenvalues[-1]))
    above = train(config.with_train(exp, lr=1.05 * rates["lr_max_stable"], epochs=200).train,
                  dataset)
    assert above.diverged or above.train_loss[-1] > above.train_loss[0]


@pytest.mark.parametrize("name, content, expected", [
    ("notes.txt", b"important data", "notes.txt is not an Optuna journal"),
    ("runs.db", b"SQLite format 3\x00" + bytes(4080) + b"no newline",
     "runs.db is an SQLite database, not an Optuna journal; give it as sqlite:///runs.db"),
])
def test_a_storage_file_that_is_not_a_journal_is_left_as_it_is(workdir, name, content,
                                                                expected):
    # It was cut back to its last newline as a journal a writer died in: data lost.
    (workdir / name).write_bytes(content)
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "sweep", "-e", "line_fit_15pts", "--storage", name],
        cwd=workdir, capture_output=True, text=True, env=subprocess_env(), timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and len(lines) == 1 and expected in lines[0], result.stderr
    assert (workdir / name).read_bytes() == content


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--lr-range", "0.1", "0.01"], "--lr-range must be a range [low, high] with low <="),
        (["--lr-range", "0.1", "inf"], "--lr-range must be two finite numbers [low, high]"),
        (["--lr-range", "0", "0.1"], "--lr-range must lie above 0"),
        (["--epochs-range", "50", "5"], "--epochs-range must be a range [low, high] with"),
        (["--epochs-range", "0", "5"], "--epochs-range must start at 1 or more"),
        (["--epochs-range", "5", "100000000"], "--epochs-range must end at 1,000,000 or less"),
        (["--n-trials", "0"], "--n-trials must be >= 1"),
        (["--workers", "-1"], "--workers must be >= 0"),
        (["--seed", "-5"], "--seed must lie in [0, 2**32)"),
        (["--device", "cuda"], "device cuda was asked for"),
        (["--storage", "sqlite:////no/such/folder/optuna.db"], "cannot open storage"),
        (["--storage", "postgresql://nobody@127.0.0.1:9/none"], "cannot open storage"),
        (["--storage", "damaged.journal"], "journal storage damaged.journal cannot be read"),
        (["--storage", "sqlite://"], "is a database in memory"),
        (["--storage", ""], "the Optuna storage is empty"),
        (["--storage", "/dev/null"], "/dev/null is not a regular file"),
        (["--study-name", ""], "--study-name must be a name of printable characters"),
        (["--study-name", "a\nb"], "got 'a\\nb'"),
        (["--epochs-range", "1", "99999999999999999999"], "must end at 1,000,000 or less"),
    ],
)
def test_bad_sweep_input(workdir, args, expected):
    if "cuda" in args and __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA")
    (workdir / "damaged.journal").write_text('{"op_code": 0, "worker_id": "a"}\n{"op_co\n')
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "sweep", "-e", "line_fit_15pts", *args],
        cwd=workdir, capture_output=True, text=True, env=subprocess_env(), timeout=120,
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert "RUNNING" not in run_statuses(workdir / "mlflow.db")
    assert run_statuses(workdir / "mlflow.db") == []  # refused before any run opened


def test_default_lr_range_comes_from_theory():
    from pipeline.sweep import search_space
    from pipeline.sweep_settings import SweepSettings

    exp = config.load("line_fit_15pts", ["sweep.lr=[]"])
    dataset = data.build(exp.data, exp.seed)
    rates = theory.learning_rates(dataset, fit_bias=True, reduction="mean")
    lr, epochs = search_space(exp, SweepSettings(n_trials=1), rates)
    assert lr == pytest.approx((rates["lr_max_stable"] / 1000, rates["lr_max_stable"]))
    assert epochs == tuple(exp.sweep.epochs)


@pytest.mark.parametrize("name", config.available())
def test_every_shipped_range_holds_theorys_best_rate(name):
    exp = config.load(name)
    train_set, _ = data.split(data.build(exp.data, exp.seed), exp.val_fraction, exp.seed)
    rates = theory.learning_rates(train_set, exp.train.has_bias, exp.train.loss)
    low, high = exp.sweep.lr
    assert low <= rates["lr_best_constant"] <= high
    assert theory.range_notes(exp.sweep.lr, rates) == []


def test_a_range_without_the_best_rate_is_named_in_a_warning():
    rates = {"lr_best_constant": 1.117e-4, "lr_max_stable": 1.117e-4}
    [note] = theory.range_notes((1e-7, 1e-4), rates)
    assert "best constant lr 0.0001117 lies above the lr range [1e-07, 0.0001]" in note


def test_champion_moves_only_to_a_better_model(store):
    sweep(store, "-e", "line_fit_15pts", "--n-trials", "4", "--epochs-range", "20", "40")
    worse = sweep(store, "-e", "line_fit_15pts", "--n-trials", "2", "--study-name", "slow",
                  "--lr-range", "1e-5", "2e-5", "--epochs-range", "5", "6")
    assert "kept v1" in worse
    client = MlflowClient(store)
    assert str(client.get_model_version_by_alias("line_fit_15pts", "champion").version) == "1"
    assert len(client.search_model_versions("name = 'line_fit_15pts'")) == 2
    parents, _ = sweep_runs(store, "line_fit_15pts")
    slow = next(p for p in parents if p.data.tags["optuna_study"] == "slow")
    assert slow.data.tags["champion_decision"].startswith("kept v1")
    assert slow.data.metrics["champion_previous_objective"] < slow.data.metrics["best_value"]


def test_log_models_all_logs_a_model_per_completed_trial(store):
    sweep(store, "-e", "line_fit_15pts", "--n-trials", "3", "--epochs-range", "5", "10",
          "--log-models", "all", "--pruner", "none")
    _, children = sweep_runs(store, "line_fit_15pts")
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert finished and all(c.data.tags["model_uri"].startswith("models:/") for c in finished)


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_a_study_of_the_same_name_made_elsewhere_is_refused(workdir, direction):
    # Its trials were counted towards --n-trials, its best value shown, then a traceback.
    plain = optuna.create_study(study_name="line_fit_15pts", direction=direction,
                                storage=open_storage("optuna.journal"))
    plain.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=3)
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "sweep", "-e", "line_fit_15pts", "--n-trials", "5"],
        cwd=workdir, capture_output=True, text=True, env=subprocess_env(), timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert "study 'line_fit_15pts' in this storage was not made by `pipeline sweep`" in lines[0]
    assert len(study_of("line_fit_15pts").trials) == 3
    assert not (workdir / "mlflow.db").exists()  # refused before the store is touched


def test_a_study_resumed_on_changed_data_is_refused(workdir, store):
    # The config is the same, the CSV's rows are not: the study's trials would no longer be
    # comparable, and the data the workers read (the sweep's copy) would not be the file's.
    (workdir / "rows.csv").write_text("x,y\n1,3\n2,5\n3,7\n4,9\n")
    (workdir / "rows.yaml").write_text(
        "seed: 0\nmodel: manual\nlr: 0.01\nepochs: 5\ndata:\n  source: csv\n"
        "  csv: rows.csv\n  features: [x]\n  targets: [y]\n"
        "sweep:\n  lr: [0.001, 0.05]\n  epochs: [2, 5]\n")
    sweep(store, "-e", "rows.yaml", "--n-trials", "2")
    (workdir / "rows.csv").write_text("x,y\n1,3\n2,5\n3,7\n4,10\n")
    result = CliRunner().invoke(cli, ["sweep", "-e", "rows.yaml", "--n-trials", "4",
                                      "--tracking-uri", store])
    assert result.exit_code != 0
    assert "was made with other data than 'rows' gives now" in result.output
    assert len(study_of("rows").trials) == 2
    assert "RUNNING" not in run_statuses(workdir / "mlflow.db")


def test_a_study_made_with_other_settings_is_refused(workdir, store):
    sweep(store, "-e", "line_fit_15pts", "--n-trials", "2", "--epochs-range", "5", "20")
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "sweep", "-e", "line_fit_15pts", "--n-trials", "4",
         "--set", "loss=sum", "--tracking-uri", store],
        cwd=workdir, capture_output=True, text=True, env=subprocess_env(), timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert "was made with other settings" in lines[0] and "--study-name" in lines[0]
    assert len(study_of("line_fit_15pts").trials) == 2  # nothing ran on the old study
    assert "RUNNING" not in run_statuses(workdir / "mlflow.db")
    # Refused before the store is touched: an experiment of another name is not made.
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "sweep", "-e", "slope_only", "--study-name",
         "line_fit_15pts", "--tracking-uri", store],
        cwd=workdir, capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert result.returncode != 0 and "was made with other settings" in result.stderr
    assert MlflowClient(store).get_experiment_by_name("slope_only") is None


def test_a_study_resumes_under_another_engine(store):
    # The engine is how descent runs, not what it computes: the trials stay comparable.
    said = sweep(store, "-e", "line_fit_15pts", "--n-trials", "2", "--epochs-range", "5", "20")
    assert "2 of 2 trials to run" in said and "in closed form from the rows' statistics" in said
    said = sweep(store, "-e", "line_fit_15pts", "--n-trials", "4", "--set", "engine=loop")
    assert "2 of 4 trials to run" in said and "up to 2 at a time, epoch by epoch" in said
    trials = study_of("line_fit_15pts").trials
    assert len(trials) == 4 and {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}
    _, children = sweep_runs(store, "line_fit_15pts")
    engines = {int(r.data.params["trial_number"]): r.data.params["engine"] for r in children}
    assert engines == {0: "auto", 1: "auto", 2: "loop", 3: "loop"}


def test_timeout_stops_starting_trials_and_still_summarises(store):
    output = sweep(store, "-e", "crop_yields_manual", "--n-trials", "10000", "--timeout",
                   "0.5", "--batch", "2", "--pruner", "none")
    study = study_of("crop_yields_manual")
    finished = [t for t in study.trials if t.state.is_finished()]
    assert 1 <= len(finished) < 10000
    # Nothing left running or failed: pruned ones are those that diverged (lr past the edge).
    assert {t.state for t in study.trials} <= {optuna.trial.TrialState.COMPLETE,
                                               optuna.trial.TrialState.PRUNED}
    assert "best: value" in output
    assert f"--timeout 0.5s reached: {len(finished)} of 10000 trials finished" in output
    parents, children = sweep_runs(store, "crop_yields_manual")
    assert len(children) == len(study.trials)
    assert parents[0].info.status == "FINISHED"


@pytest.mark.parametrize("pruner, kind", [("percentile", optuna.pruners.PercentilePruner),
                                          ("hyperband", optuna.pruners.HyperbandPruner)])
def test_percentile_and_hyperband_pruners(store, pruner, kind):
    assert isinstance(make_pruner(pruner), kind)
    sweep(store, "-e", "line_fit_15pts", "--n-trials", "12", "--pruner", pruner,
          "--epochs-range", "20", "200")
    study = study_of("line_fit_15pts")
    states = {t.state for t in study.trials}
    assert len(study.trials) == 12 and states <= {optuna.trial.TrialState.COMPLETE,
                                                   optuna.trial.TrialState.PRUNED}
    parents, children = sweep_runs(store, "line_fit_15pts")
    assert parents[0].data.params["sweep.pruner"] == pruner
    for child in children:  # each run's status mirrors its trial
        trial = study.trials[int(child.data.tags["optuna_trial"])]
        assert child.data.tags["optuna_state"] == trial.state.name


def test_a_journal_cut_short_mid_record_is_mended(store, workdir):
    sweep(store, "-e", "line_fit_15pts", "--n-trials", "3", "--epochs-range", "5", "20")
    journal = workdir / "optuna.journal"
    whole = journal.read_bytes()
    with journal.open("ab") as tail:  # a writer killed in the middle of an append
        tail.write(b'{"op_code": 5, "worker_id": "abc", "trial_id": 3, "par')
    sweep(store, "-e", "line_fit_15pts", "--n-trials", "5", "--epochs-range", "5", "20")
    assert journal.read_bytes().startswith(whole)
    assert all(line.endswith(b"}") for line in journal.read_bytes().splitlines())
    study = study_of("line_fit_15pts")
    assert len([t for t in study.trials if t.state.is_finished()]) == 5
    assert "RUNNING" not in run_statuses(workdir / "mlflow.db")


def test_a_parent_left_by_a_set_up_that_died_is_closed(store, workdir, monkeypatch):
    from pipeline import tracking

    def killed(*_args):  # stands for kill -9 between creating the parent and recording it
        raise SystemExit(137)

    with monkeypatch.context() as patch:
        patch.setattr(tracking, "write_dataset", killed)
        died = CliRunner().invoke(cli, ["sweep", "-e", "line_fit_15pts", "--n-trials", "2",
                                        "--epochs-range", "5", "20", "--tracking-uri", store])
    assert died.exit_code == 137 and run_statuses(workdir / "mlflow.db") == ["RUNNING"]
    sweep(store, "-e", "line_fit_15pts", "--n-trials", "2", "--epochs-range", "5", "20")
    parents, children = sweep_runs(store, "line_fit_15pts")
    assert sorted(p.info.status for p in parents) == ["FAILED", "FINISHED"]
    assert len(children) == 2 and "RUNNING" not in run_statuses(workdir / "mlflow.db")


def test_finalising_again_finds_the_version_already_registered(store):
    from pipeline.sweep import FINALISED_ATTR

    sweep(store, "-e", "line_fit_15pts", "--n-trials", "3", "--epochs-range", "5", "20")
    study = study_of("line_fit_15pts")
    best_run = study.best_trial.user_attrs["mlflow_run_id"]
    # As if killed after registering but before the trial's run recorded it.
    client = MlflowClient(store)
    client.delete_tag(best_run, "registered_version")
    study.set_user_attr(FINALISED_ATTR, -1)
    output = sweep(store, "-e", "line_fit_15pts", "--n-trials", "3", "--epochs-range", "5", "20")
    versions = client.search_model_versions("name = 'line_fit_15pts'")
    assert [str(v.version) for v in versions] == ["1"] and "line_fit_15pts v1" in output
    assert client.get_run(best_run).data.tags["registered_version"] == "1"


def test_a_champion_deleted_from_the_registry_is_registered_again(store):
    args = ("-e", "line_fit_15pts", "--epochs-range", "5", "20", "--n-trials")
    sweep(store, *args, "3")
    client = MlflowClient(store)
    client.delete_model_version("line_fit_15pts", "1")  # in the UI, say
    output = sweep(store, *args, "3")  # no new trial: the best is registered again
    assert "model: line_fit_15pts v2 (first champion); champion is v2" in output
    best_run = study_of("line_fit_15pts").best_trial.user_attrs["mlflow_run_id"]
    assert client.get_run(best_run).data.tags["registered_version"] == "2"
    assert str(client.get_model_version_by_alias("line_fit_15pts", "champion").version) == "2"
    output = sweep(store, *args, "4")  # and the study goes on from there
    assert "model: line_fit_15pts v2" in output or "model: line_fit_15pts v3" in output
    client.delete_registered_model_alias("line_fit_15pts", "champion")
    output = sweep(store, *args, "4")
    assert "no version holds @champion (`pipeline promote line_fit_15pts" in output


def test_a_study_measuring_its_objective_otherwise_does_not_take_the_champion(store):
    args = ("-e", "line_fit_15pts", "--epochs-range", "5", "20", "--n-trials", "3")
    sweep(store, *args)
    output = sweep(store, *args, "--study-name", "held_out", "--set", "val_fraction=0.2")
    assert "model: line_fit_15pts v2 (kept v1, not compared: its objective is the final " \
           "training loss (mean) on the rows of data" in output
    assert "this one the validation MSE on 0.2 of the rows of data" in output
    holder = MlflowClient(store).get_model_version_by_alias("line_fit_15pts", "champion")
    assert str(holder.version) == "1"


def test_a_study_goes_on_only_in_the_store_it_is_tracked_in(store, workdir):
    args = ["sweep", "-e", "line_fit_15pts", "--epochs-range", "5", "20", "--n-trials"]
    sweep(store, *args[1:], "2")
    other = f"sqlite:///{workdir / 'other.db'}"
    for uri in (other, "sqlite:///other.db"):  # refused before that file is made
        result = CliRunner().invoke(cli, [*args, "3", "--tracking-uri", uri])
        assert result.exit_code == 1, result.output
        assert (f"study 'line_fit_15pts' is tracked in {store} (its parent run " in result.stderr
                and f"not in {uri}: give --tracking-uri {store} to go on" in result.stderr)
        assert not (workdir / "other.db").exists()
    # The store it recorded, wiped: its parent run is not there (a process of its own: this
    # one keeps MLflow's connection to the removed file).
    (workdir / "mlflow.db").unlink()
    result = subprocess.run([sys.executable, "-m", "pipeline", *args, "3", "--tracking-uri",
                             store], capture_output=True, text=True, env=subprocess_env(),
                            cwd=workdir, timeout=120)
    assert result.returncode == 1 and "is tracked in" in result.stderr, result.stderr
    assert len(study_of("line_fit_15pts").trials) == 2


def test_a_worker_pointed_at_another_store_says_so(store, workdir):
    from pipeline import storages
    from pipeline import worker as workers

    sweep(store, "-e", "line_fit_15pts", "--epochs-range", "5", "20", "--n-trials", "2")
    with pytest.raises(storages.SweepError, match="is tracked in .* not in sqlite:///other.db"):
        workers.run("optuna.journal", "line_fit_15pts", "sqlite:///other.db")
    assert not (workdir / "other.db").exists()


def test_a_worker_of_its_own_follows_a_total_raised_while_it_runs(store, workdir):
    from pipeline import study as studies
    from pipeline import tracking
    from pipeline import worker as workers

    sweep(store, "-e", "line_fit_15pts", "--epochs-range", "5", "20", "--n-trials", "2")
    study, storage, spec = workers.join("optuna.journal", "line_fit_15pts", 0)
    tracking.connect(store)
    storage.total = 2
    # The study holds its 2; a resume to 4 is recorded meanwhile: the worker reads it again.
    outcome = workers.loop(study, storage, workers.context(spec, "line_fit_15pts"), 2,
                           echo=lambda line: None, latest=lambda: 4)
    assert (outcome.ran, outcome.finished, outcome.total) == (2, 4, 4)
    assert studies.finished(study) == 4


def test_a_total_is_not_lowered_under_a_campaign_in_flight(store):
    from pipeline import study as studies

    sweep(store, "-e", "line_fit_15pts", "--epochs-range", "5", "20", "--n-trials", "2")
    study = study_of("line_fit_15pts")
    old = {"n_trials": 30}
    assert studies.recorded_total(study, old, 4) == 4  # nothing under way: as asked
    study.ask()  # a trial another coordinator's worker is running
    assert studies.recorded_total(study, old, 4) == 30
    assert studies.recorded_total(study, old, 40) == 40


def test_counts_written_as_floats_are_taken_whole(store):
    # MLproject has no integer type: `mlflow run -e sweep -P n_trials=3` passes "3.0" at times.
    output = sweep(store, "-e", "line_fit_15pts", "--epochs-range", "5", "20",
                   "--n-trials", "2.0", "--workers", "1.0")
    assert "study line_fit_15pts: 2 trials" in output
    result = CliRunner().invoke(cli, ["sweep", "-e", "line_fit_15pts", "--n-trials", "2.5",
                                      "--tracking-uri", store])
    assert result.exit_code == 2 and "'2.5' is not a whole number" in result.output


def test_a_worker_without_the_studys_cuda_asks_for_no_trial(store):
    # A study set up on a GPU machine (its spec asks for cuda), joined from one without.
    from pipeline import study as studies
    from pipeline import worker as workers
    from pipeline.errors import UserError

    sweep(store, "-e", "line_fit_15pts", "--epochs-range", "5", "20", "--n-trials", "2")
    study = study_of("line_fit_15pts")
    spec = study.user_attrs[studies.SPEC_ATTR]
    spec["experiment"]["device"] = "cuda"
    spec["n_trials"] = 4
    study.set_user_attr(studies.SPEC_ATTR, spec)
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UserError, match="CUDA"):
        workers.run("optuna.journal", "line_fit_15pts", store)
    assert len(study_of("line_fit_15pts").trials) == 2


def test_a_model_named_with_a_quote_is_found_in_the_registry(store, workdir):
    # MLflow's search filters have no escapes: the name goes in double quotes.
    (workdir / "it's.yaml").write_text(
        (config.experiments_dir() / "line_fit_15pts.yaml").read_text())
    sweep(store, "-e", str(workdir / "it's.yaml"), "--n-trials", "2", "--epochs-range", "5", "20")
    models = CliRunner().invoke(cli, ["models", "--tracking-uri", store])
    assert models.exit_code == 0 and "it's" in models.output, models.output
    from pipeline import registry

    best_run = study_of("it's").best_trial.user_attrs["mlflow_run_id"]
    assert registry.version_of_run("it's", best_run) == "1"


def test_equal_bounds_hold_epochs_while_lr_is_searched(store):
    # The 1000-epoch sweep shape: every trial runs exactly the fixed count, lr varies.
    sweep(store, "-e", "line_fit_15pts", "--n-trials", "4", "--epochs-range", "30", "30",
          "--pruner", "none")
    trials = study_of("line_fit_15pts").get_trials()
    assert [t.params["epochs"] for t in trials] == [30] * 4
    assert len({t.params["lr"] for t in trials}) == 4
    _, children = sweep_runs(store, "line_fit_15pts")
    lengths = [curve_length(store, c.info.run_id) for c in children]
    assert max(lengths) == 31 and len(lengths) == 4  # a diverging trial stops early


def test_local_workers_share_the_trials_evenly(store):
    # Without --batch, 6 trials for 2 workers go in batches of 3, so neither worker idles.
    sweep(store, "-e", "line_fit_15pts", "--n-trials", "6", "--workers", "2",
          "--epochs-range", "5", "20")
    import os

    workers = min(2, os.cpu_count() or 1)  # capped at one per core
    study = study_of("line_fit_15pts")
    assert study.user_attrs["pipeline"]["batch"] == -(-6 // workers)
    assert len(study.get_trials()) == 6


@pytest.mark.parametrize("overrides", [["val_fraction=0"], [], ["loss=sum"]])
def test_the_curves_plot_floor_is_least_squares_on_the_plotted_rows(overrides):
    # The trials' loss curves plot a floor line: the least-squares loss on the rows the curves
    # are measured on, in the curves' reduction, mostly reused from theory's rates.
    exp = config.load("synthetic", ["dtype=float64", *overrides])
    train_set, val_set = data.split(data.build(exp.data, exp.seed), exp.val_fraction, exp.seed,
                                    exp.train.scale)
    rates = sweep_module.theory_rates(exp, train_set, val_set)
    rows = train_set if val_set is None else val_set
    floor = sweep_report._curves_floor((train_set, val_set), exp, rates)
    assert floor == pytest.approx(theory.optimum_loss(rows, True, exp.train.loss), rel=1e-12)
    assert floor > 0  # noise: no linear model fits the rows exactly


def test_random_trials_do_not_depend_on_the_batch_size(store):
    # RandomSampler draws from one stream: each trial's lr then its epochs, trial by trial.
    found = {}
    for batch in ("1", "4"):
        sweep(store, "-e", "line_fit_15pts", "--n-trials", "6", "--sampler", "random",
              "--pruner", "none", "--batch", batch, "--study-name", f"batch{batch}")
        found[batch] = [t.params for t in study_of(f"batch{batch}").get_trials()]
    assert len(found["1"]) == 6 and found["1"] == found["4"]


def test_the_report_draws_this_processs_curves_without_reading_them_back(store, monkeypatch):
    from pipeline import plots
    from pipeline.tracking import records

    drawn, reads = [], []
    overlay = plots.trials_overlay
    monkeypatch.setattr(plots, "trials_overlay", lambda curves, *rest: (
        drawn.append(curves), overlay(curves, *rest))[1])

    class Client(MlflowClient):  # the store as the report's reads reach it
        def get_metric_history(self, run_id, key):
            reads.append(run_id)
            return super().get_metric_history(run_id, key)

    monkeypatch.setattr(records, "MlflowClient", Client)
    args = ("-e", "crop_yields_manual", "--pruner", "none", "--study-name", "drawn")
    sweep(store, *args, "--n-trials", "4")
    assert reads == [] and len(drawn[0]) == 4
    sweep(store, *args, "--n-trials", "6")  # another command: the first four read back
    study = study_of("drawn")
    assert len(reads) == 4 and set(drawn[1]) == set(range(6))
    client = MlflowClient(store)
    for trial in study.trials:  # the objective's curve (no validation split), as stored
        stored = client.get_metric_history(trial.user_attrs["mlflow_run_id"], "train_loss")
        assert drawn[1][trial.number] == [m.value for m in sorted(stored, key=lambda m: m.step)]
