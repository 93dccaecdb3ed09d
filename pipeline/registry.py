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

CHAMPION = "champion"


@dataclass(frozen=True)
class Decision:
    version: str
    champion_version: str
    promoted: bool
    previous_objective: float | None
    reason: str


def register(name: str, model_uri: str, objective: float, tags: dict[str, str],
             description: str) -> str:
    """Register ``model_uri`` as a new version of ``name``; return the version number."""
    with contextlib.redirect_stderr(io.StringIO()):  # MLflow prints two lines of its own
        version = mlflow.register_model(
            model_uri, name, tags={**tags, "objective": repr(objective)}
        )
    MlflowClient().update_model_version(name, version.version, description=description)
    return str(version.version)


def champion(name: str, alias: str = CHAMPION) -> tuple[str, float] | None:
    """The version holding ``alias`` and its objective, or None when no version holds it."""
    try:
        version = MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
    objective = version.tags.get("objective")
    return str(version.version), float(objective) if objective is not None else float("inf")


def promote_if_better(name: str, version: str, objective: float,
                      alias: str = CHAMPION) -> Decision:
    """Give ``alias`` to ``version`` when its objective is lower than the holder's."""
    current = champion(name, alias)
    if current is not None and current[0] == version:
        return Decision(version, version, False, current[1], "already the champion")
    if current is not None and not objective < current[1]:
        reason = f"kept v{current[0]}: its objective {current[1]:.6g} <= {objective:.6g}"
        return Decision(version, current[0], False, current[1], reason)
    MlflowClient().set_registered_model_alias(name, alias, version)
    if current is None:
        reason = "first champion"
    else:
        reason = f"beats v{current[0]}: {objective:.6g} < {current[1]:.6g}"
    return Decision(version, version, True, None if current is None else current[1], reason)
