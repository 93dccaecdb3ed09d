"""The logged model format: named columns everywhere, and no code run from a hostile folder."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import warnings
import zipfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from click.testing import CliRunner
from mlflow.models import Model

from pipeline import model_format, serving
from pipeline.cli import cli

CROP = ["temp", "rainfall", "humidity"]
TARGETS = ["apples", "oranges"]


@pytest.fixture(scope="module")
def linear() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2)


@pytest.fixture(scope="module")
def genuine(tmp_path_factory, linear) -> Path:
    """A model folder as the pipeline writes it."""
    folder = tmp_path_factory.mktemp("genuine") / "model"
    example = np.random.default_rng(0).uniform(30, 140, (5, 3)).astype(np.float32)
    model_format.save_model(str(folder), Model(), linear, example, CROP, TARGETS,
                            pip_requirements=["torch"])
    return folder


def rows(count: int) -> pd.DataFrame:
    return pd.DataFrame(np.random.default_rng(count).uniform(30, 140, (count, 3)), columns=CROP)


def by_hand(linear, frame: pd.DataFrame) -> np.ndarray:
    with torch.no_grad():
        return linear(torch.tensor(frame[CROP].to_numpy(), dtype=torch.float32)).double().numpy()


def test_signature_names_features_and_targets(genuine):
    signature = Model.load(str(genuine)).signature
    assert signature.inputs.input_names() == CROP
    assert signature.outputs.input_names() == TARGETS


def test_pyfunc_matches_columns_by_name(genuine, linear):
    model = mlflow.pyfunc.load_model(str(genuine))
    frame = rows(7)
    shuffled = model.predict(frame[["humidity", "temp", "rainfall"]])
    assert list(shuffled.columns) == TARGETS and shuffled.shape == (7, 2)
    np.testing.assert_allclose(shuffled.to_numpy(), by_hand(linear, frame), rtol=1e-6)
    as_dict = model.predict({name: frame[name].tolist() for name in reversed(CROP)})
    np.testing.assert_allclose(as_dict.to_numpy(), shuffled.to_numpy(), rtol=1e-12)


def test_pyfunc_refuses_unknown_columns(genuine):
    model = mlflow.pyfunc.load_model(str(genuine))
    frame = rows(2).rename(columns={"temp": "tmp"})
    with pytest.raises(mlflow.exceptions.MlflowException, match=r"missing inputs \['temp'\]"):
        model.predict(frame)


@pytest.mark.parametrize("value", [1e39, -np.inf, np.nan])
def test_pyfunc_refuses_values_the_model_cannot_hold(genuine, value):
    # Cast to float32, 1e39 would become inf, and the row's predictions with it.
    model = mlflow.pyfunc.load_model(str(genuine))
    frame = rows(3)
    frame.loc[2, "rainfall"] = value
    with pytest.raises(mlflow.exceptions.MlflowException, match=re.escape(
            f"column rainfall holds {value:g} in row 3: not a finite number the model's "
            "float32 holds")):
        model.predict(frame)


def test_pytorch_flavor_loads_the_same_program(genuine, linear):
    module = mlflow.pytorch.load_model(str(genuine))
    frame = rows(10_000)
    with torch.no_grad():
        out = module(torch.tensor(frame.to_numpy(), dtype=torch.float32)).double().numpy()
    np.testing.assert_allclose(out, by_hand(linear, frame), rtol=1e-6)


def test_safe_loading_restores_the_pickle_setting(genuine, monkeypatch):
    monkeypatch.setenv(serving.PICKLE_ENV, "true")
    serving.load(str(genuine))
    assert os.environ[serving.PICKLE_ENV] == "true"
    monkeypatch.delenv(serving.PICKLE_ENV)
    loaded = serving.load(str(genuine))
    assert serving.PICKLE_ENV not in os.environ
    assert loaded.feature_names == tuple(CROP) and loaded.target_names == tuple(TARGETS)


# --- hostile folders ----------------------------------------------------------------------------


class Payload:
    """Unpickling this writes a marker file: the proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def _edit_mlmodel(folder: Path, edit) -> None:
    path = folder / "MLmodel"
    meta = yaml.safe_load(path.read_text())
    edit(meta["flavors"])
    path.write_text(yaml.safe_dump(meta))


