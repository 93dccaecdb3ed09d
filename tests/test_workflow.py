"""The stages wired to tracking, called directly: generate -> train -> evaluate, and all three
under one parent. Runs, statuses, params and metrics are checked against direct computation."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline import config, data, serving, tracking, workflow
from pipeline import train as training
from pipeline.errors import DivergedError
from tests.conftest import store_for_module

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def quiet(_: str) -> None:
    """An echo that prints nothing."""


def load(name: str, *overrides: str) -> config.Experiment:
    return config.load(str(EXPERIMENTS / f"{name}.yaml"), list(overrides))


@pytest.fixture(scope="module")
def module_store(tmp_path_factory):
    """One sqlite store for the module; each test works in an MLflow experiment of its own."""
    folder = tmp_path_factory.mktemp("workflow")
    with store_for_module(folder):
        yield


@pytest.fixture
def experiment(module_store, request) -> str:
    """A fresh MLflow experiment named after the test; its id."""
    return tracking.experiment_id(request.node.name)


def runs_of(experiment: str) -> dict[str, object]:
    """Every run of the experiment by its stage tag."""
    found = MlflowClient().search_runs([experiment], max_results=100)
    by_stage: dict[str, list] = {}
    for run in found:
        by_stage.setdefault(run.data.tags.get("stage"), []).append(run)
    return by_stage


def curve(run_id: str, key: str) -> list[float]:
    history = MlflowClient().get_metric_history(run_id, key)
    return [m.value for m in sorted(history, key=lambda m: m.step)]


def artifacts(run_id: str, folder: str) -> list[str]:
    return sorted(a.path for a in MlflowClient().list_artifacts(run_id, folder))


def contexts(run) -> list[str]:
    return sorted(tag.value for inp in run.inputs.dataset_inputs for tag in inp.tags
                  if tag.key == "mlflow.data.context")


# --- generate ------------------------------------------------------------------------------------


def test_generate_logs_the_dataset_once_and_reuses_it(experiment):
    exp = load("line_fit_15pts")
    first = workflow.generate(exp, experiment, echo=quiet)
    assert first.uri == f"runs:/{first.run_id}/dataset"
    (run,) = runs_of(experiment)["generate"]
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "generate table 15×1→1"
    assert run.data.tags["data_key"] == data.content_key(exp.data, exp.seed)
    # Only the data recipe and the seed: training settings do not decide the rows.
    assert run.data.params["seed"] == "20"
    assert run.data.params["data.source"] == "table"
    assert run.data.params["data.feature_names"] == '["x"]'
    assert not {"lr", "epochs", "model"} & set(run.data.params)
    assert contexts(run) == ["generated"]
    stored = tracking.read_dataset(first.uri)
    np.testing.assert_array_equal(stored.features, data.build(exp.data, exp.seed).features)
    np.testing.assert_array_equal(stored.targets[:3, 0], [1.7, 2.76, 2.09])

    again = workflow.generate(load("line_fit_15pts", "lr=0.5"), experiment, echo=quiet)
    assert again.run_id == first.run_id  # reused
    assert "dataset" not in vars(again)  # not read back until asked for
    np.testing.assert_array_equal(again.dataset.targets, stored.targets)
    assert len(runs_of(experiment)["generate"]) == 1
    changed = workflow.generate(load("line_fit_15pts", "data.repeat=2"), experiment, echo=quiet)
    assert changed.run_id != first.run_id
    assert changed.dataset.n_rows == 30
    assert len(runs_of(experiment)["generate"]) == 2


def test_a_logged_dataset_carries_the_digest_and_schema_mlflow_would_compute(experiment):
    # Computed from the columns, not cell by cell, and still MLflow's own values.
    import json

    import mlflow.data

    exp = load("synthetic", "data.n_rows=12000")  # more rows than MLflow's digest reads
    ref = workflow.generate(exp, experiment, echo=quiet)
    (run,) = runs_of(experiment)["generate"]
    (logged,) = run.inputs.dataset_inputs
    frame = ref.dataset.frame()
    expected = mlflow.data.from_pandas(frame)
    assert logged.dataset.digest == expected.digest
    assert json.loads(logged.dataset.schema) == {"mlflow_colspec": expected.schema.to_dict()}
    assert json.loads(logged.dataset.profile) == {"num_rows": 12000, "num_elements": 12000 * 6}


def test_scaled_training_logs_the_rows_its_source_holds(experiment):
    # scale: standard trains on scaled features; the logged inputs name the rows as they are
    # in the dataset (their digest is theirs), split as training and validation.
    import mlflow.data

    exp = load("crop_yields_builtin", "scale=standard", "val_fraction=0.4", "epochs=3")
    dataset = data.build(exp.data, exp.seed)
    workflow.train(exp, dataset, experiment, echo=quiet)
    (run,) = runs_of(experiment)["train"]
    logged = {i.tags[0].value: i.dataset.digest for i in run.inputs.dataset_inputs}
    train_rows, val_rows = data.split(dataset, exp.val_fraction, exp.seed)
    assert logged == {"training": mlflow.data.from_pandas(train_rows.frame()).digest,
                      "validation": mlflow.data.from_pandas(val_rows.frame()).digest}


def test_a_scaled_float32_model_takes_far_off_features_as_training_did(experiment, tmp_path):
    # Timestamps near 1.7e9 lose 7 bits in float32: the logged model scales them in float64,
    # as training did, so it predicts what was trained (mse 4.7e-12, not 0.11), and the
    # least-squares optimum is found beside a column of ones (no negative gap).
    import pandas as pd

    k = np.arange(40)
    pd.DataFrame({"t": 1.7e9 + 60 * k, "y": 0.5 * k + 3}).to_csv(tmp_path / "ts.csv",
                                                                 index=False)
    (tmp_path / "ts.yaml").write_text("lr: 0.1\nepochs: 200\nscale: standard\ndata:\n"
                                      "  csv: ts.csv\n  features: [t]\n  targets: [y]\n")
    exp = config.load(str(tmp_path / "ts.yaml"))
    dataset = data.build(exp.data, exp.seed)
    trained = workflow.train(exp, dataset, experiment, echo=quiet)
    metrics = workflow.evaluate_model(exp, dataset, trained.model_uri, experiment, echo=quiet)
    (run,) = runs_of(experiment)["train"]
    final = curve(run.info.run_id, "train_loss")[-1]
    assert final < 1e-10 and metrics["mse"] == pytest.approx(final, rel=1e-6)
    assert metrics["optimum_mse"] < 1e-20 and metrics["optimality_gap"] >= 0


# --- train ---------------------------------------------------------------------------------------


def test_train_logs_params_the_curve_and_a_model_that_predicts_like_the_trained_one(experiment):
    exp = load("crop_yields_manual", "epochs=6")
    dataset = data.build(exp.data, exp.seed)
    trained = workflow.train(exp, dataset, experiment, echo=quiet)
    (run,) = runs_of(experiment)["train"]
    assert run.info.run_id == trained.run_id
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "manual lr=1e-05 epochs=6"
    params = run.data.params
    assert (params["model"], params["lr"], params["epochs"]) == ("manual", "1e-05", "6")
    assert (params["loss"], params["batch_size"], params["seed"]) == ("mean", "None", "0")
    assert params["data.target_names"] == '["apples", "oranges"]'
    assert run.data.tags["diverged"] == "false"
    assert contexts(run) == ["training"]  # no validation split here
    # The logged curve is the one training gives: 7 points, the same numbers.
    direct = training.train(exp.train, dataset)
    logged = curve(trained.run_id, "train_loss")
    assert len(logged) == 7
    assert logged == pytest.approx(direct.train_loss, rel=1e-6)
    assert logged[-1] < logged[0]
    # 8 parameters cannot be drawn on a loss surface: only the curve is plotted.
    assert artifacts(trained.run_id, "plots") == ["plots/loss_curve.png"]
    with torch.no_grad():
        expected = direct.model(torch.as_tensor(dataset.features, dtype=torch.float32))
    predicted = serving.load(trained.model_uri).predict(dataset.features)
    np.testing.assert_array_equal(predicted, expected.numpy().astype(np.float64))
    # The model belongs to the run's experiment, so the run's own URI finds it too.
    (model,) = MlflowClient().search_logged_models([experiment])
    assert (model.source_run_id, model.model_id) == (run.info.run_id,
                                                     trained.model_uri.removeprefix("models:/"))
    assert model.params["lr"] == "1e-05"
    by_run = serving.load(f"runs:/{run.info.run_id}/model").predict(dataset.features)
    np.testing.assert_array_equal(by_run, predicted)


def test_engine_statistics_trains_in_closed_form_the_loops_curve(experiment):
    # The tutorial's float32 loop and the float64 closed form: the same descent.
    exp = load("crop_yields_manual", "epochs=60", "val_fraction=0.4", "engine=statistics")
    dataset = data.build(exp.data, exp.seed)
    trained = workflow.train(exp, dataset, experiment, echo=quiet)
    (run,) = runs_of(experiment)["train"]
    assert run.data.params["engine"] == "statistics"
    assert "closed form" in run.data.tags["mlflow.note.content"]
    loop = training.train(config.with_train(exp, engine="auto").train,
                          *data.split(dataset, 0.4, exp.seed))
    assert curve(trained.run_id, "train_loss") == pytest.approx(loop.train_loss, rel=1e-4)
    assert curve(trained.run_id, "val_loss") == pytest.approx(loop.val_loss, rel=1e-4)
    predicted = serving.load(trained.model_uri).predict(dataset.features)
    with torch.no_grad():
        expected = loop.model(torch.as_tensor(dataset.features, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(predicted, expected, rtol=1e-4)


@pytest.mark.parametrize("engine", ["auto", "statistics"])
def test_a_single_weight_gets_a_loss_surface(experiment, engine):
    exp = load("slope_only", f"engine={engine}")
    trained = workflow.train(exp, data.build(exp.data, exp.seed), experiment, echo=quiet)
    assert artifacts(trained.run_id, "plots") == ["plots/loss_curve.png", "plots/loss_surface.png"]
    assert len(curve(trained.run_id, "train_loss")) == 5  # epochs 4, plus the start


def test_a_validation_split_logs_both_curves(experiment):
    exp = load("crop_yields_builtin", "val_fraction=0.2", "epochs=4")
    trained = workflow.train(exp, data.build(exp.data, exp.seed), experiment, echo=quiet)
    (run,) = runs_of(experiment)["train"]
    assert run.data.params["val_fraction"] == "0.2"
    assert contexts(run) == ["training", "validation"]
    assert len(curve(trained.run_id, "train_loss")) == 5
    direct = training.train(exp.train, *data.split(data.build(exp.data, exp.seed), 0.2, exp.seed))
    assert curve(trained.run_id, "val_loss") == pytest.approx(direct.val_loss, rel=1e-6)
    assert len(direct.val_loss) == 5


def test_divergence_fails_the_train_run_and_logs_no_model(experiment):
    # slope_only's edge is 2/λ_max ≈ 0.33 (its comment); lr 1 overshoots every step.
    exp = load("slope_only", "lr=1.0", "epochs=20")
    with pytest.raises(DivergedError, match="training diverged at epoch"):
        workflow.train(exp, data.build(exp.data, exp.seed), experiment, echo=quiet)
    (run,) = runs_of(experiment)["train"]
    assert run.info.status == "FAILED"
    assert run.data.tags["diverged"] == "true"
    losses = curve(run.info.run_id, "train_loss")
    assert int(run.data.tags["diverged_at_epoch"]) == len(losses) - 1
    assert losses[-1] > 100 * losses[0]
    assert MlflowClient().search_logged_models([experiment]) == []


def test_data_that_overflow_float32_are_named_not_blamed_on_the_lr(experiment):
    # 3e30 squared is 9e60: finite in float64 (the data check passes), inf in float32, so the
    # first loss overflows and no learning rate can help.
    exp = load("line_2x_plus_1", "data.x_range=[]", "data.x=[1e30,2e30,3e30]")
    with pytest.raises(DivergedError) as info:
        workflow.train(exp, data.build(exp.data, exp.seed), experiment, echo=quiet)
    assert re.search(r"before the first step: the data's values \(up to \de\+30\) overflow "
                     "float32 arithmetic", str(info.value))
    assert "try --set lr" not in str(info.value)
    (run,) = runs_of(experiment)["train"]
    assert run.info.status == "FAILED"
    assert run.data.tags["diverged_at_epoch"] == "0"


def test_starting_parameters_that_overflow_are_named_not_the_data(experiment):
    exp = load("line_fit_15pts", "weight_init=1e30")  # 1e30 · 10.8, squared: inf in float32
    with pytest.raises(DivergedError) as info:
        workflow.train(exp, data.build(exp.data, exp.seed), experiment, echo=quiet)
    assert re.search(r"before the first step: the starting parameters \(weight_init=1e\+30\) "
                     r"on the data's values \(up to 10\.8\) overflow float32", str(info.value))
    assert "rescale" not in str(info.value)


# --- evaluate ------------------------------------------------------------------------------------


def direct_metrics(predictions: np.ndarray, targets: np.ndarray, features: np.ndarray,
                   fit_bias: bool) -> dict[str, float]:
    """The evaluate stage's metrics, written out in numpy."""
    error = predictions - targets
    centred = targets - targets.mean(axis=0)
    x = np.hstack([features, np.ones((len(features), 1))]) if fit_bias else features
    solution = np.linalg.lstsq(x, targets, rcond=None)[0]
    optimum = np.mean((x @ solution - targets) ** 2)
    mse = np.mean(error**2)
    return {
        "mse": mse,
        "rmse": np.sqrt(mse),
        "mae": np.mean(np.abs(error)),
        "r2": np.mean(1 - (error**2).sum(axis=0) / (centred**2).sum(axis=0)),
        "optimum_mse": optimum,
        "optimality_gap": mse - optimum,
    }


