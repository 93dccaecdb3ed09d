"""The Optuna study behind a sweep: its sampler and pruner, what workers read, its counts,
and whether it may be resumed with the settings and data given now.

``--n-trials N`` is the number of *finished* trials (complete or pruned). Failed trials do not
count, so their budget is run again. The storages that keep N exactly are
:mod:`pipeline.storages`; dead workers and their trials are :mod:`pipeline.dead_trials`.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass

import optuna

from pipeline import data
from pipeline.config import Experiment
from pipeline.errors import first_line
from pipeline.outages import failed_under_way
from pipeline.storages import FINISHED, NotYet, SweepError

SPEC_ATTR = "pipeline"  # the study's user attribute holding the Spec


# --- what a worker needs ------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """Everything a worker needs, kept in the study's user attributes by the coordinator."""

    experiment: dict  # the resolved config, as config.to_raw gives it
    experiment_name: str
    digest: str
    lr: tuple[float, float]
    epochs: tuple[int, int]
    n_trials: int
    parent_run_id: str
    experiment_id: str
    tracking_uri: str  # without credentials
    data_uri: str
    data_key: str
    log_models: str
    sampler: str
    pruner: str
    seed: int | None
    batch: int = 1  # trials a worker trains together

    def to_attr(self) -> dict:
        return asdict(self)

    @classmethod
    def from_attr(cls, attr: dict) -> Spec:
        attr = dict(attr)
        attr["lr"], attr["epochs"] = tuple(attr["lr"]), tuple(attr["epochs"])
        return cls(**attr)


def read_spec(study: optuna.Study) -> Spec:
    attr = study.user_attrs.get(SPEC_ATTR)
    if attr is None:
        raise NotYet(f"study {study.study_name!r} was not set up by `pipeline sweep`; "
                     "run `pipeline sweep -e EXPERIMENT --study-name ...` first")
    return Spec.from_attr(attr)


def make_sampler(name: str, seed: int | None) -> optuna.samplers.BaseSampler:
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # Trials asked together (a batch, other workers) count as the worst seen so far
        # while they run, so TPE does not propose the same point to all of them.
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    if name == "percentile":
        return optuna.pruners.PercentilePruner(25.0, n_startup_trials=5)
    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0)


def load(storage, study_name: str, sampler: str = "tpe", pruner: str = "median",
         seed: int | None = None, offset: int = 0, create: bool = False) -> optuna.Study:
    """Load (or with ``create``, create) the study. The sampler's seed moves on with the trials
    already held and with ``offset`` (one per worker), so no two workers or resumes propose
    the same points, while one worker on a fresh study repeats exactly."""
    try:
        try:
            held = len(storage.get_all_trials(
                storage.get_study_id_from_name(study_name), deepcopy=False))
        except KeyError:
            if not create:
                raise NotYet(f"no study named {study_name!r} in this storage") from None
            held = 0
        if seed is not None:
            seed = (seed + held + offset) % 2**32
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.create_study(
                study_name=study_name, storage=storage, direction="minimize",
                sampler=make_sampler(sampler, seed), pruner=make_pruner(pruner),
                load_if_exists=True,
            )
    except (ValueError, RuntimeError) as err:
        raise SweepError(f"study {study_name!r} cannot be read: {first_line(err)}") from None


def check_ours(study_name: str, directions, user_attrs: dict, held: int) -> None:
    """Refuse a study of the same name made some other way (plain Optuna, another tool): its
    trials are not ours to count or to summarise. A study of ours minimises, and holds its
    spec before any trial."""
    if directions != [optuna.study.StudyDirection.MINIMIZE] or (
            held and SPEC_ATTR not in user_attrs):
        raise SweepError(f"study {study_name!r} in this storage was not made by `pipeline "
                         "sweep`; pass --study-name to start another study")


def counts(study: optuna.Study) -> dict[str, int]:
    states: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        states[trial.state.name] = states.get(trial.state.name, 0) + 1
    return states


def finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def said_on_stop(stop, study: optuna.Study, total: int) -> None:
    """Give a stopped sweep's ``stop`` (:class:`pipeline.interrupts.Interrupted`) the count it
    says; none where the storage does not answer, which is what stopped it from waiting."""
    stop.total = total
    if stop.storage_silent:
        return  # asking it would wait for its timeout
    try:
        stop.finished = finished(study)
    except Exception as err:
        if not failed_under_way(err):
            raise


# --- resuming a study --------------------------------------------------------------------------


def recorded_total(study: optuna.Study, old: dict | None, n_trials: int) -> int:
    """The total `pipeline worker`s work toward: this command's, but never lowered while
    trials are under way (another coordinator's campaign, whose workers would stop short of
    it and leave it waiting)."""
    under_way = (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
    if old is None or not study.get_trials(deepcopy=False, states=under_way):
        return n_trials
    return max(n_trials, old["n_trials"])


def config_digest(exp: Experiment) -> str:
    """What must stay the same for trials of one study to be comparable (the engine gives
    the same curves either way)."""
    params = {k: v for k, v in exp.params().items()
              if k not in ("lr", "epochs", "device", "engine") and not k.startswith("sweep.")}
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()


def check_resumable(study_name: str, spec: dict | None, exp: Experiment) -> str:
    """Refuse to go on with a study made with other settings or other data than ``exp``'s
    (``spec``: what the study recorded, if anything); return the data's content key."""
    data_key = data.content_key(exp.data, exp.seed)
    if spec is not None and spec["digest"] != config_digest(exp):
        raise SweepError(f"study {study_name!r} was made with other settings than "
                         f"{exp.name!r} has now; pass --study-name to start another study")
    if spec is not None and spec.get("data_key", data_key) != data_key:
        why = ("its CSV file changed" if exp.data.source == "csv" else
               "its rows came from another release of the pipeline, which made them otherwise")
        raise SweepError(f"study {study_name!r} was made with other data than "
                         f"{exp.name!r} gives now ({why}); pass --study-name to start "
                         "another study")
    return data_key


def check_before_tracking(storage, study_name: str, exp: Experiment,
                          tracking_uri: str) -> dict | None:
    """What :func:`load` and the sweep's set-up refuse, checked before the tracking store is
    touched, so that a refused sweep leaves no experiment behind; the study's spec, if any."""
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        return None  # a new study
    attrs = storage.get_study_user_attrs(study_id)
    check_ours(study_name, storage.get_study_directions(study_id), attrs,
               len(storage.get_all_trials(study_id, deepcopy=False)))
    spec = attrs.get(SPEC_ATTR)
    check_resumable(study_name, spec, exp)
    if spec is not None:
        check_same_store(study_name, spec, tracking_uri)
    return spec


def check_same_store(study_name: str, spec: dict, tracking_uri: str) -> None:
    """A study's runs are in the store it recorded: a SQLite file elsewhere is another store
    (checked before connecting, which would make that file). Other stores are known by the
    study's parent run (:func:`check_parent_here`), whatever the URL that reaches them."""
    recorded, now = _sqlite_file(spec["tracking_uri"]), _sqlite_file(tracking_uri)
    if recorded is not None and now is not None and recorded != now:
        raise elsewhere(study_name, spec, tracking_uri)


def check_parent_here(study_name: str, spec: dict, tracking_uri: str, present: bool) -> None:
    """After connecting: the study's parent run must be in this store (``present``)."""
    if not present:
        raise elsewhere(study_name, spec, tracking_uri)


def elsewhere(study_name: str, spec: dict, tracking_uri: str) -> SweepError:
    from pipeline import redact

    return SweepError(
        f"study {study_name!r} is tracked in {spec['tracking_uri']} (its parent run "
        f"{spec['parent_run_id']}), not in {redact.mask(tracking_uri)}: give --tracking-uri "
        f"{spec['tracking_uri']} to go on with it, or --study-name to start another study")


def _sqlite_file(uri: str):
    from pathlib import Path

    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").partition("?")[0]).resolve()
