"""Comparing runs: one row per run, best first by a metric, runs without it last."""

from __future__ import annotations

import math

import pytest
from mlflow.tracking import MlflowClient

from pipeline import compare, tracking
from pipeline.errors import UserError
from tests.conftest import store_for_module

EXPERIMENT = "compare_me"

# name -> (stage, status, params, metrics). mse and r2 rank the three evaluate runs differently:
# by mse (lowest first) b, a, c; by r2 (highest first) a, c, b. d is a train run with no mse.
RUNS = {
    "a": ("evaluate", "FINISHED", {"model": "manual", "lr": "0.01", "epochs": "10",
                                   "batch_size": "None"},
          {"mse": 0.5, "r2": 0.99, "mae": 0.4}),
    "b": ("evaluate", "FINISHED", {"model": "builtin", "lr": "0.001", "epochs": "100",
                                   "batch_size": "None"},
          {"mse": 0.1, "r2": 0.6, "mae": 0.2}),
    "c": ("evaluate", "FINISHED", {"model": "manual", "lr": "0.1", "epochs": "5",
                                   "batch_size": "None"},
          {"mse": 2.0, "r2": 0.8, "mae": 1.1}),
    "d": ("train", "FAILED", {"model": "builtin", "lr": "1", "epochs": "3", "batch_size": "None"},
          {"train_loss": 0.01}),
}


def make_runs(runs: dict, experiment: str = EXPERIMENT) -> None:
    from mlflow.entities import Metric, Param

    client = MlflowClient()
    experiment_id = tracking.experiment_id(experiment)
    for name, (stage, status, params, metrics) in runs.items():
        run = client.create_run(experiment_id, run_name=name, tags={"stage": stage})
        client.log_batch(
            run.info.run_id,
            metrics=[Metric(key, value, 0, 0) for key, value in metrics.items()],
            params=[Param(key, value) for key, value in params.items()],
        )
        client.set_terminated(run.info.run_id, status)


@pytest.fixture(scope="module")
def compare_store(tmp_path_factory):
    """One sqlite store for the module (creating one takes a second); each test that adds runs
    adds them to an experiment of its own."""
    folder = tmp_path_factory.mktemp("compare")
    with store_for_module(folder):
        make_runs(RUNS)
        yield


@pytest.fixture
def runs(compare_store):
    return tracking.runs_frame(EXPERIMENT)


def test_lower_is_better_metric_sorts_ascending(runs):
    table = compare.runs_table(runs, "mse")
    assert table["run_name"].tolist() == ["b", "a", "c", "d"]
    assert table["mse"].tolist()[:3] == [0.1, 0.5, 2.0]
    assert math.isnan(table["mse"].iloc[3])


def test_r2_sorts_highest_first(runs):
    table = compare.runs_table(runs, "r2")
    assert table["run_name"].tolist() == ["a", "c", "b", "d"]
    assert table["r2"].tolist()[:3] == [0.99, 0.8, 0.6]


def test_mae_sorts_ascending_too(runs):
    assert compare.runs_table(runs, "mae")["run_name"].tolist() == ["b", "a", "c", "d"]


def test_by_default_each_run_is_scored_by_its_own_measure(runs):
    # a, b, c are evaluations (mse 0.5, 0.1, 2.0); d is a training run (train_loss 0.01).
    table = compare.runs_table(runs)
    assert table["run_name"].tolist() == ["d", "b", "a", "c"]
    assert table["score"].tolist() == [0.01, 0.1, 0.5, 2.0]


def test_the_best_trial_sorts_among_evaluations_and_stage_filters(compare_store):
    make_runs({"t0": ("trial", "FINISHED", {}, {"objective": 0.3}),
               "t1": ("trial", "FINISHED", {}, {"objective": 0.05}),
               "sweep": ("sweep", "FINISHED", {}, {"objective": 0.05, "best_value": 0.05}),
               "evaluate": ("evaluate", "FINISHED", {}, {"mse": 0.2}),
               "train": ("train", "FINISHED", {}, {"train_loss": 0.02, "val_loss": 0.4})},
              "mixed")
    runs = tracking.runs_frame("mixed")
    # The sweep's parent carries its best trial's objective: they tie at the top.
    assert sorted(compare.runs_table(runs, top=2)["run_name"]) == ["sweep", "t1"]
    assert compare.runs_table(runs)["run_name"].tolist()[2:] == ["evaluate", "t0", "train"]
    assert compare.runs_table(runs, stage="trial")["run_name"].tolist() == ["t1", "t0"]
    with pytest.raises(UserError, match=r"no generate runs here \(stages present: evaluate, "
                                        r"sweep, train, trial\)"):
        compare.runs_table(runs, stage="generate")


def test_a_stage_without_scores_is_listed(compare_store):
    make_runs({"g0": ("generate", "FINISHED", {}, {}), "g1": ("generate", "FINISHED", {}, {}),
               "t": ("train", "FINISHED", {}, {"train_loss": 0.1})}, "generated")
    table = compare.runs_table(tracking.runs_frame("generated"), stage="generate")
    assert sorted(table["run_name"]) == ["g0", "g1"] and table["score"].isna().all()


@pytest.mark.parametrize(("top", "names"), [(1, ["b"]), (2, ["b", "a"]), (3, ["b", "a", "c"]),
                                            (10, ["b", "a", "c", "d"])])
def test_top_keeps_the_best_runs(runs, top, names):
    table = compare.runs_table(runs, "mse", top)
    assert len(table) == len(names)
    assert table["run_name"].tolist() == names