def test_evaluate_scores_the_validation_rows(experiment):
    exp = load("crop_yields_builtin", "val_fraction=0.2", "epochs=30")
    dataset = data.build(exp.data, exp.seed)
    trained = workflow.train(exp, dataset, experiment, echo=quiet)
    metrics = workflow.evaluate_model(exp, dataset, trained.model_uri, experiment, echo=quiet)
    _, val_set = data.split(dataset, 0.2, exp.seed)
    assert val_set.n_rows == 3
    train_set, _ = data.split(dataset, 0.2, exp.seed)
    model = training.train(exp.train, train_set, val_set).model
    with torch.no_grad():
        predictions = model(torch.as_tensor(val_set.features, dtype=torch.float32))
    expected = direct_metrics(predictions.numpy().astype(np.float64), val_set.targets,
                              val_set.features, fit_bias=True)
    assert set(metrics) == set(expected)  # a table recipe knows no true weights
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=1e-9, abs=1e-9), key
    (run,) = runs_of(experiment)["evaluate"]
    assert run.info.status == "FINISHED"
    assert run.data.tags["eval_split"] == "validation"
    assert run.data.tags["model_uri"] == trained.model_uri
    assert run.data.metrics == pytest.approx(metrics)
    assert artifacts(run.info.run_id, "plots") == ["plots/fit.png"]
    # Alone, the model may come from anywhere: the run records what chose the rows, and no
    # training settings that the model may not have been trained with.
    assert run.info.run_name == f"evaluate {trained.model_uri}"
    assert {"seed", "val_fraction", "data.repeat"} <= set(run.data.params)
    assert not {"lr", "epochs", "batch_size"} & set(run.data.params)
    # The rows it scored, as an MLflow dataset input.
    import mlflow.data

    (scored,) = run.inputs.dataset_inputs
    assert scored.tags[0].value == "evaluation"
    assert scored.dataset.digest == mlflow.data.from_pandas(val_set.frame()).digest