def _pth_beside(folder: Path, marker: Path) -> None:
    torch.save(Payload(marker), folder / "artifacts" / "model.pth")
    (folder / "artifacts" / "pickle_module_info.txt").write_text("pickle")


def _pth_only(folder: Path, marker: Path) -> None:
    _pth_beside(folder, marker)
    (folder / "artifacts" / "model.pt2").unlink()


def _pickled_pyfunc(folder: Path, marker: Path) -> None:
    (folder / "python_model.pkl").write_bytes(pickle.dumps(Payload(marker)))
    _edit_mlmodel(folder, lambda flavors: flavors.update(python_function={
        **{k: v for k, v in flavors["python_function"].items() if k != "model_code_path"},
        "loader_module": "mlflow.pyfunc.model", "python_model": "python_model.pkl"}))


def _pyfunc_reads_a_pickle(folder: Path, marker: Path) -> None:
    (folder / "model.pkl").write_bytes(pickle.dumps(Payload(marker)))
    _edit_mlmodel(folder, lambda flavors: flavors.update(
        python_function={"loader_module": "mlflow.sklearn", "model_path": "model.pkl"}))


def _own_loader_module(folder: Path, marker: Path) -> None:
    (folder / "code").mkdir()
    (folder / "code" / "evil_loader.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "def _load_pyfunc(path):\n    return None\n")
    _edit_mlmodel(folder, lambda flavors: flavors.update(
        python_function={"loader_module": "evil_loader", "code": "code"}))


def _other_model_code(folder: Path, marker: Path) -> None:
    code = folder / "pyfunc_model.py"
    code.write_text(code.read_text() + f"\nopen({str(marker)!r}, 'w').write('ran')\n")


def _code_on_the_import_path(folder: Path, marker: Path) -> None:
    (folder / "code").mkdir()
    (folder / "code" / "numpy.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    _edit_mlmodel(folder, lambda flavors: flavors["pytorch"].update(code="code"))


def _program_elsewhere(folder: Path, marker: Path) -> None:
    # The pyfunc face loads its program's folder through mlflow.pytorch: point it at a sibling
    # folder that holds a pickle, leaving the checked pytorch flavor clean.
    other = folder / "other"
    shutil.copytree(folder / "artifacts", other / "artifacts")
    shutil.copy(folder / "MLmodel", other / "MLmodel")
    _pth_beside(other, marker)
    _edit_mlmodel(folder, lambda flavors: flavors["python_function"]["artifacts"].update(
        program={"path": "other/artifacts/model.pt2"}))


def _program_behind(folder: Path, marker: Path, how: str) -> None:
    # The program's path resolves to the genuine one, but the folder the pyfunc face loads
    # (two levels above it, as written) is another: one whose MLmodel unpickles a payload.
    if how == "..":
        inner, program = folder / "artifacts" / "sub", "artifacts/sub/../model.pt2"
    else:  # artifacts/link -> artifacts: the folder loaded is artifacts/
        inner, program = folder / "artifacts", "artifacts/link/model.pt2"
        (inner / "link").symlink_to(".")
    planted = folder.parent / f"{folder.name}-planted"
    shutil.copytree(folder / "artifacts", planted / "artifacts", symlinks=True)
    shutil.copy(folder / "MLmodel", planted / "MLmodel")
    _pth_beside(planted, marker)
    shutil.copytree(planted, inner, symlinks=True, dirs_exist_ok=True)
    _edit_mlmodel(folder, lambda flavors: flavors["python_function"]["artifacts"].update(
        program={"path": program}))


def _rewrite_program(folder: Path, marker: Path, config_twice: bool) -> None:
    """A weight stored as a pickle, its config marking it so. With ``config_twice`` the honest
    config follows under the same name: MLflow's archive check reads that last copy, torch the
    first."""
    program = folder / "artifacts" / "model.pt2"
    with zipfile.ZipFile(program) as archive:
        entries = [(info.filename, archive.read(info)) for info in archive.infolist()]
    config_name = next(name for name, _ in entries if name.endswith("weights_config.json"))
    honest = dict(entries)[config_name]
    marked = json.loads(honest)
    first = next(iter(marked["config"].values()))
    first["use_pickle"] = True
    payload = io.BytesIO()
    torch.save(Payload(marker), payload)
    with zipfile.ZipFile(program, "w") as archive:
        archive.writestr(config_name, json.dumps(marked))
        for name, content in entries:
            if name != config_name:
                pickled = name.endswith("/" + first["path_name"])
                archive.writestr(name, payload.getvalue() if pickled else content)
        if config_twice:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # zipfile: "Duplicate name"
                archive.writestr(config_name, honest)


def _pickled_sample_inputs(folder: Path, marker: Path) -> None:
    """Sample inputs that a weights-only load refuses: torch then loads them with any pickle."""
    payload = io.BytesIO()
    torch.save(Payload(marker), payload)
    _replace_in_program(folder, lambda name, content: payload.getvalue()
                        if "/sample_inputs/" in name else content)


def _object_constant(folder: Path, marker: Path) -> None:
    """A constant stored as an opaque object, which torch unpickles whatever its config says."""
    def edit(name: str, content: bytes) -> bytes:
        if name.endswith("constants_config.json"):
            config = json.loads(content)
            config["config"]["c"] = {"path_name": "opaque_obj_0", "is_param": False,
                                     "use_pickle": False, "tensor_meta": None}
            return json.dumps(config).encode()
        return content

    _replace_in_program(folder, edit, extra={"opaque_obj_0": pickle.dumps(Payload(marker))})


def _replace_in_program(folder: Path, edit, extra: dict | None = None) -> None:
    program = folder / "artifacts" / "model.pt2"
    with zipfile.ZipFile(program) as archive:
        entries = [(info.filename, archive.read(info)) for info in archive.infolist()]
    root = entries[0][0].split("/")[0]
    with zipfile.ZipFile(program, "w") as archive:
        for name, content in entries:
            archive.writestr(name, edit(name, content))
        for name, content in (extra or {}).items():
            archive.writestr(f"{root}/data/constants/{name}", content)


HOSTILE = {
    "pt2 and pth": (_pth_beside, "pickled model.pth"),
    "pth only": (_pth_only, "pickled model.pth"),
    "pickled pyfunc": (_pickled_pyfunc, "mlflow.pyfunc.model"),
    "pyfunc reads a pickle": (_pyfunc_reads_a_pickle, "mlflow.sklearn"),
    "own loader module": (_own_loader_module, "evil_loader"),
    "other model code": (_other_model_code, "code other than this project's"),
    "code on the import path": (_code_on_the_import_path, "import path"),
    "program elsewhere": (_program_elsewhere, "reads artifacts other than its program"),
    "program behind ..": (lambda folder, marker: _program_behind(folder, marker, ".."),
                          "reads artifacts other than its program"),
    "program behind a link": (lambda folder, marker: _program_behind(folder, marker, "link"),
                              "reads artifacts other than its program"),
    "weights config twice": (lambda folder, marker: _rewrite_program(folder, marker, True),
                             "holds a file name twice"),
    "weight as a pickle": (lambda folder, marker: _rewrite_program(folder, marker, False),
                           "as a pickle"),
    "pickled sample inputs": (_pickled_sample_inputs, "sample inputs are not plain tensors"),
    "constant as an object": (_object_constant, "constant stored as an object"),
}


def hostile(genuine: Path, tmp_path: Path, kind: str) -> tuple[Path, Path]:
    folder, marker = tmp_path / kind.replace(" ", "_"), tmp_path / "payload_ran"
    shutil.copytree(genuine, folder)
    HOSTILE[kind][0](folder, marker)
    return folder, marker


@pytest.mark.parametrize("kind", HOSTILE)
def test_hostile_folder_is_refused_by_predict(genuine, tmp_path, workdir, kind):
    folder, marker = hostile(genuine, tmp_path, kind)
    rows(3).to_csv("x.csv", index=False)
    result = CliRunner().invoke(cli, ["predict", "--model", str(folder), "--input", "x.csv"])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert len(lines) == 1 and "refusing to load model" in lines[0]
    assert HOSTILE[kind][1] in lines[0]
    assert not marker.exists(), "the payload ran"


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_hostile_run_artifact_is_refused(genuine, tmp_path, store, command):
    folder, marker = hostile(genuine, tmp_path, "pt2 and pth")
    mlflow.set_tracking_uri(store)
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(folder), "model")
    uri = f"runs:/{run.info.run_id}/model"
    rows(3).to_csv("x.csv", index=False)
    args = (["predict", "--model", uri, "--input", "x.csv"] if command == "predict"
            else ["evaluate", "-e", "crop_yields_builtin", "--model", uri])
    result = CliRunner().invoke(cli, [*args, "--tracking-uri", store])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert "pickled model.pth" in lines[0] and not marker.exists()


@pytest.mark.parametrize("kind", ["weight as a pickle", "pickled sample inputs",
                                  "constant as an object", "pth only"])
def test_plain_pyfunc_refuses_a_program_holding_pickles(genuine, tmp_path, kind, monkeypatch):
    # MLflow allows pickles unless told otherwise; the model's own code tells it otherwise.
    monkeypatch.delenv(serving.PICKLE_ENV, raising=False)
    folder, marker = hostile(genuine, tmp_path, kind)
    with pytest.raises(mlflow.exceptions.MlflowException, match="pickle is disallowed"):
        mlflow.pyfunc.load_model(str(folder))
    assert not marker.exists(), "the payload ran"
    assert serving.PICKLE_ENV not in os.environ


@pytest.mark.parametrize("count", [1, 5])
def test_pyfunc_predicts_what_pipeline_predict_does_to_the_bit(genuine, workdir, count):
    # A product's rounding depends on the layout of the rows: both paths store them by row.
    frame = rows(count)
    frame.to_csv("x.csv", index=False)
    result = CliRunner().invoke(cli, ["predict", "--model", str(genuine), "--input", "x.csv",
                                      "--output", "y.csv"])
    assert result.exit_code == 0, result.output
    printed = pd.read_csv("y.csv")[TARGETS].to_numpy(dtype=np.float32)  # 9 digits: exact
    pyfunc = mlflow.pyfunc.load_model(str(genuine))
    np.testing.assert_array_equal(
        pyfunc.predict(frame[["humidity", "temp", "rainfall"]]).to_numpy(np.float32), printed)


@pytest.mark.parametrize("mlmodel", [
    "flavors: [unclosed\n",
    "flavors:\n- pytorch\n",
    "evil: !!python/object/apply:os.system ['true']\nflavors: {}\n",
    "flavors:\n  pytorch:\n    model_data: [artifacts]\n",
])
def test_a_malformed_mlmodel_is_one_line(genuine, tmp_path, workdir, mlmodel):
    folder = tmp_path / "malformed"
    shutil.copytree(genuine, folder)
    (folder / "MLmodel").write_text(mlmodel)
    rows(3).to_csv("x.csv", index=False)
    result = CliRunner().invoke(cli, ["predict", "--model", str(folder), "--input", "x.csv"])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert len(lines) == 1 and "load model" in lines[0], lines


@pytest.mark.parametrize(("damage", "expected"), [
    (lambda folder: (folder / "artifacts" / "model.pt2").write_text("garbage"),
     "its model.pt2 is not a readable torch.export archive"),
    (lambda folder: (folder / "artifacts" / "model.pt2").unlink(),
     "it holds no model.pt2 (torch.export program)"),
    (lambda folder: _edit_mlmodel(folder, lambda flavors: flavors.pop("pytorch")),
     "it is not a PyTorch model (its flavors: python_function)"),
])
@pytest.mark.parametrize("allow_pickle", [[], ["--allow-pickle"]])
def test_a_damaged_or_foreign_model_is_named_as_such(genuine, tmp_path, workdir, damage,
                                                     expected, allow_pickle):
    # Not a question of trust: no hint to allow pickles, and no torch warnings before the line.
    folder = tmp_path / "damaged"
    shutil.copytree(genuine, folder)
    damage(folder)
    rows(3).to_csv("x.csv", index=False)
    result = CliRunner().invoke(cli, ["predict", "--model", str(folder), "--input", "x.csv",
                                      *allow_pickle])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1, result.stderr
    if allow_pickle and "PyTorch" not in expected:  # then torch itself says what it lacks
        assert lines[0].startswith(f"Error: cannot load model {folder}: ")
    else:
        assert lines[0] == f"Error: cannot load model {folder}: {expected}"


def test_make_serve_checks_the_model_loads_safely_first(genuine, tmp_path, workdir):
    # `make serve` runs `pipeline models --check MODEL` before `mlflow models serve`.
    folder, marker = hostile(genuine, tmp_path, "weights config twice")
    refused = CliRunner().invoke(cli, ["models", "--check", str(folder)])
    assert refused.exit_code == 1 and "holds a file name twice" in refused.stderr
    assert "serves only a model that passes this check" in refused.stderr
    assert "--allow-pickle" not in refused.stderr  # predict's option: no use to serving
    assert not marker.exists()
    assert CliRunner().invoke(cli, ["models", "--check", str(genuine)]).exit_code == 0


def test_models_carrying_an_earlier_version_of_the_project_code_still_load(genuine, tmp_path,
                                                                            monkeypatch):
    # Every model carries the pyfunc_model.py it was logged with; an upgrade changes ours.
    folder = tmp_path / "older"
    shutil.copytree(genuine, folder)
    code = folder / "pyfunc_model.py"
    code.write_text(code.read_text() + "\n# as an earlier release wrote it\n")
    with pytest.raises(model_format.UnsafeModel, match="code other than this project's"):
        model_format.check_safe(folder, Model.load(str(folder)))
    monkeypatch.setattr(model_format, "EARLIER_CODE",
                        {*model_format.EARLIER_CODE, model_format._digest(code)})
    model_format.check_safe(folder, Model.load(str(folder)))


def test_every_released_version_of_the_model_code_is_known():
    # Changing pyfunc_model.py must keep the models logged with it loadable: its old digest
    # goes into EARLIER_CODE (this lists the file's history where git is there to ask).
    import hashlib
    import subprocess

    def git(*args: str) -> bytes:
        return subprocess.run(["git", "-C", str(Path(__file__).resolve().parents[1]), *args],
                              capture_output=True, check=True, timeout=30).stdout

    try:
        commits = git("log", "--format=%H", "--", "pipeline/pyfunc_model.py").split()
    except (OSError, subprocess.SubprocessError):
        pytest.skip("no git history here")
    known = {model_format._digest(model_format.CODE_FILE), *model_format.EARLIER_CODE}
    for commit in commits:
        text = git("show", f"{commit.decode()}:pipeline/pyfunc_model.py")
        assert hashlib.sha256(text).hexdigest() in known, f"pyfunc_model.py of {commit[:7]}"
