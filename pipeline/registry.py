"""The MLflow Model Registry: register a sweep's best model and move the `champion` alias.

Aliases replace the deprecated stages: `models:/NAME@champion` always loads the version that
holds the alias. The alias moves only to a version whose objective beats the current champion's.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline import interrupts
from pipeline.errors import UserError, first_line
from pipeline.tracking.store import filter_value

CHAMPION = "champion"
BASIS_TAG = "objective_basis"  # what a version's objective measured: comparable only if equal


@dataclass(frozen=True)
class Decision:
    """Which version holds the alias after :func:`promote_if_better`, and why."""

    champion_version: str
    previous_objective: float | None  # the former holder's, when it was compared
    reason: str


@interrupts.shielded
def register(name: str, model_uri: str, objective: float, tags: dict[str, str],
             description: str) -> str:
    """Register ``model_uri`` as a new version of ``name``; return the version number."""
    with contextlib.redirect_stderr(io.StringIO()):  # MLflow prints two lines of its own
        version = mlflow.register_model(
            model_uri, name, tags={**tags, "objective": repr(objective)}
        )
    MlflowClient().update_model_version(name, version.version, description=description)
    return str(version.version)


@interrupts.shielded
def version_of_run(name: str, run_id: str) -> str | None:
    """The version of ``name`` registered from trial run ``run_id``, if any: a sweep killed
    between registering and recording it finds its version again instead of adding one."""
    try:
        found = MlflowClient().search_model_versions(
            f"name = {filter_value(name)} and tags.source_run_id = '{run_id}'")
    except MlflowException as err:  # no registered model of that name yet
        raise_unless_absent(err)
        return None
    return str(min(int(v.version) for v in found)) if found else None


@interrupts.shielded
def is_version_of_run(name: str, version: str, run_id: str) -> bool:
    """Whether ``version`` of ``name`` still exists and was registered from ``run_id`` (a
    version deleted in the UI leaves its number in the trial run's tags)."""
    try:
        found = MlflowClient().get_model_version(name, version)
    except MlflowException as err:
        raise_unless_absent(err)
        return False
    return run_id in (found.run_id, found.tags.get("source_run_id"))


@interrupts.shielded
def champion(name: str, alias: str = CHAMPION) -> tuple[str, float] | None:
    """The version holding ``alias`` and its objective, or None when no version holds it."""
    try:
        version = MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException as err:
        raise_unless_absent(err)
        return None
    objective = version.tags.get("objective")
    return str(version.version), float(objective) if objective is not None else float("inf")


@interrupts.shielded
def promote_if_better(name: str, version: str, objective: float,
                      alias: str = CHAMPION) -> Decision:
    """Give ``alias`` to ``version`` when its objective is lower than the holder's, measured
    the same way (the versions' ``objective_basis`` tags: which rows, which loss)."""
    with _deciding(name):
        return _promote_if_better(name, version, objective, alias)


@contextlib.contextmanager
def _deciding(name: str):
    """One champion decision at a time per model and store on this machine: two studies
    finishing together would each read the holder before the other moves the alias."""
    import hashlib
    import tempfile
    from pathlib import Path

    import filelock

    key = hashlib.sha256(f"{mlflow.get_tracking_uri()}\0{name}".encode()).hexdigest()[:16]
    with filelock.FileLock(Path(tempfile.gettempdir()) / f"pipeline-champion-{key}.lock"):
        yield


def _promote_if_better(name: str, version: str, objective: float, alias: str) -> Decision:
    current = champion(name, alias)
    if current is not None and current[0] == version:
        return Decision(version, None, "already the champion")
    if current is not None:
        client = MlflowClient()
        theirs = client.get_model_version(name, current[0]).tags.get(BASIS_TAG)
        ours = client.get_model_version(name, version).tags.get(BASIS_TAG)
        if theirs and ours and theirs != ours:
            return Decision(current[0], None, (
                f"kept v{current[0]}, not compared: its objective is the {theirs}, this one "
                f"the {ours}; `pipeline promote {name} {version}` moves the alias by hand"))
    if current is not None and not objective < current[1]:
        reason = f"kept v{current[0]}: its objective {current[1]:.6g} <= {objective:.6g}"
        return Decision(current[0], current[1], reason)
    MlflowClient().set_registered_model_alias(name, alias, version)
    if current is None:
        reason = "first champion"
    else:
        reason = f"beats v{current[0]}: {objective:.6g} < {current[1]:.6g}"
    return Decision(version, None if current is None else current[1], reason)


class RegistryError(UserError):
    """A registered model, version or alias that does not exist, or an alias MLflow refuses."""


@interrupts.shielded
def versions_table(name: str | None = None):
    """Registered models and their versions as a DataFrame, newest version first per model."""
    import pandas as pd

    client = MlflowClient()
    if name is not None:
        _registered_model(name)
        names = [name]
    else:
        names = sorted(m.name for m in client.search_registered_models())
    rows = []
    for model_name in names:
        # search_model_versions leaves aliases out; the registered model lists them.
        aliases: dict[str, list[str]] = {}
        for alias, number in client.get_registered_model(model_name).aliases.items():
            aliases.setdefault(str(number), []).append(alias)
        for version in client.search_model_versions(f"name = {filter_value(model_name)}"):
            tags = version.tags
            rows.append({
                "name": model_name,
                "version": int(version.version),
                "aliases": ",".join(sorted(aliases.get(str(version.version), []))),
                "objective": _float(tags.get("objective")),
                "model": tags.get("model_kind", ""),
                "lr": _float(tags.get("lr")),
                "epochs": tags.get("epochs", ""),
                "source_run": version.run_id or tags.get("source_run_id", ""),
                "created": pd.Timestamp(version.creation_timestamp, unit="ms").floor("s"),
            })
    table = pd.DataFrame(rows, columns=["name", "version", "aliases", "objective", "model",
                                        "lr", "epochs", "source_run", "created"])
    return table.sort_values(["name", "version"], ascending=[True, False], ignore_index=True)


def _float(text: str | None) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return float("nan")


def _registered_model(name: str):
    try:
        return MlflowClient().get_registered_model(name)
    except MlflowException as err:
        raise_unless_absent(err)
        raise RegistryError(f"no registered model named {name!r}") from None


def _check_alias(alias: str) -> None:
    """MLflow's own checks of an alias name (characters, length, reserved names)."""
    try:
        from mlflow.utils.validation import (
            _validate_model_alias_name,
            _validate_model_alias_name_reserved,
        )
    except ImportError:  # private to MLflow: where gone, the store still refuses the alias
        return
    try:
        _validate_model_alias_name(alias)
        _validate_model_alias_name_reserved(alias)
    except MlflowException as err:
        raise RegistryError(f"alias {alias!r} refused: {first_line(err)}") from None


def raise_unless_absent(err: Exception) -> None:
    """Go on only where MLflow says a model, version or alias is not there (an unknown alias,
    or a version that is no number, is an invalid parameter); a damaged store's error is
    raised as it is, not read as "no such model"."""
    if getattr(err, "error_code", None) not in ("RESOURCE_DOES_NOT_EXIST",
                                                 "INVALID_PARAMETER_VALUE"):
        raise err


@interrupts.shielded
def promote(name: str, version: str, alias: str = CHAMPION, reason: str = "") -> str | None:
    """Move ``alias`` to ``version`` by hand; record who, when, why and from which version.

    Returns the version that held the alias before, if any.
    """
    import datetime
    import getpass

    client = MlflowClient()
    _registered_model(name)
    try:
        client.get_model_version(name, version)
    except MlflowException as err:
        raise_unless_absent(err)
        raise RegistryError(f"registered model {name!r} has no version {version}") from None
    _check_alias(alias)  # before the record is written: a refused alias promotes nothing
    previous = champion(name, alias)
    record = {
        "by": getpass.getuser(),
        "at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "reason": reason or "promoted by hand",
        "previous_version": previous[0] if previous else "none",
    }
    # The record first: killed before the alias moves, the same command again finds the
    # same previous holder; the other way round the alias would move unrecorded.
    for key, value in record.items():
        client.set_model_version_tag(name, version, f"{alias}.promoted_{key}", value)
    try:
        client.set_registered_model_alias(name, alias, version)
    except MlflowException as err:
        raise RegistryError(f"alias {alias!r} refused: {first_line(err)}") from None
    return previous[0] if previous else None