def test_evaluate_without_validation_scores_every_row_and_the_true_slope(experiment):
    exp = load("slope_only")
    dataset = data.build(exp.data, exp.seed)
    trained = workflow.train(exp, dataset, experiment, echo=quiet)
    metrics = workflow.evaluate_model(exp, dataset, trained.model_uri, experiment, echo=quiet)
    (weight,) = training.train(exp.train, dataset).model.weight.detach().numpy().ravel()
    x, y = dataset.features, dataset.targets
    predictions = (x.astype(np.float32) * np.float32(weight)).astype(np.float64)
    expected = direct_metrics(predictions, y, x, fit_bias=False)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    # No bias in the model: only the slope is scored against the recipe's -3.
    assert metrics["weight_error"] == pytest.approx(abs(float(weight) + 3), rel=1e-6)
    assert "bias_error" not in metrics
    assert metrics["optimality_gap"] > 0  # four steps stop short of the optimum
    (run,) = runs_of(experiment)["evaluate"]
    assert run.data.tags["eval_split"] == "train"


def test_evaluate_refuses_a_model_of_another_width_before_any_run(experiment):
    line = load("line_fit_15pts")
    trained = workflow.train(line, data.build(line.data, line.seed), experiment, echo=quiet)
    crops = load("crop_yields_manual")
    with pytest.raises(serving.ModelError, match="takes features x but crop_yields_manual's "
                       "data has temp, rainfall, humidity"):
        workflow.evaluate_model(crops, data.build(crops.data, crops.seed), trained.model_uri,
                                experiment, echo=quiet)
    assert "evaluate" not in runs_of(experiment)


