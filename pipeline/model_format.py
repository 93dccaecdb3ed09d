"""How a trained model is stored in MLflow, and what a folder must hold to be loaded safely.

A logged model is one ``torch.export`` program (``artifacts/model.pt2``) with two faces:

- the ``pytorch`` flavor, so ``mlflow.pytorch.load_model`` returns the program as a module that
  takes a tensor of features in training order;
- a ``python_function`` flavor written as "models from code" (``pyfunc_model.py``) with a
  column-based signature, so ``mlflow.pyfunc``, ``mlflow models serve`` and the MLflow UI know
  the features and targets by name, and requests may give the columns in any order.

Neither face unpickles anything. :func:`check_safe` refuses a folder that MLflow would load
through a pickle or through code of its own.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np

CODE_FILE = Path(__file__).with_name("pyfunc_model.py")
PROGRAM_FILE = "model.pt2"
EXAMPLE_ROWS = 5  # a one-row example would pin the exported graph to batch size 1
SAFE_LOADERS = {"mlflow.pytorch", "mlflow.pyfunc.loaders.code_model"}
# sha256 of the earlier versions of pyfunc_model.py, which models logged then carry: still this
# project's code (`git log pipeline/pyfunc_model.py`), so those models load after an upgrade.
EARLIER_CODE = {
    "70191745799752bd9939da14b553e4bb739e697e8a07d42714fa939091843d64",  # 859750e
    "f3e7317057501cae147e05418a6ccfcb598a12b3e88cff4a14b54ef284740d39",  # ab5ff2c
    "5a7cf364bca2333123338386754017bf1f02b607a189fb166639a7f56b53b13f",  # d6f5090
    "c061e59ed64b09563f61284bae5aee959db447db3929e117c44d6aa3bd56b776",  # 92a5101
}


class UnsafeModel(Exception):
    """A model folder that would run code or unpickle data when loaded; the message says why."""


class DamagedModel(Exception):
    """A model folder with no PyTorch model in it, or a damaged one; the message says why."""


def check_pytorch(meta) -> dict:
    """The ``pytorch`` flavor of a model's MLmodel, which every model of ours has."""
    flavors = meta.flavors if isinstance(meta.flavors, dict) else {}
    flavor = flavors.get("pytorch")
    if not isinstance(flavor, dict):
        raise DamagedModel(f"it is not a PyTorch model (its flavors: "
                           f"{', '.join(map(str, flavors)) or 'none'})")
    return flavor


# --- writing ------------------------------------------------------------------------------------


def signature(feature_names, target_names):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("double", name) for name in feature_names]),
        outputs=Schema([ColSpec("double", name) for name in target_names]),
    )


def save_model(path: str, mlflow_model, module, example: np.ndarray,
               feature_names, target_names, pip_requirements, **_) -> None:
    """What ``mlflow.models.Model.log`` calls to write a model folder at ``path``."""
    import mlflow.pyfunc
    import pandas as pd
    import torch

    rows = example[:EXAMPLE_ROWS]
    if len(rows) < 2:
        rows = np.repeat(rows, 2, axis=0)
    module = module.to("cpu").eval()
    with tempfile.TemporaryDirectory() as tmp:
        program_path = Path(tmp) / PROGRAM_FILE
        program = torch.export.export(
            module, (torch.from_numpy(np.ascontiguousarray(rows)),),
            dynamic_shapes=({0: torch.export.Dim.AUTO},),
        )
        torch.export.save(program, program_path)
        mlflow.pyfunc.save_model(
            path,
            python_model=str(CODE_FILE),
            artifacts={"program": str(program_path)},
            model_config={"features": list(feature_names), "targets": list(target_names),
                          "dtype": str(rows.dtype)},
            signature=signature(feature_names, target_names),
            input_example=pd.DataFrame(rows.astype(np.float64), columns=list(feature_names)),
            pip_requirements=pip_requirements,
            mlflow_model=mlflow_model,
        )
    mlflow_model.add_flavor("pytorch", model_data="artifacts",
                            pytorch_version=str(torch.__version__), code=None)
    mlflow_model.save(str(Path(path) / "MLmodel"))


# --- checking before loading --------------------------------------------------------------------


