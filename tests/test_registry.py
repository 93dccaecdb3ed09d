"""The Model Registry: versions, the `champion` alias that moves only to a better model, and
loading `models:/NAME@champion` to the same predictions as the logged model."""

from __future__ import annotations

import math
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline import config, data, registry, serving, tracking
from pipeline import train as training
from pipeline.data import Dataset
from pipeline.models import LinearRegressor
from pipeline.registry import RegistryError
from tests.conftest import store_for_module

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
X = np.array([[-1.0], [0.0], [0.5], [2.0], [10.0]])
ROWS = Dataset(X, 2 * X + 1, ("x",), ("y",))
# Three lines logged as models, and the objective each is registered with (lower is better).
LINES = {"good": (2.0, 1.0, 0.1), "worse": (3.0, 0.0, 0.7), "best": (2.0, 1.5, 0.05)}


def expected(line: str, x: np.ndarray = X) -> np.ndarray:
    weight, bias, _ = LINES[line]
    return weight * x + bias


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A store with the three lines logged as models: line -> (model URI, run id)."""
    folder = tmp_path_factory.mktemp("registry")
    with store_for_module(folder):
        experiment = tracking.experiment_id("lines")
        uris = {}
        for line, (weight, bias, _) in LINES.items():
            module = LinearRegressor(torch.tensor([[weight]]), torch.tensor([bias]))
            with tracking.run(experiment, line) as run_id:
                uris[line] = (tracking.log_model(run_id, module, ROWS, "float32"), run_id)
        yield uris


def register(name: str, uris: dict, line: str, basis: str | None = None) -> str:
    uri, run_id = uris[line]
    extra = {} if basis is None else {registry.BASIS_TAG: basis}
    return registry.register(name, uri, LINES[line][2],
                             tags={"model_kind": "manual", "lr": "0.01", "epochs": "7",
                                   "source_run_id": run_id, **extra},
                             description=f"the {line} line")


def champion_predictions(name: str) -> np.ndarray:
    return serving.load(f"models:/{name}@champion").predict(X)


def test_versions_count_up_from_one(logged):
    assert [register("counted", logged, line) for line in ("good", "worse", "best")] == \
        ["1", "2", "3"]
    table = registry.versions_table("counted")
    assert len(table) == 3
    assert table["version"].tolist() == [3, 2, 1]  # newest first
    assert table["objective"].tolist() == [0.05, 0.7, 0.1]
    assert table["source_run"].tolist() == [logged[line][1] for line in ("best", "worse", "good")]
    assert set(table["model"]) == {"manual"}
    assert table["lr"].tolist() == [0.01] * 3
    assert table["aliases"].tolist() == ["", "", ""]  # registering alone moves no alias
    version = MlflowClient().get_model_version("counted", "2")
    assert version.description == "the worse line"
    assert version.tags["objective"] == "0.7"


def test_versions_table_of_every_model_sorts_by_name_then_version(logged):
    register("zeta", logged, "good")
    register("alpha", logged, "good")
    register("alpha", logged, "worse")
    table = registry.versions_table()
    mine = table[table["name"].isin(["alpha", "zeta"])]
    rows = list(mine[["name", "version"]].itertuples(index=False, name=None))
    assert rows == [("alpha", 2), ("alpha", 1), ("zeta", 1)]


def test_first_version_becomes_champion(logged):
    version = register("first", logged, "good")
    assert registry.champion("first") is None
    decision = registry.promote_if_better("first", version, 0.1)
    assert decision == registry.Decision("1", None, "first champion")
    assert registry.champion("first") == ("1", 0.1)


def test_alias_moves_only_to_a_better_model(logged):
    name = "ladder"
    good = register(name, logged, "good")
    registry.promote_if_better(name, good, 0.1)

    worse = register(name, logged, "worse")
    decision = registry.promote_if_better(name, worse, 0.7)
    assert decision.champion_version == "1"
    assert decision.previous_objective == 0.1
    assert decision.reason == "kept v1: its objective 0.1 <= 0.7"
    assert registry.champion(name) == ("1", 0.1)
    np.testing.assert_allclose(champion_predictions(name), expected("good"), rtol=1e-6)

    best = register(name, logged, "best")
    decision = registry.promote_if_better(name, best, 0.05)
    assert best == decision.champion_version == "3"
    assert decision.previous_objective == 0.1
    assert decision.reason == "beats v1: 0.05 < 0.1"
    assert registry.champion(name) == ("3", 0.05)
    np.testing.assert_allclose(champion_predictions(name), expected("best"), rtol=1e-6)

    table = registry.versions_table(name)
    assert table["aliases"].tolist() == ["champion", "", ""]


def test_an_equal_objective_does_not_take_the_alias(logged):
    name = "tie"
    registry.promote_if_better(name, register(name, logged, "good"), 0.1)
    decision = registry.promote_if_better(name, register(name, logged, "best"), 0.1)
    assert decision.champion_version == "1"
    assert registry.champion(name) == ("1", 0.1)


def test_objectives_measured_differently_are_not_compared(logged):
    # A validation MSE against a training loss, or losses on other rows: lower is no better.
    name = "bases"
    registry.promote_if_better(name, register(name, logged, "good", "final training loss"), 0.1)
    decision = registry.promote_if_better(
        name, register(name, logged, "best", "validation MSE"), 0.05)
    assert decision.champion_version == "1" and registry.champion(name) == ("1", 0.1)
    assert decision.reason == (
        "kept v1, not compared: its objective is the final training loss, this one the "
        "validation MSE; `pipeline promote bases 2` moves the alias by hand")
    # Measured alike, compared; a version from before the tag existed is compared as before.
    decision = registry.promote_if_better(
        name, register(name, logged, "best", "final training loss"), 0.05)
    assert decision.champion_version == "3"
    assert registry.promote_if_better(name, register(name, logged, "best"), 0.01
                                      ).champion_version == "4"


def test_the_champion_asked_again_stays(logged):
    name = "again"
    version = register(name, logged, "good")
    registry.promote_if_better(name, version, 0.1)
    decision = registry.promote_if_better(name, version, 0.1)
    assert decision == registry.Decision("1", None, "already the champion")


def test_a_champion_without_an_objective_loses_to_any(logged):
    name = "untagged"
    first = register(name, logged, "worse")
    registry.promote_if_better(name, first, 0.7)
    MlflowClient().delete_model_version_tag(name, first, "objective")
    assert registry.champion(name) == ("1", math.inf)
    decision = registry.promote_if_better(name, register(name, logged, "good"), 1e6)
    assert decision.champion_version == "2"


def test_champion_loads_the_same_predictions_as_the_logged_model(logged):
    name = "served"
    registry.promote_if_better(name, register(name, logged, "good"), 0.1)
    by_alias = serving.load(f"models:/{name}@champion")
    by_version = serving.load(f"models:/{name}/1")
    logged_model = serving.load(logged["good"][0])
    assert (by_alias.feature_names, by_alias.target_names) == (("x",), ("y",))
    # 2x + 1 at x = -1, 0, 0.5, 2, 10, exactly representable in float32.
    np.testing.assert_array_equal(by_alias.predict(X).ravel(), [-1.0, 1.0, 2.0, 5.0, 21.0])
    np.testing.assert_array_equal(by_alias.predict(X), logged_model.predict(X))
    np.testing.assert_array_equal(by_version.predict(X), logged_model.predict(X))
    weight, bias = by_alias.parameters()
    np.testing.assert_array_equal(weight, [[2.0]])
    np.testing.assert_array_equal(bias, [1.0])
    # The pyfunc face, fed a column by name, predicts the same numbers.
    frame = mlflow.pyfunc.load_model(f"models:/{name}@champion").predict(
        pd.DataFrame({"x": X[:, 0]}))
    assert list(frame.columns) == ["y"]
    np.testing.assert_array_equal(frame["y"].to_numpy(), [-1.0, 1.0, 2.0, 5.0, 21.0])


def test_promote_by_hand_moves_the_alias_and_records_why(logged):
    name = "by_hand"
    registry.promote_if_better(name, register(name, logged, "good"), 0.1)
    register(name, logged, "worse")
    assert registry.promote(name, "2", reason="rollback drill") == "1"
    assert registry.champion(name) == ("2", 0.7)
    np.testing.assert_allclose(champion_predictions(name), expected("worse"), rtol=1e-6)
    tags = MlflowClient().get_model_version(name, "2").tags
    assert tags["champion.promoted_reason"] == "rollback drill"
    assert tags["champion.promoted_previous_version"] == "1"
    # Another alias: nobody held it before.
    assert registry.promote(name, "1", alias="staging") is None
    table = registry.versions_table(name)
    assert table["aliases"].tolist() == ["champion", "staging"]


def test_registry_errors_name_what_is_missing(logged):
    register("present", logged, "good")
    with pytest.raises(RegistryError, match="no registered model named 'absent'"):
        registry.promote("absent", "1")
    with pytest.raises(RegistryError, match="registered model 'present' has no version 9"):
        registry.promote("present", "9")
    with pytest.raises(RegistryError, match="no registered model named 'absent'"):
        registry.versions_table("absent")
    assert registry.champion("absent") is None
    assert registry.champion("present") is None
    # A refused alias promotes nothing: no record of a promotion is left on the version.
    for alias in ("latest", "v3", "bad alias!"):
        with pytest.raises(RegistryError, match=f"alias '{alias}' refused"):
            registry.promote("present", "1", alias=alias)
    assert not any(key.startswith(("latest.", "v3.", "bad alias!."))
                   for key in MlflowClient().get_model_version("present", "1").tags)


def test_a_trained_champion_predicts_what_the_trained_model_does(logged):
    exp = config.load(str(EXPERIMENTS / "crop_yields_manual.yaml"), ["epochs=5"])
    dataset = data.build(exp.data, exp.seed)
    result = training.train(exp.train, dataset)
    with tracking.run(tracking.experiment_id("crops"), "crops") as run_id:
        uri = tracking.log_model(run_id, result.model.to_module(), dataset, exp.train.dtype)
    name = "crops"
    version = registry.register(name, uri, result.train_loss[-1], tags={}, description="")
    assert registry.promote_if_better(name, version,
                                      result.train_loss[-1]).champion_version == version
    with torch.no_grad():
        direct = result.model(torch.as_tensor(dataset.features, dtype=torch.float32)).numpy()
    loaded = serving.load(f"models:/{name}@champion")
    assert loaded.target_names == ("apples", "oranges")
    np.testing.assert_array_equal(loaded.predict(dataset.features), direct.astype(np.float64))
    assert MlflowClient().get_model_version(name, version).run_id == run_id


def test_two_champion_decisions_at_once_keep_the_better(logged, monkeypatch):
    # Two studies finishing together: each reads the holder, then moves the alias. One at a
    # time, the second compares against the first's version.
    import threading
    import time

    name = "race"
    slow, fast = register(name, logged, "worse"), register(name, logged, "good")
    read = registry.champion

    def champion_then_wait(*args, **kwargs):
        found = read(*args, **kwargs)
        time.sleep(0.5)  # the window in which the other decision would read the same holder
        return found

    monkeypatch.setattr(registry, "champion", champion_then_wait)
    decisions = {}
    threads = [threading.Thread(target=lambda v=v, o=o: decisions.setdefault(
        v, registry.promote_if_better(name, v, o))) for v, o in ((fast, 0.1), (slow, 0.7))]
    for thread in threads:
        thread.start()
        time.sleep(0.1)
    for thread in threads:
        thread.join()
    monkeypatch.setattr(registry, "champion", read)
    assert registry.champion(name) == (fast, 0.1)
    assert decisions[fast].reason == "first champion"
    assert decisions[slow].reason == f"kept v{fast}: its objective 0.1 <= 0.7"