def crop_csv(folder: Path, header: list[str], features: list[str], targets: list[str],
             renamed: dict[str, str] | None = None):
    """The crop tutorial's rows as a CSV with its columns (``renamed``) in the order
    ``header`` gives, and a config reading it."""
    crops = load("crop_yields_manual")
    rows = data.build(crops.data, crops.seed).frame().rename(columns=renamed or {})
    rows[header].to_csv(folder / "crops.csv", index=False)
    (folder / "crops.yaml").write_text(
        f"seed: 0\nlr: 1.0e-5\nepochs: 5\ndata:\n  source: csv\n  csv: {folder / 'crops.csv'}\n"
        f"  features: [{', '.join(features)}]\n  targets: [{', '.join(targets)}]\n")
    exp = config.load(str(folder / "crops.yaml"))
    return exp, data.build(exp.data, exp.seed)


def test_evaluate_feeds_the_model_its_columns_by_name(experiment, tmp_path):
    crops = load("crop_yields_manual")
    dataset = data.build(crops.data, crops.seed)
    trained = workflow.train(crops, dataset, experiment, echo=quiet)
    expected = workflow.evaluate_model(crops, dataset, trained.model_uri, experiment, echo=quiet)
    # The same rows with the columns shuffled, and features and targets listed in other orders.
    exp, shuffled = crop_csv(tmp_path, ["humidity", "apples", "temp", "oranges", "rainfall"],
                             ["rainfall", "humidity", "temp"], ["oranges", "apples"])
    assert shuffled.feature_names == ("rainfall", "humidity", "temp")
    metrics = workflow.evaluate_model(exp, shuffled, trained.model_uri, experiment, echo=quiet)
    for key in ("mse", "mae", "r2", "optimality_gap"):
        assert metrics[key] == pytest.approx(expected[key], rel=1e-9), key


