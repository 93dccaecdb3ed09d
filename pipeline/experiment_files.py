"""Reading experiment configs: where the files live, how YAML is read, and ``--set``
overrides.

    experiments/line_fit_15pts.yaml    # found by name, or given as a path

A file is read into a plain mapping and overrides are merged into it; :mod:`pipeline.config`
builds the checked :class:`~pipeline.config.Experiment` from that mapping (its values and
one-line errors: :mod:`pipeline.schema`).
"""

from __future__ import annotations

import functools
import os
import posixpath
import re
import typing
from pathlib import Path
from typing import Any

from pipeline.errors import first_line
from pipeline.schema import ConfigError

if typing.TYPE_CHECKING:
    pass

EXPERIMENTS_ENV = "PIPELINE_EXPERIMENTS_DIR"


# --- files and overrides ------------------------------------------------------------------------


def experiments_dir() -> Path:
    """Where experiment configs live: $PIPELINE_EXPERIMENTS_DIR, ./experiments, or the repo's."""
    if env := os.environ.get(EXPERIMENTS_ENV):
        return Path(env)
    local = Path("experiments")
    if local.is_dir():
        return local
    return Path(__file__).resolve().parent.parent / "experiments"


def available() -> dict[str, Path]:
    folder = experiments_dir()
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}


# Characters a registered model's name cannot hold (MLflow refuses ':' and '/'), or that a
# models:/NAME@ALIAS URI reads otherwise ('@' an alias, '?' a query).
NOT_IN_NAMES = (":", "@", "?")


def _read_as_a_path(name: str) -> bool:
    """Whether MLflow refuses ``name`` for a registered model (its model-name check): blank,
    or a path that normalises to another, to the current folder or above it."""
    normal = posixpath.normpath(name) if name else ""
    return not name.strip() or normal != name or normal == "." or normal.startswith("..")


def read_raw(name_or_path: str) -> tuple[str, dict[str, Any]]:
    """The experiment's name (the file's stem) and the mapping its YAML file holds."""
    import yaml

    path = Path(name_or_path)
    known = available()
    if name_or_path in known and not path.suffix:
        path = known[name_or_path]
    elif path.suffix not in (".yaml", ".yml") and os.sep not in name_or_path:
        names = ", ".join(known) or "none found"
        raise ConfigError(f"unknown experiment {name_or_path!r} (known: {names})")
    elif not path.exists():
        raise ConfigError(f"no such experiment file {path.absolute()}")
    elif not path.is_file():
        raise ConfigError(f"{path.absolute()} is not a file")
    bad = [repr(c) for c in NOT_IN_NAMES if c in path.stem]
    if "'" in path.stem and '"' in path.stem:  # MLflow's searches quote a name with one
        bad.append("both kinds of quote")
    if bad:
        raise ConfigError(f"{path}: the experiment's name {path.stem!r} (the file's name) also "
                          f"names its registered model, models:/NAME@ALIAS, which cannot hold "
                          f"{bad[0]}; rename the file")
    if _read_as_a_path(path.stem):
        raise ConfigError(f"{path}: the experiment's name {path.stem!r} (the file's name) also "
                          f"names its registered model, which MLflow refuses blank or read as "
                          f"a path ('.', '..'); rename the file")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_unique_key_loader())
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror or first_line(err)})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({first_line(err)})") from None
    except RecursionError:
        raise ConfigError(f"{path}: a value is nested too deeply to be a config") from None
    if raw is None:  # an empty file: building it then names the first missing key
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: the file must hold a mapping of keys to values, got {kind_of(raw)}"
        )
    data = raw.get("data")
    if isinstance(data, dict) and isinstance(data.get("csv"), str):
        # A CSV named in a config file lives beside it, wherever the command runs from
        # (one given with --set data.csv=... is taken from the current folder).
        try:
            csv = Path(data["csv"]).expanduser()
        except RuntimeError:  # "~someone/...", someone unknown here
            raise ConfigError(f"{path}: data.csv {data['csv']!r}: no such home folder") from None
        data["csv"] = str((path.parent / csv).absolute())
    return path.stem, raw


@functools.cache
def _unique_key_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        """YAML's safe loader, refusing a key written twice in one mapping (which YAML would
        otherwise settle silently, the last one winning)."""

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base`: its keys may be set again here, as YAML allows
                key = self.construct_object(key_node, deep=deep)
                if isinstance(key, (list, dict)):
                    raise yaml.constructor.ConstructorError(
                        None, None, "a key must be a name, not a list or mapping",
                        key_node.start_mark)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} appears twice", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return Loader


NEXT_ASSIGNMENT = re.compile(r"\s+(?=[^\s=\[\]{},]+=)")  # a space, then key=


def _assignments(item: str) -> list[str]:
    """``item`` split where a space comes before the next ``key=``, outside quotes
    (``description='a b=c' lr=0.1`` is two assignments)."""
    pieces, start = [], 0
    for found in NEXT_ASSIGNMENT.finditer(item):
        before = item[start:found.start()]
        if before.count("'") % 2 == 0 and before.count('"') % 2 == 0:
            pieces.append(before)
            start = found.end()
    return [*pieces, item[start:]]


def parse_overrides(assignments: typing.Iterable[str]) -> list[tuple[str, Any]]:
    """``["lr=0.05", "data.noise=0.2 epochs=3"]`` -> ``[("lr", 0.05), ...]``.

    Each item may hold several space-separated assignments (MLproject passes one string); an
    item splits only where a space comes before the next ``key=``, so values such as
    ``sweep.epochs=[5, 50]`` keep their spaces.
    """
    import yaml

    parsed = []
    for item in assignments:
        if not item.strip():
            continue
        for assignment in _assignments(item.strip()):
            key, sep, text = assignment.partition("=")
            if not sep or not key:
                raise ConfigError(f"override {assignment!r} must look like key=value")
            try:
                value = yaml.safe_load(text) if text else ""
            except yaml.YAMLError:
                value = text
            except RecursionError:
                raise ConfigError(f"override {key}: the value is nested too deeply") from None
            parsed.append((key, value))
    return parsed


def apply_overrides(raw: dict[str, Any], overrides: list[tuple[str, Any]]) -> dict[str, Any]:
    """A copy of ``raw`` with each ``(key, value)`` set; ``data.x`` and ``sweep.x`` reach in."""
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for key, value in overrides:
        section, _, leaf = key.rpartition(".")
        if section:
            if section not in ("data", "sweep"):
                raise ConfigError(f"unknown key {key} (sections: data., sweep.)")
            if merged.get(section) is None:
                merged[section] = {}
            if not isinstance(merged[section], dict):
                raise ConfigError(
                    f"{section}: expected a mapping, got {kind_of(merged[section])}, "
                    f"so {key} cannot be set"
                )
            merged[section][leaf] = value
        else:
            merged[key] = value
    return merged


def kind_of(value: Any) -> str:
    """What a parsed YAML value is, in words: ``[1, 2]`` -> ``a list``."""
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    if value is None:
        return "null"
    names = {int: "an integer", float: "a number", str: "a string", bool: "true/false"}
    return names.get(type(value), f"a {type(value).__name__}")  # a date, read from 2024-01-01
