"""Experiment configs: loading, overrides, and the checks that reject bad values by key name."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pydantic
import pytest

from pipeline import config, engine, recipes
from pipeline.config import ConfigError
from pipeline.sweep_settings import Range, SweepSettings

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
NAMES = sorted(p.stem for p in EXPERIMENTS.glob("*.yaml"))


@pytest.fixture(autouse=True)
def repo_experiments(monkeypatch):
    # experiments_dir() depends on the working directory and the environment; pin it so these
    # tests read the repository's experiments wherever pytest is started from.
    monkeypatch.setenv(config.EXPERIMENTS_ENV, str(EXPERIMENTS))


def names_key(key: str) -> str:
    """A regex matching ``key`` as a whole word, so ``lr`` does not match inside ``sweep.lr``."""
    return rf"(?<![\w.]){re.escape(key)}(?![\w])"


# --- the shipped experiments ---------------------------------------------------------------------


# What each shipped experiment must say, as its tutorial wrote it (tutorials 000-004 in
# experiments/*.yaml's comments): model kind, lr, epochs, batch size, loss, seed and data.
SHIPPED = {
    "crop_yields_builtin": dict(
        model="builtin", lr=1e-5, epochs=100, batch_size=5, shuffle=True, loss="mean", seed=0,
        weight_init="torch", bias_init="torch", activation="none", dtype="float32"),
    "crop_yields_manual": dict(  # one update by hand, then the tutorial's 100 epochs
        model="manual", lr=1e-5, epochs=101, batch_size=None, shuffle=False, loss="mean", seed=0,
        weight_init="randn", bias_init="randn", activation="none", dtype="float32"),
    "line_2x_plus_1": dict(
        model="builtin", lr=1e-2, epochs=100, batch_size=None, shuffle=False, loss="mean", seed=0,
        weight_init="torch", bias_init="torch", activation="none", dtype="float32"),
    "line_fit_15pts": dict(
        model="manual", lr=1e-2, epochs=11, batch_size=None, shuffle=False, loss="mean", seed=20,
        weight_init="randn", bias_init="zeros", activation="none", dtype="float32"),
    "relu_line": dict(
        model="manual", lr=1e-3, epochs=149, batch_size=None, shuffle=False, loss="sum", seed=0,
        weight_init="rand", bias_init="rand", activation="relu", dtype="float64",
        param_dtype="float32"),
    "slope_only": dict(
        model="manual", lr=0.1, epochs=4, batch_size=None, shuffle=False, loss="mean", seed=0,
        weight_init=-10.0, bias_init="none", activation="none", dtype="float32"),
    "synthetic": dict(
        model="builtin", lr=0.1, epochs=50, batch_size=256, shuffle=True, loss="mean", seed=0,
        weight_init="torch", bias_init="torch", activation="none", dtype="float32"),
}

# The data each recipe describes: source, then the fields that decide its size and truth.
SHIPPED_DATA = {
    "crop_yields_builtin": dict(source="table", repeat=3, rows=5,
                                feature_names=("temp", "rainfall", "humidity"),
                                target_names=("apples", "oranges")),
    "crop_yields_manual": dict(source="table", repeat=1, rows=5,
                               feature_names=("temp", "rainfall", "humidity"),
                               target_names=("apples", "oranges")),
    "line_2x_plus_1": dict(source="line", weight=2.0, bias=1.0, x_range=(0.0, 11.0, 1.0),
                           noise=0.0),
    "line_fit_15pts": dict(source="table", repeat=1, rows=15, feature_names=("x",),
                           target_names=("y",)),
    "relu_line": dict(source="line", weight=0.175, bias=0.4, x_divisor=100.0, noise=0.0,
                      rows=40),
    "slope_only": dict(source="line", weight=-3.0, bias=0.0, x_range=(-3.0, 3.0, 0.1),
                       noise=0.1, built_with="torch"),
    "synthetic": dict(source="synthetic", n_rows=2000, n_features=4, n_targets=2, noise=0.1),
}


def test_available_lists_every_yaml_file():
    assert list(config.available()) == [
        "crop_yields_builtin", "crop_yields_manual", "line_2x_plus_1", "line_fit_15pts",
        "relu_line", "slope_only", "synthetic",
    ]
    assert config.available()["slope_only"] == EXPERIMENTS / "slope_only.yaml"


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_experiment_loads_with_its_tutorials_values(name):
    experiment = config.load(name)
    assert experiment.name == name
    assert experiment.description
    for key, value in SHIPPED[name].items():
        assert getattr(experiment.train, key) == value, key
    assert experiment.train.gradient == "autograd"
    assert experiment.train.device == "auto"
    assert experiment.val_fraction == (0.2 if name == "synthetic" else 0.0)
    expected_data = dict(SHIPPED_DATA[name])
    rows = expected_data.pop("rows", None)
    for key, value in expected_data.items():
        assert getattr(experiment.data, key) == value, f"data.{key}"
    if rows is not None:
        recipe = experiment.data
        assert len(recipe.features if recipe.source == "table" else recipe.x) == rows
    # Every shipped experiment gives `pipeline sweep` both ranges.
    assert len(experiment.sweep.lr) == len(experiment.sweep.epochs) == 2


def test_load_by_path_uses_the_file_stem():
    experiment = config.load(str(EXPERIMENTS / "slope_only.yaml"))
    assert experiment.name == "slope_only"
    assert experiment.train.weight_init == -10.0
    assert experiment.train.bias_init == "none"
    assert not experiment.train.has_bias


def test_unknown_experiment_lists_known_names():
    with pytest.raises(ConfigError) as info:
        config.load("no_such_experiment")
    message = info.value.message
    assert "no_such_experiment" in message
    for name in NAMES:
        assert name in message


@pytest.mark.parametrize("stem, what", [("a:b", "':'"), ("a@b", "'@'"), ("a?b", "'?'"),
                                        ("x'y\"z", "both kinds of quote")])
def test_a_name_no_registered_model_can_have_is_refused(tmp_path, stem, what):
    # The name is the MLflow experiment's and the registered model's: a sweep would run every
    # trial and then fail to register (':'), or print a models:/ URI that reads otherwise.
    path = tmp_path / f"{stem}.yaml"
    path.write_text((EXPERIMENTS / "line_fit_15pts.yaml").read_text())
    with pytest.raises(ConfigError, match=re.escape(f"which cannot hold {what}; rename the file")):
        config.load(str(path))
    renamed = path.rename(tmp_path / "a #1, 'ok'.yaml")  # '#', spaces, one kind of quote
    assert config.load(str(renamed)).name == "a #1, 'ok'"


@pytest.mark.parametrize("stem", [".", "..", " ", "..x"])
def test_a_name_mlflow_reads_as_a_path_is_refused(tmp_path, stem):
    # MLflow refuses these model names; a sweep would train every trial first, then fail.
    path = tmp_path / f"{stem}.yaml"
    path.write_text((EXPERIMENTS / "line_fit_15pts.yaml").read_text())
    with pytest.raises(ConfigError, match="refuses blank or read as a path"):
        config.load(str(path))
    assert config.load(str(path.rename(tmp_path / ".x.yaml"))).name == ".x"


def test_experiments_dir_follows_the_environment(tmp_path, monkeypatch):
    # The file writes 1e-5 without a dot: YAML 1.1 reads that as a string, not a number.
    (tmp_path / "tiny.yaml").write_text(
        "lr: 1e-5\nepochs: 2\ndata:\n  source: line\n  x: [1, 2]\n  weight: 2\n"
    )
    monkeypatch.setenv(config.EXPERIMENTS_ENV, str(tmp_path))
    assert list(config.available()) == ["tiny"]
    experiment = config.load("tiny")
    assert experiment.train.lr == 1e-05
    assert isinstance(experiment.train.lr, float)
    assert experiment.data.x == (1.0, 2.0)


def test_invalid_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("lr: [0.1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(str(path))


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("- lr: 0.1\n- epochs: 2\n", "a list"),
        ("just some words\n", "a string"),
        ("42\n", "an integer"),
    ],
    ids=["list", "string", "number"],
)
def test_file_that_is_not_a_mapping_is_named(tmp_path, text, kind):
    path = tmp_path / "flat.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        config.load(str(path), ["lr=0.2"])  # overrides are merged into the mapping, so first
    assert info.value.message == (
        f"{path}: the file must hold a mapping of keys to values, got {kind}"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("data: {source: [1]}\n",
         "data.source must be one of table, line, synthetic, csv, got [1]"),
        ("data: {source: {a: 1}}\n", "data.source must be one of table, line, synthetic, csv, "
                                      "got {{'a': 1}}"),
        ("? [a, b]\n: 2\n", "{path}: not valid YAML (a key must be a name, not a list or "
                             "mapping)"),
        ("data: {csv: '~nobody-here-xyz/x.csv'}\n",
         "{path}: data.csv '~nobody-here-xyz/x.csv': no such home folder"),
    ],
    ids=["source-list", "source-mapping", "list-key", "unknown-home"],
)
def test_odd_yaml_values_are_named_in_one_line(tmp_path, text, message):
    path = tmp_path / "odd.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        config.load(str(path))
    assert info.value.message == message.format(path=path)


def test_empty_file_reads_as_no_keys(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(ConfigError, match="data: missing"):
        config.load(str(path))


def test_build_of_a_list_names_the_experiment():
    with pytest.raises(ConfigError) as info:
        config.build("flat", [1, 2])
    assert info.value.message == (
        "experiment 'flat': the file must hold a mapping of keys to values, got a list"
    )


# --- overrides ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [["lr=0.05", "epochs=3"], ["lr=0.05 epochs=3"]],
    ids=["separate", "one-string"],
)
def test_overrides_replace_training_values(overrides):
    # MLproject passes every assignment in one string, the CLI passes one per --set.
    experiment = config.load("slope_only", overrides)
    assert experiment.train.lr == 0.05
    assert experiment.train.epochs == 3
    # Untouched keys keep the file's values.
    assert experiment.train.weight_init == -10.0
    assert experiment.data.noise == 0.1


def test_dotted_override_reaches_the_data_recipe():
    experiment = config.load("slope_only", ["data.noise=0.2"])
    assert experiment.data.noise == 0.2
    assert experiment.data.weight == -3.0
    assert experiment.train.lr == 0.1


def test_dotted_override_fills_an_empty_data_section(tmp_path):
    path = tmp_path / "bare.yaml"
    path.write_text("lr: 0.1\nepochs: 2\ndata:\n")  # data: with nothing under it is null
    experiment = config.load(str(path), ["data.source=line data.x=[1,2] data.weight=2"])
    assert experiment.data == recipes.LineData(weight=2.0, x=(1.0, 2.0))


def test_dotted_override_into_a_section_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "flat_data.yaml"
    path.write_text("lr: 0.1\nepochs: 2\ndata: 3\n")
    with pytest.raises(ConfigError) as info:
        config.load(str(path), ["data.noise=0.2"])
    assert info.value.message == (
        "data: expected a mapping, got an integer, so data.noise cannot be set"
    )


def test_dotted_override_reaches_the_sweep():
    experiment = config.load("slope_only", ["sweep.epochs=[2,9]"])
    assert experiment.sweep.epochs == (2, 9)
    assert experiment.sweep.lr == (1e-3, 0.3)


@pytest.mark.parametrize("text", ["lr=1e-5", "lr=1.0e-5", "lr=0.00001"])
def test_exponent_without_dot_becomes_a_float(text):
    lr = config.load("slope_only", [text]).train.lr
    assert isinstance(lr, float)
    assert lr == 1e-05


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("batch_size=null", "batch_size", None),
        ("batch_size=7", "batch_size", 7),
        ("shuffle=true", "shuffle", True),
        ("epochs=2.0", "epochs", 2),  # a whole float is accepted as an integer
        ("weight_init=zeros", "weight_init", "zeros"),
        ("weight_init=0.5", "weight_init", 0.5),
    ],
)
def test_override_values_are_coerced_to_the_field_type(override, key, expected):
    value = getattr(config.load("slope_only", [override]).train, key)
    assert value == expected
    assert type(value) is type(expected)


def test_one_override_string_splits_only_before_a_key():
    # MLproject passes all overrides as one string; a list value keeps its spaces.
    assert config.parse_overrides(["lr=0.05 epochs=200", "sweep.epochs=[5, 50] seed=3",
                                   "description=two words", "   "]) == [
        ("lr", 0.05), ("epochs", 200), ("sweep.epochs", [5, 50]), ("seed", 3),
        ("description", "two words")]
    # Nor inside quotes, where "key=" is part of the value.
    assert config.parse_overrides(["description='a b=c' lr=0.1", 'description="x y=z"']) == [
        ("description", "a b=c"), ("lr", 0.1), ("description", "x y=z")]


def test_yaml_merge_keys_are_read_and_keys_they_bring_may_be_set_again(tmp_path):
    # `<<:` was "could not determine a constructor"; a key it brings may be set after it.
    path = tmp_path / "merged.yaml"
    path.write_text("seed: 0\ndata:\n  source: table\n  features: [[1], [2]]\n"
                    "  targets: [[3], [5]]\n<<: {lr: 0.5, epochs: 7}\nlr: 0.25\n")
    exp = config.load(str(path))
    assert (exp.train.lr, exp.train.epochs) == (0.25, 7)
    path.write_text(path.read_text() + "lr: 0.1\n")  # written twice by hand: refused
    with pytest.raises(ConfigError, match="key 'lr' appears twice"):
        config.load(str(path))


def test_a_description_longer_than_the_store_keeps_is_refused():
    # MLflow refused it at the store, in a message that did not name the key.
    with pytest.raises(ConfigError, match="^description must be at most 10,000 characters, "
                       "got 'aaaa.*\\.\\.\\.$"):
        config.load("slope_only", ["description=" + "a" * 10_001])


def test_values_nested_too_deeply_are_one_line(tmp_path):
    # YAML's reader recursed past Python's limit: a traceback.
    path = tmp_path / "deep.yaml"
    path.write_text("lr: 0.1\nepochs: 2\nsweep:\n  lr: " + "[" * 1200 + "]" * 1200 + "\n")
    with pytest.raises(ConfigError, match="a value is nested too deeply to be a config"):
        config.load(str(path))
    with pytest.raises(ConfigError, match="override sweep.lr: the value is nested too deeply"):
        config.parse_overrides(["sweep.lr=" + "[" * 1200])
    with pytest.raises(ConfigError) as info:
        config.load("slope_only", ["sweep.epochs=" + "[" * 300 + "]" * 300])
    assert len(info.value.message) < 200  # the value is quoted cut short


def test_epochs_beyond_what_a_curve_can_hold_are_refused():
    # A hundred million epochs once filled 21 GB of memory before any error.
    with pytest.raises(ConfigError, match="^epochs must be at most 1,000,000"):
        config.load("slope_only", ["epochs=1000001"])
    with pytest.raises(ConfigError, match="^sweep.epochs must end at 1,000,000 or less"):
        config.load("slope_only", ["sweep.epochs=[5, 100000000]"])
    assert config.load("slope_only", ["epochs=1000000"]).train.epochs == 1_000_000


@pytest.mark.parametrize("bad", ["lr", "=3", "lr:0.1"])
def test_override_without_key_and_value_is_rejected(bad):
    with pytest.raises(ConfigError, match="key=value"):
        config.parse_overrides([bad])


# --- rejected values: the message must name the key ----------------------------------------------


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("colour=red", "colour"),  # unknown top-level key
        ("data.colour=red", "data.colour"),  # unknown key in the data recipe
        ("sweep.colour=1", "sweep.colour"),
        ("train.lr=0.1", "train.lr"),  # no such section
        ("epochs=abc", "epochs"),
        ("epochs=2.5", "epochs"),
        ("shuffle=maybe", "shuffle"),
        ("lr=fast", "lr"),
        ("lr=true", "lr"),  # a bool is not a number, though Python says it is an int
        ("batch_size=big", "batch_size"),
        ("data.noise=loud", "data.noise"),
        ("data.weight=inf", "data.weight"),
        ("data.noise=-0.1", "data.noise"),
        ("data.x_range=[0,.inf,1]", "data.x_range"),
        ("model=linear", "model"),
        ("device=tpu", "device"),
        ("weight_init=gaussian", "weight_init"),
        ("bias_init=inf", "bias_init"),
    ],
)
def test_bad_override_names_the_key(override, key):
    with pytest.raises(ConfigError, match=names_key(key)) as info:
        config.load("slope_only", [override])
    assert "\n" not in info.value.message  # one line, never pydantic's report


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.colour=red",
         "unknown key data.colour (known keys: bias, built_with, noise, source, weight, x, "
         "x_divisor, x_range)"),
        ("epochs=abc", "epochs must be an integer, got 'abc'"),
        ("lr=true", "lr must be a number, got True"),
        ("shuffle=maybe", "shuffle must be true or false, got 'maybe'"),
        ("batch_size=big", "batch_size must be an integer or null, got 'big'"),
        ("description=3", "description must be a string, got 3"),
        ("data.x_range=3", "data.x_range must be a list, got 3"),
        ("data.x=[1,a]", "data.x[1] must be a number, got 'a'"),
        ("weight_init=[1]", "weight_init must be a number or a string, got [1]"),
        ("weight_init=gaussian",
         "weight_init must be a number or one of torch, randn, rand, zeros, got 'gaussian'"),
        ("model=linear", "model must be one of manual, builtin, got 'linear'"),
        ("lr=-1", "lr must be a finite number > 0, got -1.0"),
        ("data.noise=-0.1", "data.noise must be a finite number >= 0, got -0.1"),
        ("seed=-1", "seed must lie in [0, 2**32), got -1"),
        ("val_fraction=1", "val_fraction must lie in [0, 1), got 1.0"),
        ("sweep.lr=[0.1]", "sweep.lr must be [low, high], got [0.1]"),
    ],
)
def test_bad_override_message(override, message):
    # pydantic checks the types; the message is still the one line a user reads.
    with pytest.raises(ConfigError) as info:
        config.load("slope_only", [override])
    assert info.value.message == message


def test_an_unknown_key_is_named_before_a_bad_value():
    with pytest.raises(ConfigError) as info:
        config.load("slope_only", ["data.source=synthetic", "data.n_rows=0"])
    assert info.value.message.startswith("unknown key data.bias (known keys: n_features, ")


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("lr=0", "lr"),
        ("lr=-0.1", "lr"),
        ("lr=inf", "lr"),
        ("lr=.inf", "lr"),
        ("lr=nan", "lr"),
        ("epochs=0", "epochs"),
        ("epochs=-1", "epochs"),
        ("batch_size=0", "batch_size"),
    ],
)
def test_out_of_range_training_values_are_rejected(override, key):
    with pytest.raises(ConfigError, match=names_key(key)):
        config.load("slope_only", [override])


@pytest.mark.parametrize("overrides", [["engine=statistics", "activation=relu"],
                                       ["engine=statistics", "batch_size=5"]])
def test_the_closed_form_is_refused_where_it_is_not_exact(overrides):
    with pytest.raises(ConfigError, match=r"engine: statistics is exact only for full-batch "
                                          r"descent on a linear model \(batch_size: null, "
                                          r"activation: none\), not with (activation: relu|"
                                          r"batch_size: 5); use engine=loop or auto"):
        config.load("crop_yields_manual", overrides)
    assert config.load("crop_yields_manual", ["engine=statistics"]).train.engine == "statistics"
    assert config.load("relu_line", ["engine=loop"]).train.engine == "loop"
    assert config.load("relu_line").train.engine == "auto"


def test_analytic_gradient_needs_the_manual_model():
    with pytest.raises(ConfigError, match="gradient"):
        config.load("crop_yields_builtin", ["gradient=analytic"])
    # The same option is fine on a manual model.
    assert config.load("line_fit_15pts", ["gradient=analytic"]).train.gradient == "analytic"


@pytest.mark.parametrize("fraction", ["-0.1", "1", "1.0", "1.5", "nan"])
def test_val_fraction_outside_zero_to_one_is_rejected(fraction):
    with pytest.raises(ConfigError, match=names_key("val_fraction")):
        config.load("slope_only", [f"val_fraction={fraction}"])


@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.99])
def test_val_fraction_inside_zero_to_one_is_accepted(fraction):
    assert config.load("slope_only", [f"val_fraction={fraction}"]).val_fraction == fraction


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("sweep.lr=[0.1,0.01]", "sweep.lr"),  # inverted
        ("sweep.lr=[0,0.1]", "sweep.lr"),  # log-uniform needs low > 0
        ("sweep.lr=[0.1]", "sweep.lr"),  # not a pair
        ("sweep.epochs=[9,3]", "sweep.epochs"),
        ("sweep.epochs=[0,5]", "sweep.epochs"),
        ("sweep.epochs=[0,0]", "sweep.epochs"),
    ],
)
def test_bad_sweep_ranges_are_rejected(override, key):
    with pytest.raises(ConfigError, match=names_key(key)):
        config.load("slope_only", [override])


def test_equal_bounds_fix_a_swept_value():
    # [n, n] holds epochs (or lr) at n while the sweep searches the other.
    fixed = config.load("slope_only", ["sweep.epochs=[1000,1000]", "sweep.lr=[0.1,0.1]"]).sweep
    assert (fixed.epochs, fixed.lr) == ((1000, 1000), (0.1, 0.1))


def csv_experiment(features: list[str], targets: list[str]) -> dict:
    data = {"source": "csv", "csv": "table.csv", "features": features, "targets": targets}
    return {"lr": 0.1, "epochs": 1, "data": data}


@pytest.mark.parametrize(
    ("features", "targets", "message"),
    [
        (["a", "b", "a"], ["y"], "data.features lists column a more than once"),
        (["a"], ["y", "z", "y"], "data.targets lists column y more than once"),
        (
            ["a", "y"],
            ["y"],
            "column y is in both data.features and data.targets; "
            "a column is either a feature or a target",
        ),
    ],
    ids=["feature-twice", "target-twice", "feature-and-target"],
)
def test_csv_column_named_twice_is_rejected(features, targets, message):
    # Checked when the config is built, before any file is opened (table.csv does not exist).
    with pytest.raises(ConfigError) as info:
        config.build("csv", csv_experiment(features, targets))
    assert info.value.message == message


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (csv_experiment(["a", ""], ["y"]), "data.features[1] must be a name, got ''"),
        (csv_experiment(["a"], ["  "]), "data.targets[0] must be a name, got '  '"),
        ({"lr": 0.1, "epochs": 1, "data": {"source": "table", "features": [[1.0], [2.0]],
                                           "targets": [[1.0], [2.0]], "feature_names": [""]}},
         "data.feature_names[0] must be a name, got ''"),
    ],
    ids=["csv-feature", "csv-target", "table"],
)
def test_a_blank_column_name_is_rejected(raw, message):
    # MLflow's model signature would refuse it only after training.
    with pytest.raises(ConfigError) as info:
        config.build("blank", raw)
    assert info.value.message == message


def test_csv_columns_named_once_each_are_accepted():
    recipe = config.build("csv", csv_experiment(["a", "b"], ["y", "z"])).data
    assert recipe.features == ("a", "b")
    assert recipe.targets == ("y", "z")


def test_missing_required_key_is_named(tmp_path):
    path = tmp_path / "no_lr.yaml"
    path.write_text("epochs: 2\ndata:\n  source: line\n  x: [1, 2]\n  weight: 2\n")
    with pytest.raises(ConfigError, match=names_key("lr")):
        config.load(str(path))


# --- flattening for MLflow -----------------------------------------------------------------------


def test_params_flattens_training_and_data_keys():
    params = config.load("synthetic").params()
    expected = {
        "model": "builtin",
        "lr": 0.1,
        "epochs": 50,
        "batch_size": 256,
        "seed": 0,
        "device": "auto",
        "val_fraction": 0.2,
        "data.source": "synthetic",
        "data.n_rows": 2000,
        "data.n_features": 4,
        "data.n_targets": 2,
        "data.noise": 0.1,
        "data.weight_scale": 1.0,
        "sweep.lr": (1e-3, 2.0),
        "sweep.epochs": (5, 100),
    }
    assert {key: params[key] for key in expected} == expected
    # The data recipe appears only under its data. prefix, never as a nested mapping.
    assert "data" not in params
    assert not any(isinstance(value, dict) for value in params.values())


def test_params_reflect_overrides():
    params = config.load("slope_only", ["lr=0.05", "data.noise=0.2", "seed=7"]).params()
    assert params["lr"] == 0.05
    assert params["data.noise"] == 0.2
    assert params["seed"] == 7
    assert params["batch_size"] is None


def test_with_train_revalidates():
    experiment = config.load("slope_only")
    assert config.with_train(experiment, lr=0.2).train.lr == 0.2
    with pytest.raises(ConfigError, match=names_key("lr")):
        config.with_train(experiment, lr=math.inf)


def test_integer_written_in_exponent_form_is_accepted():
    # YAML 1.1 reads 1e3 as a string, as it does 1e-5 for lr.
    assert config.load("line_fit_15pts", ["epochs=1e3"]).train.epochs == 1000
    with pytest.raises(config.ConfigError, match="epochs must be an integer"):
        config.load("line_fit_15pts", ["epochs=1.5e0"])


# --- valid by construction -----------------------------------------------------------------------


def test_a_config_built_in_code_is_checked_too():
    with pytest.raises(ConfigError) as info:
        config.TrainConfig(lr=-1, epochs=3)
    assert info.value.message == "lr must be a finite number > 0, got -1.0"
    with pytest.raises(ConfigError, match="^missing key data.weight$"):
        recipes.LineData(x=(1.0, 2.0))
    with pytest.raises(ConfigError, match="^data.n_rows must be >= 1, got 0$"):
        recipes.SyntheticData(n_rows=0)
    with pytest.raises(ConfigError, match="^unknown key colour "):
        config.TrainConfig(lr=0.1, epochs=3, colour="red")


def test_configs_are_frozen_and_replace_checks_again():
    train = config.load("slope_only").train
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        train.lr = 0.5
    assert train.replace(lr=0.5).lr == 0.5
    assert train.lr == 0.1
    with pytest.raises(ConfigError, match="^epochs must be >= 1, got 0$"):
        train.replace(epochs=0)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_to_raw_builds_the_same_experiment(name):
    experiment = config.load(name)
    raw = config.to_raw(experiment)
    assert raw["data"]["source"] == experiment.data.source
    assert raw["sweep"] == {"lr": list(experiment.sweep.lr),
                            "epochs": list(experiment.sweep.epochs)}
    assert config.build(name, raw) == experiment


def test_sweep_ranges_are_ranges():
    sweep = config.load("slope_only").sweep
    assert sweep.lr == Range(low=1e-3, high=0.3)
    assert (sweep.epochs.low, sweep.epochs.high) == (1, 50)
    assert isinstance(sweep.epochs.low, int)
    # [] (or null) drops a range the file gives; the sweep then takes its default.
    dropped = config.load("slope_only", ["sweep.lr=[]", "sweep.epochs=null"]).sweep
    assert dropped.lr is None and dropped.epochs is None
    params = config.load("slope_only").params()
    assert type(params["sweep.lr"]) is tuple  # plain values only, as MLflow logs them


@pytest.mark.parametrize(
    ("bounds", "problem"),
    [
        ((0.1, 0.01), "must be a range [low, high] with low <= high, got [0.1, 0.01]"),
        ((0.1, float("nan")), "must be two finite numbers [low, high], got [0.1, nan]"),
        ((0.0, 0.1), "must lie above 0, got [0.0, 0.1]"),
        ((0.1,), "must be [low, high], got [0.1]"),
    ],
)
def test_one_lr_range_check_names_the_key_it_was_given_as(bounds, problem):
    # A config's sweep.lr and the command line's --lr-range are the same kind of range.
    with pytest.raises(ConfigError) as info:
        config.SweepConfig(lr=bounds)
    assert info.value.message == f"sweep.lr {problem}"
    with pytest.raises(ConfigError) as info:
        SweepSettings(n_trials=1, lr_range=bounds)
    assert info.value.message == f"--lr-range {problem}"


def test_epochs_ranges_are_integers_from_one():
    with pytest.raises(ConfigError, match=r"^sweep.epochs\[0\] must be an integer, got 2.5$"):
        config.SweepConfig(epochs=[2.5, 5])
    with pytest.raises(ConfigError) as info:
        SweepSettings(n_trials=1, epochs_range=(0, 5))
    assert info.value.message == "--epochs-range must start at 1 or more, got [0, 5]"
    settings = SweepSettings(n_trials=4, lr_range=(1e-4, 0.1), epochs_range=(2, 5))
    assert (settings.lr_range, settings.epochs_range) == (Range(1e-4, 0.1), Range(2, 5))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(n_trials=0), "--n-trials must be >= 1, got 0"),
        (dict(workers=-1), "--workers must be >= 0 (0: print the worker command), got -1"),
        (dict(timeout=0.0), "--timeout must be > 0 seconds, got 0.0"),
        (dict(seed=-5), "--seed must lie in [0, 2**32), got -5"),
        (dict(batch=0), "--batch must be >= 1, got 0"),
        (dict(sampler="grid"), "--sampler must be one of tpe, random, got 'grid'"),
    ],
)
def test_sweep_settings_name_the_option(options, message):
    with pytest.raises(ConfigError) as info:
        SweepSettings(**{"n_trials": 1, **options})
    assert info.value.message == message


@pytest.mark.parametrize(
    ("batch", "missing", "workers", "expected"),
    [
        (None, 100, 1, 8),  # one worker: batches of 8
        (None, 10, 2, 5),  # two workers share ten trials evenly, not 8 and 2
        (None, 24, 3, 8),
        (None, 3, 4, 1),  # more workers than trials: one each
        (None, 100, 0, 8),  # remote workers (--workers 0): their number is unknown
        (3, 100, 1, 3),  # --batch wins
    ],
)
def test_the_batch_is_sized_to_the_workers(batch, missing, workers, expected):
    assert SweepSettings(n_trials=100, batch=batch).batch_size(missing, workers) == expected


@pytest.mark.parametrize(("overrides", "message"), [
    (["model=builtin", "dtype=float64", "param_dtype=float32"],
     "param_dtype is a manual-model option"),
    (["dtype=float64", "param_dtype=float32", "engine=statistics"],
     "engine: statistics keeps no parameters in float32 beside float64 rows"),
])
def test_parameters_in_another_dtype_than_the_rows_only_where_they_can_be(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config.load("slope_only", overrides)
    same = config.load("line_2x_plus_1", ["model=builtin", "param_dtype=float32"]).train
    assert not same.mixed  # float32 parameters on float32 rows: nothing mixed
    mixed = config.load("slope_only", ["dtype=float64", "param_dtype=float32"]).train
    assert mixed.mixed and engine.program_for(mixed, 60) == "loop"  # auto: not the closed form


def test_scaling_is_refused_for_a_model_without_a_bias():
    # Centred features give the exported model w·(x - mean)/std an intercept.
    with pytest.raises(ConfigError, match="scale: standard centres the features"):
        config.load("slope_only", ["scale=standard"])


@pytest.mark.parametrize(("name", "overrides", "features"), [
    ("crop_yields_manual", ["product=elementwise"], 3),
    ("synthetic", ["model=manual", "product=elementwise", "data.n_features=2"], 2),
    ("line_fit_15pts", ["data.features=[[1, 2]]", "data.targets=[[1]]",
                        "data.feature_names=[a, b]"], 2),
])
def test_an_elementwise_product_needs_one_feature(name, overrides, features):
    # x * w is tutorials 000 and 003's form; with more features it would be no linear model.
    with pytest.raises(ConfigError, match=f"product: elementwise .* the data have {features}"):
        config.load(name, overrides)
    assert config.load("line_fit_15pts", ["model=builtin"]).train.product == "elementwise"
    assert config.load("slope_only").data.columns_in == 1
