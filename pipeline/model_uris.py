"""Model URIs: the forms `pipeline` takes, each checked before anything loads.

    models:/NAME@ALIAS, models:/NAME/VERSION, models:/NAME/latest   a registered model
    models:/m-<id>                                                 a logged model
    runs:/<run id>/PATH                                            a run's artifact
    a folder holding MLmodel                                       a model on disk

A registered model's missing part (the model, the alias, the version) is named in one line
instead of MLflow's longer error.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from pipeline.errors import UserError

URI_FORMS = ("models:/NAME@ALIAS, models:/NAME/VERSION, models:/NAME/latest, models:/m-<id>, "
             "runs:/<run id>/PATH")
_REGISTERED = re.compile(
    r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>[0-9]+|latest))$")
_LOGGED = re.compile(r"^models:/m-[0-9a-f]+$")
_RUN = re.compile(r"^runs:/[0-9a-f]+/.+$")


class ModelError(UserError):
    """A model URI that does not parse, names nothing, or points at files that do not load."""


def check_uri(uri: str) -> None:
    """Refuse a URI that is none of the forms below (or an existing local folder)."""
    if not uri.strip():
        raise ModelError(f"the model URI is empty; give one of {URI_FORMS} or a model folder")
    if _REGISTERED.match(uri) or _LOGGED.match(uri) or _RUN.match(uri):
        return
    local = uri.removeprefix("file://")
    if "://" not in local and ":/" not in local:
        path = Path(local)
        if path.is_dir():
            return
        if path.exists():
            raise ModelError(f"model {uri!r} is a file; give the model's folder (the one "
                             "holding MLmodel) or a URI")
        if uri.startswith(("/", ".", "~", "file://")) or os.sep in local:
            raise ModelError(f"{uri!r} is neither a model URI ({URI_FORMS}) nor a model "
                             f"folder: there is no folder {path.absolute()}")
    bare = re.fullmatch(r"models:/([^/@]+)", uri)
    if bare and bare[1].startswith("m-"):
        raise ModelError(f"model URI {uri!r} names no logged model: their ids are m- and hex "
                         "digits, as a training run's model_uri tag shows them")
    if bare:
        raise ModelError(f"model URI {uri!r} names no version of {bare[1]!r}: add @champion "
                         "(or another alias), /VERSION or /latest")
    raise ModelError(f"model URI {uri!r} does not parse; use {URI_FORMS} or a model folder")


def in_store(uri: str) -> bool:
    """Whether the model is found through the tracking store (not a local folder)."""
    return bool(_REGISTERED.match(uri) or _LOGGED.match(uri) or _RUN.match(uri))


def check_registered(uri: str) -> None:
    """Name the missing part (model, alias or version) instead of MLflow's longer error."""
    match = _REGISTERED.match(uri)
    if not match:
        return
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipeline.registry import raise_unless_absent
    from pipeline.tracking.store import filter_value

    client = MlflowClient()
    name = match["name"]
    try:
        client.get_registered_model(name)
    except MlflowException as err:
        raise_unless_absent(err)  # a damaged store, say: its own error, not "no such model"
        raise ModelError(f"no registered model named {name!r}: `pipeline sweep -e "
                         "EXPERIMENT` registers one (see `pipeline models`)") from None
    what = (f"alias {match['alias']!r}" if match["alias"] else "versions"
            if match["version"] == "latest" else f"version {match['version']}")
    try:
        if match["alias"]:
            client.get_model_version_by_alias(name, match["alias"])
        elif match["version"] == "latest":
            if not client.search_model_versions(f"name = {filter_value(name)}",
                                                max_results=1):
                raise ModelError(f"registered model {name!r} has no {what}")
        else:
            client.get_model_version(name, match["version"])
    except MlflowException as err:
        raise_unless_absent(err)
        raise ModelError(f"registered model {name!r} has no {what}") from None