def test_evaluate_refuses_data_without_the_models_columns_before_any_run(experiment, tmp_path):
    crops = load("crop_yields_manual")
    trained = workflow.train(crops, data.build(crops.data, crops.seed), experiment, echo=quiet)
    exp, renamed = crop_csv(tmp_path, ["a", "b", "c", "apples", "oranges"], ["a", "b", "c"],
                            ["apples", "oranges"], {"temp": "a", "rainfall": "b", "humidity": "c"})
    with pytest.raises(serving.ModelError, match="takes features temp, rainfall, humidity but "
                       "crops's data has a, b, c \\(no temp, rainfall, humidity\\)"):
        workflow.evaluate_model(exp, renamed, trained.model_uri, experiment, echo=quiet)
    exp, fewer = crop_csv(tmp_path, ["temp", "rainfall", "humidity", "oranges"],
                          ["temp", "rainfall", "humidity"], ["oranges"])
    with pytest.raises(serving.ModelError, match="takes targets apples, oranges .* \\(no apples"):
        workflow.evaluate_model(exp, fewer, trained.model_uri, experiment, echo=quiet)
    assert "evaluate" not in runs_of(experiment)


def test_evaluate_refuses_values_the_model_cannot_hold_before_any_run(experiment, tmp_path):
    line = load("line_fit_15pts")
    trained = workflow.train(line, data.build(line.data, line.seed), experiment, echo=quiet)
    (tmp_path / "big.csv").write_text("x,y\n1,2\n2e39,3\n")
    (tmp_path / "big.yaml").write_text(
        f"seed: 0\nlr: 0.01\nepochs: 3\ndata:\n  source: csv\n  csv: {tmp_path / 'big.csv'}\n"
        "  features: [x]\n  targets: [y]\n")
    exp = config.load(str(tmp_path / "big.yaml"))
    with pytest.raises(data.DataError, match="big's data: column x holds 2e\\+39 in "
                       "data row 2, beyond the model's float32 range"):
        workflow.evaluate_model(exp, data.build(exp.data, exp.seed), trained.model_uri,
                                experiment, echo=quiet)
    assert "evaluate" not in runs_of(experiment)


