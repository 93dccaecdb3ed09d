"""What a stage is handed from elsewhere, checked before it opens a run: ``--data`` from a
generate run (made with the config's data settings, not deleted), and a model to evaluate
(the data hold its features and targets, by name, in values its dtype can hold)."""

from __future__ import annotations

import re
from pathlib import Path

from pipeline import data, model_uris, serving, tracking
from pipeline.config import Experiment
from pipeline.dataset import Dataset


def check_recipe(exp: Experiment, data_uri: str) -> None:
    """Refuse ``--data`` from a generate run whose data settings are not the config's: the
    new run would record settings its rows were not made with."""
    if not (found := re.match(r"^runs:/([0-9a-f]+)/", data_uri)):
        return  # a folder: its recipe is not recorded
    run = tracking.get_run(found[1])
    if run.info.lifecycle_stage == "deleted":  # its files go with the next `mlflow gc`
        raise data.DataError(f"--data {data_uri}: run {found[1]} is deleted; restore it "
                             f"(`mlflow runs restore --run-id {found[1]}`) or generate again")
    if run.data.tags.get("stage") != "generate":
        return
    recorded = run.data.params
    advice = (f"give --data generated with {exp.name}'s settings as they are now (or no "
              "--data, to build the rows)")
    if (then := recorded.get("data.source")) != exp.data.source:
        raise data.DataError(f"--data {data_uri} was generated from a {then} recipe, but "
                             f"{exp.name} makes its rows from a {exp.data.source} recipe; "
                             f"{advice}")
    cut = False  # a value longer than a param holds, compared only as far as it was kept
    for key, value in exp.params().items():
        if key.startswith("data.") and key != "data.csv":  # a path may be written two ways
            if (then := recorded.get(key)) != (now := tracking.param_text(value)):
                raise data.DataError(f"--data {data_uri} was generated with {key}={then}, but "
                                     f"{exp.name} has {key}={now} now; {advice}")
            cut = cut or len(now) == tracking.PARAM_CHARS
    if cut and run.data.tags.get("data_key") != data.content_key(exp.data, exp.seed):
        raise data.DataError(f"--data {data_uri} was generated with other data settings than "
                             f"{exp.name} has now (they differ past what a param keeps); "
                             f"{advice}")
    # The same settings can still give other rows: another CSV file, or another seed where
    # the recipe draws random numbers.
    then_csv, then_seed = recorded.get("data.csv", ""), recorded.get("seed")
    now_csv = getattr(exp.data, "csv", None)
    if now_csv is not None and Path(then_csv).resolve() != Path(now_csv).resolve():
        raise data.DataError(f"--data {data_uri} was generated from {then_csv}, but "
                             f"{exp.name} reads {now_csv} now; {advice}")
    if data.draws_random_numbers(exp.data) and then_seed != str(exp.seed):
        raise data.DataError(f"--data {data_uri} was generated with seed={then_seed}, but "
                             f"{exp.name} has seed={exp.seed} now, which draws other rows; "
                             f"{advice}")


def model_columns(exp: Experiment, dataset: Dataset, model: serving.LoadedModel,
                  model_uri: str) -> Dataset:
    """The data's columns a model takes and gives, by name and in the model's order; a model
    whose features or targets the data lack (or name otherwise) is refused."""
    targets = model.target_names
    if not targets:  # a model that records no target names: its outputs, by position
        width = model.predict(dataset.features[:1, :len(model.feature_names)]).shape[1]
        if width != dataset.targets.shape[1]:
            raise model_uris.ModelError(
                f"model {model_uri} gives {width} outputs but {exp.name}'s data has "
                f"{dataset.targets.shape[1]} targets; was it trained on another experiment?")
        targets = dataset.target_names
    for role, wanted, present in (("features", model.feature_names, dataset.feature_names),
                                  ("targets", targets, dataset.target_names)):
        if missing := [name for name in wanted if name not in present]:
            raise model_uris.ModelError(
                f"model {model_uri} takes {role} {', '.join(wanted)} but {exp.name}'s data "
                f"has {', '.join(present)} (no {', '.join(missing)}); was it trained on "
                "another experiment?")
    picked = dataset.columns(model.feature_names, targets)
    serving.check_range(picked.features, picked.feature_names, model.dtype, f"{exp.name}'s data: ")
    return picked