def test_top_applies_after_sorting_by_r2(runs):
    assert compare.runs_table(runs, "r2", 2)["run_name"].tolist() == ["a", "c"]


def test_a_metric_only_one_run_has_puts_the_others_last(runs):
    table = compare.runs_table(runs, "train_loss")
    assert table["run_name"].iloc[0] == "d"
    assert table["train_loss"].iloc[0] == 0.01
    assert sorted(table["run_name"].iloc[1:]) == ["a", "b", "c"]
    assert table["train_loss"].iloc[1:].isna().all()


def test_rows_carry_stage_status_params_and_metrics(runs):
    table = compare.runs_table(runs, "mse").set_index("run_name")
    assert table.loc["b", "stage"] == "evaluate"
    assert table.loc["d", "stage"] == "train"
    assert table.loc["d", "status"] == "FAILED"
    assert table.loc["a", "status"] == "FINISHED"
    # Numeric params become numbers; a param that is never a number stays text.
    assert table.loc["b", "lr"] == 0.001
    assert table.loc["c", "epochs"] == 5
    assert table.loc["a", "model"] == "manual"
    assert table.loc["a", "batch_size"] == "None"
    assert table.loc["c", "mae"] == 1.1
    # Metrics no run logged get no column; every run id is listed once.
    assert not {"rmse", "objective", "val_loss", "optimality_gap"} & set(table.columns)
    assert table["run_id"].nunique() == 4


def test_a_metric_outside_the_known_list_sorts_too(compare_store):
    make_runs({name: ("evaluate", "FINISHED", {}, {"weight_error": value})
               for name, value in (("far", 3.0), ("near", 0.5), ("middle", 1.0))}, "errors")
    table = compare.runs_table(tracking.runs_frame("errors"), "weight_error")
    assert table["run_name"].tolist() == ["near", "middle", "far"]
    assert table["weight_error"].tolist() == [0.5, 1.0, 3.0]


def test_sweep_trials_default_to_objective(compare_store):
    make_runs({f"trial {i}": ("trial", "FINISHED", {"lr": str(lr)}, {"objective": value})
               for i, (lr, value) in enumerate([(0.1, 0.3), (0.01, 0.2), (0.001, 0.9)])},
              "sweep")
    runs = tracking.runs_frame("sweep")
    table = compare.runs_table(runs)
    assert table["run_name"].tolist() == ["trial 1", "trial 0", "trial 2"]
    assert table["lr"].tolist() == [0.01, 0.1, 0.001]


def test_train_runs_default_to_train_loss(compare_store):
    make_runs({"slow": ("train", "FINISHED", {}, {"train_loss": 4.0}),
               "fast": ("train", "FINISHED", {}, {"train_loss": 0.25})}, "training")
    runs = tracking.runs_frame("training")
    assert compare.runs_table(runs)["run_name"].tolist() == ["fast", "slow"]


def test_a_metric_no_run_has_lists_the_metrics_there_are(runs):
    with pytest.raises(UserError) as info:
        compare.runs_table(runs, "rmse")
    assert info.value.message == (
        "no run has metric 'rmse' (metrics here: mae, mse, r2, train_loss)")


def test_an_experiment_without_runs_has_no_metrics(compare_store):
    tracking.experiment_id("empty")
    with pytest.raises(UserError, match=r"no run has metric 'mse' \(metrics here: none\)"):
        compare.runs_table(tracking.runs_frame("empty"), "mse")
    with pytest.raises(UserError, match="no run has a score yet"):
        compare.runs_table(tracking.runs_frame("empty"))


def test_render_csv_lists_the_rows_in_order(runs):
    text = compare.render(compare.runs_table(runs, "r2", 3), "csv")
    lines = text.splitlines()
    assert len(lines) == 4
    header = lines[0].split(",")
    assert header[:3] == ["run_name", "stage", "status"]
    assert [line.split(",")[0] for line in lines[1:]] == ["a", "c", "b"]
    r2 = header.index("r2")
    assert [float(line.split(",")[r2]) for line in lines[1:]] == [0.99, 0.8, 0.6]


def test_render_markdown_and_table_keep_the_order(runs):
    table = compare.runs_table(runs, "mse")
    for fmt in ("markdown", "table"):
        text = compare.render(table, fmt)
        positions = [text.index(f" {name} ") for name in ("b", "a", "c", "d")]
        assert positions == sorted(positions), (fmt, text)


def test_ties_go_to_the_run_that_got_there_first(compare_store):
    # Trials that all reach the same objective: the first is Optuna's best (and the champion);
    # MLflow lists the newest first, and --top 1 must still show the first.
    tied = {f"t{n}": ("trial", "FINISHED", {"epochs": "1000", "lr": f"0.0{n + 1}"},
                      {"objective": 0.25}) for n in range(4)}
    make_runs({"sweep": ("sweep", "FINISHED", {}, {"objective": 0.25}), **tied}, "ties")
    runs = tracking.runs_frame("ties")
    assert list(runs["tags.mlflow.runName"])[:2] == ["t3", "t2"]  # newest first
    table = compare.runs_table(runs)
    assert list(table["run_name"]) == ["sweep", "t0", "t1", "t2", "t3"]
    assert list(compare.runs_table(runs, top=2)["run_name"]) == ["sweep", "t0"]
    # The sweep has no epochs of its own: the column stays whole numbers.
    lines = compare.render(table, "csv").splitlines()
    epochs = lines[0].split(",").index("epochs")
    assert [line.split(",")[epochs] for line in lines[1:]] == ["", "1000", "1000", "1000", "1000"]