# --- all three under a parent --------------------------------------------------------------------


def test_run_all_nests_three_finished_stages_under_one_parent(experiment):
    exp = load("line_fit_15pts")
    lines: list[str] = []
    metrics = workflow.run_all(exp, experiment, echo=lines.append)
    stages = runs_of(experiment)
    assert {stage: len(runs) for stage, runs in stages.items()} == {
        "pipeline": 1, "generate": 1, "train": 1, "evaluate": 1}
    parent = stages["pipeline"][0]
    assert parent.info.run_name == "line_fit_15pts: manual lr=0.01 epochs=11"
    for stage in ("generate", "train", "evaluate"):
        (child,) = stages[stage]
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["train_run_id"] == stages["train"][0].info.run_id
    assert parent.data.tags["data_run_id"] == stages["generate"][0].info.run_id
    assert parent.data.params["lr"] == "0.01"
    # The parent carries the evaluate run's metrics, and they are what direct training gives.
    assert parent.data.metrics == pytest.approx(stages["evaluate"][0].data.metrics)
    dataset = data.build(exp.data, exp.seed)
    direct = training.train(exp.train, dataset)
    assert metrics["mse"] == pytest.approx(direct.train_loss[-1], rel=1e-6)
    assert metrics["mse"] == pytest.approx(0.2032, abs=5e-5)  # what the tutorial's loop reaches
    assert [line.split(":")[0] for line in lines] == ["generate", "train", "evaluate"]


def test_run_all_that_diverges_fails_the_parent_and_skips_evaluate(experiment):
    exp = load("slope_only", "lr=1.0", "epochs=20")
    with pytest.raises(DivergedError):
        workflow.run_all(exp, experiment, echo=quiet)
    stages = runs_of(experiment)
    assert "evaluate" not in stages
    assert stages["generate"][0].info.status == "FINISHED"
    assert stages["train"][0].info.status == "FAILED"
    assert stages["pipeline"][0].info.status == "FAILED"
    assert stages["pipeline"][0].data.tags["diverged"] == "true"