def check_safe(folder: Path, meta) -> None:
    """Refuse a model folder unless everything MLflow would load from it is pickle- and code-free.

    ``mlflow.pytorch.load_model`` reads the ``pytorch`` flavor's data folder: it unpickles a
    ``model.pth`` there if one exists (even beside a ``model.pt2``) and puts the flavor's ``code``
    folder on ``sys.path``. The ``python_function`` flavor is what ``mlflow.pyfunc`` and
    ``mlflow models serve`` would run: accepted are MLflow's torch loader (held to the same rules)
    and this project's own models-from-code file, nothing else.
    """
    flavors = meta.flavors if isinstance(meta.flavors, dict) else {}
    flavor = check_pytorch(meta)
    _check_torch_data(folder, flavor, "pytorch")
    pyfunc = flavors.get("python_function")
    if pyfunc is None:
        return
    if not isinstance(pyfunc, dict):
        raise UnsafeModel("its python_function flavor is not a mapping")
    loader = pyfunc.get("loader_module")
    if loader not in SAFE_LOADERS:
        raise UnsafeModel(f"its python_function flavor loads through {loader!r}, code of its own")
    if loader == "mlflow.pytorch":
        _check_torch_data(folder, pyfunc, "python_function")
        return
    if pyfunc.get("code"):
        raise UnsafeModel("its python_function flavor ships code of its own")
    # MLflow runs the file of that name in the model folder, wherever it was logged from.
    code = folder / Path(str(pyfunc.get("model_code_path") or "")).name
    if not (code.is_file() and _digest(code) in {_digest(CODE_FILE), *EARLIER_CODE}):
        raise UnsafeModel("its python_function flavor runs code other than this project's")
    # That code loads the folder two levels above its "program" artifact, as written (``..``
    # and links left to the system to follow): it must be this one, and the program ours.
    artifacts = pyfunc.get("artifacts") or {}
    program = str((artifacts.get("program") or {}).get("path") or "")
    expected = (folder / str(flavor.get("model_data")) / PROGRAM_FILE).resolve()
    if (set(artifacts) != {"program"} or (folder / program).resolve() != expected
            or ".." in Path(program).parts
            or os.path.realpath((folder / program).parent.parent) != os.path.realpath(folder)):
        raise UnsafeModel("its python_function flavor reads artifacts other than its program")


def _check_torch_data(folder: Path, flavor: dict, name: str) -> None:
    """What MLflow's torch loader reads: the ``code`` folder and ``model.pth`` or ``model.pt2``."""
    if flavor.get("code"):
        raise UnsafeModel(f"its {name} flavor puts code of its own on the import path")
    key = "model_data" if name == "pytorch" else "data"
    named = flavor.get(key)
    data = (folder / (named if isinstance(named, str) else "")).resolve()
    if not data.is_relative_to(folder.resolve()) or not data.is_dir() or data == folder.resolve():
        raise DamagedModel(f"its {name} flavor names no data folder inside the model")
    if (data / "model.pth").exists():
        raise UnsafeModel("it holds a pickled model.pth, which MLflow would load")
    if not (data / PROGRAM_FILE).is_file():
        raise DamagedModel(f"it holds no {PROGRAM_FILE} (torch.export program)")
    _check_program(data / PROGRAM_FILE)


# Constants torch.export.load unpickles whatever their config says (torchbind and opaque
# objects): no model of ours has any.
PICKLED_CONSTANTS = ("custom_obj_", "opaque_obj_")


def _check_program(program: Path) -> None:
    """``torch.export.load`` unpickles a weight or constant its archive marks ``use_pickle``,
    any constant stored as an object, and sample inputs that a weights-only load refuses.
    MLflow's check of the archive reads each config by name, keeping the last copy of a name
    written twice, while torch reads the first: refuse names written twice (or not in the plain
    form torch looks up), any record marked as a pickle or stored as an object, and sample
    inputs that are not plain tensors; no program of ours holds any of these."""
    import io
    import json
    import zipfile

    import torch

    try:
        with zipfile.ZipFile(program) as archive:
            infos = archive.infolist()
            names = [info.filename for info in infos]
            if len(set(names)) != len(names):
                raise UnsafeModel(f"its {PROGRAM_FILE} holds a file name twice")
            if any(n.startswith(("/", "./", "../")) or "//" in n or "\\" in n or "/./" in n
                   or "/../" in n for n in names):
                raise UnsafeModel(f"its {PROGRAM_FILE} holds a file under an irregular name")
            if any(n.rpartition("/")[2].startswith(PICKLED_CONSTANTS) for n in names):
                raise UnsafeModel(f"its {PROGRAM_FILE} holds a constant stored as an object")
            for info in infos:
                if info.filename.endswith("_config.json") and _marks_a_pickle(
                        json.loads(archive.read(info))):
                    raise UnsafeModel(f"its {PROGRAM_FILE} stores {info.filename} as a pickle")
                if "/sample_inputs/" in info.filename:
                    try:  # what torch tries first, before a load that runs any pickle
                        torch.load(io.BytesIO(archive.read(info)), weights_only=True)
                    except Exception:  # noqa: BLE001  (any failure: torch would unpickle)
                        raise UnsafeModel(f"its {PROGRAM_FILE}'s sample inputs are not plain "
                                          "tensors") from None
    except (zipfile.BadZipFile, OSError, ValueError, UnicodeDecodeError):
        raise DamagedModel(f"its {PROGRAM_FILE} is not a readable torch.export archive") from None


def _marks_a_pickle(node) -> bool:
    """A record marked ``use_pickle``, or naming a constant torch stores as an object."""
    if isinstance(node, dict):
        return node.get("use_pickle") not in (None, False) or any(
            _marks_a_pickle(value) for value in node.values())
    if isinstance(node, list):
        return any(_marks_a_pickle(value) for value in node)
    return isinstance(node, str) and node.startswith(PICKLED_CONSTANTS)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
