"""Datasets: the recipes' rows, the validation split, files in and out, and the cache key."""

from __future__ import annotations

import os
from pathlib import Path

import click
import numpy as np
import pandas as pd
import pytest

from pipeline import config, data, tables
from pipeline import memory as memory_guard
from pipeline.data import DataError
from pipeline.recipes import CsvData, LineData, SyntheticData, TableData

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"

# The raw x values of experiments/relu_line.yaml, before the tutorial divides them by 100.
RELU_LINE_X = [
    1.0, 20.4, 30.5, 7.5, 9.9, 100.9, 200.1, 45.1, 150.1, 7.0,
    29.4, 31.5, 157.3, 10.9, 120.6, 16.9, 201.1, 21.1, 300.1, 21.0,
    120.4, 230.5, 37.5, 49.9, 230.0, 109.9, 121.1, 145.1, 157.1, 17.0,
    219.4, 131.5, 187.3, 210.9, 290.6, 126.9, 71.1, 91.1, 19.1, 100.0,
]  # fmt: skip


def experiment(name: str) -> config.Experiment:
    # By path, so the test does not depend on the working directory or $PIPELINE_EXPERIMENTS_DIR.
    return config.load(str(EXPERIMENTS / f"{name}.yaml"))


def built(name: str) -> data.Dataset:
    exp = experiment(name)
    return data.build(exp.data, exp.seed)


def numbered(n: int) -> data.Dataset:
    """Rows whose single feature is their own index, so a split's rows can be identified."""
    index = np.arange(n, dtype=np.float64)
    return data.Dataset(index[:, None], 10 * index[:, None], ("x",), ("y",))


# --- recipes --------------------------------------------------------------------------------------


def test_table_repeat_tiles_the_rows():
    dataset = built("crop_yields_builtin")
    assert dataset.features.shape == (15, 3)
    assert dataset.targets.shape == (15, 2)
    for i in range(10):
        np.testing.assert_array_equal(dataset.features[i + 5], dataset.features[i])
        np.testing.assert_array_equal(dataset.targets[i + 5], dataset.targets[i])
    np.testing.assert_array_equal(dataset.features[0], [73, 67, 43])
    np.testing.assert_array_equal(dataset.targets[4], [103, 119])
    assert dataset.feature_names == ("temp", "rainfall", "humidity")
    assert dataset.target_names == ("apples", "oranges")
    assert dataset.truth() is None


def test_table_without_names_gets_default_names():
    dataset = data.build(TableData(features=((1.0, 2.0),), targets=((3.0,),)), seed=0)
    assert dataset.feature_names == ("x0", "x1")
    assert dataset.target_names == ("y",)
    assert dataset.features.dtype == np.float64


def test_line_from_range_matches_arange_and_truth():
    exp = config.load("slope_only", ["data.built_with=numpy"])  # numpy's float64 arange
    dataset = data.build(exp.data, exp.seed)
    expected_x = np.arange(-3, 3, 0.1)
    assert dataset.features.shape == (60, 1)
    assert dataset.targets.shape == (60, 1)
    np.testing.assert_array_equal(dataset.features[:, 0], expected_x)
    np.testing.assert_array_equal(dataset.true_weight, [[-3.0]])
    np.testing.assert_array_equal(dataset.true_bias, [0.0])
    assert dataset.truth() == {"weight": [[-3.0]], "bias": [0.0]}
    # noise 0.1 around y = -3x: visible, but small.
    residual = dataset.targets[:, 0] - (-3.0 * expected_x)
    assert np.any(residual != 0)
    assert 0.05 < residual.std() < 0.2


def test_line_noise_follows_the_seed():
    recipe = experiment("slope_only").data
    np.testing.assert_array_equal(data.build(recipe, 3).targets, data.build(recipe, 3).targets)
    assert not np.array_equal(data.build(recipe, 3).targets, data.build(recipe, 4).targets)


def test_relu_line_scales_x_and_fits_the_line_exactly():
    dataset = built("relu_line")
    x = dataset.features[:, 0]
    assert x.shape == (40,)
    np.testing.assert_allclose(x, np.array(RELU_LINE_X) / 100, rtol=1e-15, atol=0)
    # noise: 0.0, so the targets are the line itself, bit for bit.
    np.testing.assert_array_equal(dataset.targets[:, 0], 0.175 * x + 0.4)


def test_relu_line_x_is_bitwise_the_tutorials_division():
    np.testing.assert_array_equal(built("relu_line").features[:, 0], np.array(RELU_LINE_X) / 100)


@pytest.mark.parametrize(("n", "d", "k"), [(50, 3, 2), (7, 1, 1), (20, 5, 4)])
def test_synthetic_shapes(n, d, k):
    recipe = SyntheticData(n_rows=n, n_features=d, n_targets=k, noise=0.1)
    dataset = data.build(recipe, seed=0)
    assert dataset.features.shape == (n, d)
    assert dataset.targets.shape == (n, k)
    assert dataset.true_weight.shape == (k, d)
    assert dataset.true_bias.shape == (k,)
    assert len(dataset.feature_names) == d
    assert len(dataset.target_names) == k


def test_synthetic_targets_come_from_the_true_weights():
    dataset = data.build(SyntheticData(n_rows=30, n_features=3, n_targets=2, noise=0.0), seed=5)
    expected = dataset.features @ dataset.true_weight.T + dataset.true_bias
    np.testing.assert_array_equal(dataset.targets, expected)


def test_synthetic_same_seed_same_data_different_seed_different_data():
    recipe = SyntheticData(n_rows=40, n_features=3, n_targets=2)
    first, again, other = data.build(recipe, 1), data.build(recipe, 1), data.build(recipe, 2)
    for field in ("features", "targets", "true_weight", "true_bias"):
        np.testing.assert_array_equal(getattr(first, field), getattr(again, field))
        assert not np.array_equal(getattr(first, field), getattr(other, field))


# --- memory ---------------------------------------------------------------------------------------


@pytest.fixture
def memory(monkeypatch):
    """Pretend the machine has 21.3 GB available, so messages do not depend on the host."""
    monkeypatch.setattr(memory_guard, "available_memory", lambda: 21_300_000_000)


def test_synthetic_data_too_large_for_memory_is_refused(memory):
    exp = config.load(
        str(EXPERIMENTS / "synthetic.yaml"),
        ["data.n_rows=100000000000", "data.n_features=3", "data.n_targets=1"],
    )
    # Refused before allocating: 1e11 × 4 float64 would be a MemoryError, not this message.
    with pytest.raises(DataError) as info:
        data.build(exp.data, exp.seed)
    assert info.value.message == (
        "synthetic data of 100000000000 × 3 → 1 needs about 19.2 TB of memory; "
        "this machine has 21.3 GB available; lower data.n_rows"
    )


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        (
            SyntheticData(n_rows=10, n_features=10**9, n_targets=1),
            "synthetic data of 10 × 1000000000 → 1 needs about 528.0 GB of memory; "
            "this machine has 21.3 GB available; lower data.n_features",
        ),
        (
            # The true weights alone are 1e9 × 2 values, beside the 10 rows.
            SyntheticData(n_rows=10, n_features=1, n_targets=10**9),
            "synthetic data of 10 × 1 → 1000000000 needs about 576.0 GB of memory; "
            "this machine has 21.3 GB available; lower data.n_targets",
        ),
        (
            TableData(features=((1.0, 2.0),), targets=((3.0,),), repeat=10**12),
            "table data of 1000000000000 × 2 → 1 needs about 144.0 TB of memory; "
            "this machine has 21.3 GB available; lower data.repeat",
        ),
        (
            LineData(weight=1.0, x_range=(0.0, 1e12, 1.0)),
            "line data of 1000000000000 × 1 → 1 needs about 96.0 TB of memory; "
            "this machine has 21.3 GB available; lower data.x_range",
        ),
    ],
    ids=["features", "targets", "table-repeat", "line-range"],
)
def test_generated_data_too_large_names_the_key_to_lower(memory, recipe, message):
    with pytest.raises(DataError) as info:
        data.build(recipe, seed=0)
    assert info.value.message == message


def test_memory_estimate_is_six_float64_copies(monkeypatch):
    # 1000 rows × (3 + 1) values plus 1 × (3 + 1) weights and bias, 8 bytes, six times over.
    needed = 6 * 8 * (1000 * 4 + 4)
    recipe = SyntheticData(n_rows=1000, n_features=3, n_targets=1)
    monkeypatch.setattr(memory_guard, "available_memory", lambda: needed)
    assert data.build(recipe, seed=0).features.shape == (1000, 3)
    monkeypatch.setattr(memory_guard, "available_memory", lambda: needed - 1)
    with pytest.raises(DataError,
                       match="needs about 192.2 kB of memory; this machine has 192.2 kB"):
        data.build(recipe, seed=0)


def test_this_machine_refuses_an_absurd_size():
    with pytest.raises(DataError, match=r"needs about 192\.0 PB of memory; this machine has \d"):
        data.build(SyntheticData(n_rows=10**15), seed=0)


def test_available_memory_reads_meminfo(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000 kB\nMemFree:  1000 kB\nMemAvailable:   20800 kB\n")
    monkeypatch.setattr(memory_guard, "MEMINFO", meminfo)
    assert memory_guard.available_memory() == 20800 * 1024


def test_available_memory_falls_back_to_physical_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(memory_guard, "MEMINFO", tmp_path / "no_meminfo")
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert memory_guard.available_memory() == physical


# --- split ----------------------------------------------------------------------------------------


def test_split_with_no_validation_returns_the_dataset_itself():
    dataset = numbered(10)
    train, val = data.split(dataset, 0.0, seed=0)
    assert train is dataset
    assert val is None


def test_split_rows_are_disjoint_and_cover_everything():
    train, val = data.split(numbered(10), 0.2, seed=0)
    train_rows, val_rows = set(train.features[:, 0]), set(val.features[:, 0])
    assert len(val_rows) == 2
    assert len(train_rows) == 8
    assert train_rows.isdisjoint(val_rows)
    assert train_rows | val_rows == set(range(10))
    # Targets travel with their features.
    np.testing.assert_array_equal(train.targets, 10 * train.features)
    np.testing.assert_array_equal(val.targets, 10 * val.features)


def test_split_keeps_the_truth():
    dataset = data.build(SyntheticData(n_rows=20), seed=0)
    train, val = data.split(dataset, 0.25, seed=0)
    assert train.true_weight is dataset.true_weight
    assert val.true_bias is dataset.true_bias


def test_split_is_deterministic_per_seed():
    dataset = numbered(50)
    first_train, first_val = data.split(dataset, 0.2, seed=3)
    again_train, again_val = data.split(dataset, 0.2, seed=3)
    np.testing.assert_array_equal(first_train.features, again_train.features)
    np.testing.assert_array_equal(first_val.features, again_val.features)
    _, other_val = data.split(dataset, 0.2, seed=4)
    assert not np.array_equal(first_val.features, other_val.features)


@pytest.mark.parametrize(("n", "fraction"), [(5, 0.95), (1, 0.2), (2, 0.9)])
def test_split_leaving_no_training_rows_is_an_error(n, fraction):
    with pytest.raises(DataError, match="no training rows"):
        data.split(numbered(n), fraction, seed=0)


def test_split_holds_out_at_least_one_row():
    # round(10 * 0.01) is 0; a validation set must still have a row.
    train, val = data.split(numbered(10), 0.01, seed=0)
    assert val.n_rows == 1
    assert train.n_rows == 9


# --- files ----------------------------------------------------------------------------------------


def test_data_error_is_a_click_exception():
    # The CLI relies on this to print one line instead of a traceback.
    assert issubclass(DataError, click.ClickException)


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "no such file"),
        ("", "empty"),
        ("a,b\n", "no data rows"),
        # pandas would make the first field the index and shift the rest one column along.
        ("a,b\n7,1,2\n8,2,3\n", "more fields than its header"),
    ],
    ids=["missing", "zero-bytes", "header-only", "rows-longer-than-the-header"],
)
def test_unusable_csv_files_are_data_errors(tmp_path, text, message):
    path = tmp_path / "table.csv"
    if text is not None:
        path.write_text(text)
    with pytest.raises(DataError, match=message) as info:
        data.build(CsvData(csv=str(path), features=("a",), targets=("b",)), seed=0)
    assert str(path) in info.value.message


def test_missing_column_is_named(tmp_path):
    path = write_csv(tmp_path / "table.csv", "a,b\n1,2\n")
    with pytest.raises(DataError, match="no column named c") as info:
        tables.read_table(path, ("a", "c"), ("b",))
    # The message lists what the file does have.
    assert "a, b" in info.value.message


@pytest.mark.parametrize("cell", ["abc", "", "inf"])
def test_non_numeric_cell_names_the_column(tmp_path, cell):
    path = write_csv(tmp_path / "table.csv", f"a,b\n1,2\n3,{cell}\n")
    with pytest.raises(DataError, match="column b") as info:
        data.build(CsvData(csv=str(path), features=("a",), targets=("b",)), seed=0)
    assert "data row 2" in info.value.message


@pytest.mark.parametrize(
    ("cell", "shown"),
    [
        ("NaN", "'NaN'"),
        ("nan", "'nan'"),
        ("NA", "'NA'"),
        ("null", "'null'"),
        ("N/A", "'N/A'"),
        ("inf", "'inf'"),
        ("-inf", "'-inf'"),
        ("", "an empty cell"),
    ],
)
def test_bad_cell_is_quoted_as_written(tmp_path, cell, shown):
    path = write_csv(tmp_path / "table.csv", f"a,b\n1,2\n3,{cell}\n")
    with pytest.raises(DataError) as info:
        data.build(CsvData(csv=str(path), features=("a",), targets=("b",)), seed=0)
    assert info.value.message == (
        f"{path}: column b holds a non-numeric or missing value ({shown}) in data row 2"
    )


def test_clean_numeric_columns_parse_as_float64(tmp_path):
    path = write_csv(tmp_path / "table.csv", "a,b,note\n1.5,2,NA\n-3,4,x\n")
    frame = tables.read_frame(path)
    assert frame["a"].dtype == np.float64
    # Text that pandas would call missing stays the text the file holds.
    assert frame["note"].tolist() == ["NA", "x"]
    matrix = tables.numeric_matrix(frame, ("b", "a"), path)
    assert matrix.dtype == np.float64
    np.testing.assert_array_equal(matrix, [[2.0, 1.5], [4.0, -3.0]])


def test_true_and_false_in_a_csv_are_not_taken_for_1_and_0(tmp_path):
    path = write_csv(tmp_path / "table.csv", "a,b\nTrue,1\nFalse,2\n")
    with pytest.raises(DataError) as info:
        data.build(CsvData(csv=str(path), features=("a",), targets=("b",)), seed=0)
    assert info.value.message == (
        f"{path}: column a holds true/false values, not numbers; write them as 1 and 0")


@pytest.mark.parametrize(("value", "shown"), [(np.nan, "an empty cell"), (np.inf, "'inf'")])
def test_bad_parquet_value_is_named(tmp_path, value, shown):
    dataset = data.Dataset(np.array([[1.0], [2.0]]), np.array([[3.0], [value]]), ("a",), ("b",))
    path = tables.write(dataset, tmp_path) / "data.parquet"
    with pytest.raises(DataError) as info:
        tables.read_table(path, ("a",), ("b",))
    assert info.value.message == (
        f"{path}: column b holds a non-numeric or missing value ({shown}) in data row 2"
    )


@pytest.mark.parametrize(("cells", "message"), [
    (pd.to_datetime(["2020-01-01", "2020-01-02"]), "holds dates or times (datetime64"),
    (pd.to_timedelta([1, 2], unit="s"), "holds dates or times (timedelta64"),
    (pd.period_range("2020-01", periods=2, freq="M"), "holds dates or times (period[M])"),
    ([[1.0, 2.0], [3.0]], "holds a non-numeric or missing value ('[1. 2.]') in data row 1"),
    ([True, False], "holds true/false values, not numbers; write them as 1 and 0"),
    (pd.array([True, None], dtype="boolean"), "holds true/false values"),
])
def test_parquet_cells_that_are_not_numbers_are_refused(tmp_path, cells, message):
    # pandas would read times as nanoseconds; a list cell once ended in a traceback.
    path = tmp_path / "table.parquet"
    pd.DataFrame({"a": cells, "b": [1.0, 2.0]}).to_parquet(path)
    with pytest.raises(DataError) as info:
        tables.read_table(path, ("a",), ("b",))
    assert info.value.message.startswith(f"{path}: column a {message}")


@pytest.mark.parametrize("big", [1e308, 1e200])
def test_values_whose_squares_overflow_are_refused(tmp_path, big):
    path = write_csv(tmp_path / "table.csv", f"a,b\n1,2\n{big:g},3\n")
    with pytest.raises(DataError) as info:
        data.build(CsvData(csv=str(path), features=("a",), targets=("b",)), seed=0)
    assert info.value.message == (
        f"{path}: column a holds values too large to train on ({big:g} in data row 2): the "
        "sum of their squares overflows; rescale the column")
    # 1e150 squared is 1e300: large, but still a number to compute with.
    path = write_csv(tmp_path / "table.csv", "a,b\n1,2\n1e150,3\n")
    assert data.build(CsvData(csv=str(path), features=("a",), targets=("b",)), 0).n_rows == 2


def test_a_table_in_another_format_is_named_as_such(tmp_path):
    # Read as a CSV, a JSON file gave "the file has no data rows".
    path = write_csv(tmp_path / "rows.json", '[{"x": 1, "y": 2}]\n')
    with pytest.raises(DataError, match="rows.json: is a .json file; give the rows as CSV or "
                       "Parquet"):
        tables.read_frame(path)


def test_a_blank_line_in_a_one_column_file_is_an_empty_cell(tmp_path):
    # pandas skips blank lines; in a one-column file that drops a row and shifts the rest.
    path = write_csv(tmp_path / "table.csv", "x\n1\n\n3\n")
    with pytest.raises(DataError, match="column x holds a non-numeric or missing value "
                       "\\(an empty cell\\) in data row 2"):
        tables.numeric_matrix(tables.read_frame(path), ("x",), path)
    # Blank lines that end the file are its end.
    path = write_csv(tmp_path / "table.csv", "x\n1\n3\n\n\n")
    matrix = tables.numeric_matrix(tables.read_frame(path), ("x",), path)
    np.testing.assert_array_equal(matrix, [[1.0], [3.0]])


def test_repeated_header_column_is_refused(tmp_path):
    path = write_csv(tmp_path / "table.csv", "a,b,a\n1,2,3\n")
    with pytest.raises(DataError) as info:
        data.build(CsvData(csv=str(path), features=("a",), targets=("b",)), seed=0)
    assert info.value.message == f"{path}: the header names column a more than once"


def test_column_really_named_with_a_dot_suffix_is_kept(tmp_path):
    # "a.1" is what pandas renames a repeated "a" to; written by the user, it is a real name.
    path = write_csv(tmp_path / "table.csv", "a,a.1\n1,2\n3,4\n")
    dataset = tables.read_table(path, ("a",), ("a.1",))
    np.testing.assert_array_equal(dataset.targets, [[2.0], [4.0]])


def reads_csv(path: Path) -> None:
    data.build(CsvData(csv=str(path), features=("a",), targets=("b",)), seed=0)


def keys_csv(path: Path) -> None:
    data.content_key(CsvData(csv=str(path), features=("a",), targets=("b",)), seed=0)


@pytest.mark.parametrize("use", [reads_csv, keys_csv], ids=["build", "content_key"])
def test_folder_given_as_csv_says_so(tmp_path, use):
    folder = tmp_path / "table.csv"
    folder.mkdir()
    with pytest.raises(DataError) as info:
        use(folder)
    assert info.value.message == f"{folder}: is a folder, not a CSV or Parquet file"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
@pytest.mark.parametrize("use", [reads_csv, keys_csv], ids=["build", "content_key"])
def test_unreadable_csv_says_permission_denied(tmp_path, use):
    path = write_csv(tmp_path / "table.csv", "a,b\n1,2\n")
    path.chmod(0)
    with pytest.raises(DataError) as info:
        use(path)
    assert info.value.message == f"{path}: cannot be read: permission denied"


@pytest.mark.parametrize(
    ("target", "use"),
    [("pandas.read_csv", reads_csv), ("pathlib.Path.read_bytes", keys_csv)],
    ids=["build", "content_key"],
)
def test_denied_read_says_permission_denied(tmp_path, monkeypatch, target, use):
    # The same refusal as above, made to happen when the tests run as root.
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    path = write_csv(tmp_path / "table.csv", "a,b\n1,2\n")
    monkeypatch.setattr(target, denied)
    with pytest.raises(DataError) as info:
        use(path)
    assert info.value.message == f"{path}: cannot be read: permission denied"


def test_csv_round_trip(tmp_path):
    path = write_csv(tmp_path / "table.csv", "t,x1,x2,y\n9,1.5,2,10\n9,-3,4.25,20\n9,0,0,30\n")
    dataset = data.build(CsvData(csv=str(path), features=("x2", "x1"), targets=("y",)), seed=0)
    # Columns come out in the order the recipe names them; unnamed columns are dropped.
    np.testing.assert_array_equal(dataset.features, [[2.0, 1.5], [4.25, -3.0], [0.0, 0.0]])
    np.testing.assert_array_equal(dataset.targets, [[10.0], [20.0], [30.0]])
    assert dataset.features.dtype == np.float64
    # Rows contiguous and writable, as training moves them to the device.
    for array in (dataset.features, dataset.targets):
        assert array.flags.c_contiguous and array.flags.writeable
    assert dataset.feature_names == ("x2", "x1")
    assert dataset.target_names == ("y",)
    assert dataset.truth() is None


def test_write_then_read_keeps_rows_names_and_truth(tmp_path):
    original = data.build(SyntheticData(n_rows=25, n_features=3, n_targets=2), seed=4)
    folder = tables.write(original, tmp_path / "out")
    assert (folder / "data.parquet").is_file()
    back = tables.read(folder)
    assert back.features.flags.c_contiguous and back.features.flags.writeable
    np.testing.assert_array_equal(back.features, original.features)
    np.testing.assert_array_equal(back.targets, original.targets)
    assert back.feature_names == original.feature_names
    assert back.target_names == original.target_names
    np.testing.assert_array_equal(back.true_weight, original.true_weight)
    np.testing.assert_array_equal(back.true_bias, original.true_bias)


def test_write_then_read_without_truth(tmp_path):
    original = built("crop_yields_manual")
    back = tables.read(tables.write(original, tmp_path))
    np.testing.assert_array_equal(back.features, original.features)
    assert back.feature_names == ("temp", "rainfall", "humidity")
    assert back.true_weight is None
    assert back.truth() is None


def test_read_of_a_folder_without_schema_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="schema.json"):
        tables.read(tmp_path)


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ("{bad", "not readable as a dataset's schema (Expecting property name"),
        ('{"features": ["x"]}', "'targets' must list the column names, got None"),
        ('{"features": [], "targets": ["y"]}', "'features' must list the column names, got []"),
        ('["x", "y"]', "'features' must list the column names, got None"),
        ('{"features": ["x"], "targets": ["y"], "truth": [1]}',
         "'truth' must hold the true 'weight' and 'bias'"),
    ],
    ids=["not-json", "no-targets", "no-features", "a-list", "bad-truth"],
)
def test_read_of_a_damaged_schema_is_one_data_error(tmp_path, schema, message):
    folder = tables.write(built("line_fit_15pts"), tmp_path)
    (folder / "schema.json").write_text(schema)
    with pytest.raises(DataError) as info:
        tables.read(folder)
    assert info.value.message.startswith(f"{folder / 'schema.json'}: {message}")


def test_slope_only_rows_are_the_tutorials_torch_calls():
    # Tutorial 003: X = torch.arange(-3, 3, 0.1); Y = -3 * X + 0.1 * torch.randn(X.size()),
    # in float32; unseeded there, seed 0 here gives what torch.manual_seed(0) would.
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    x = torch.arange(-3, 3, 0.1).view(-1, 1)
    y = -3 * x + 0.1 * torch.randn(x.size())
    dataset = built("slope_only")
    np.testing.assert_array_equal(dataset.features, x.double().numpy())
    np.testing.assert_array_equal(dataset.targets, y.double().numpy())
    # Drawn from a generator of its own: torch's global one is left as it was.
    torch.manual_seed(1)
    before = torch.rand(1)
    torch.manual_seed(1)
    built("slope_only")
    assert torch.rand(1) == before


# --- content key ----------------------------------------------------------------------------------


def test_content_key_is_stable_for_the_same_recipe():
    recipe = experiment("synthetic").data
    key = data.content_key(recipe, 0)
    assert len(key) == 64 and int(key, 16) >= 0  # a sha256 hex digest
    # The same content written out by hand, not read from the file, names the same entry.
    by_hand = SyntheticData(n_rows=2000, n_features=4, n_targets=2, noise=0.1, weight_scale=1.0)
    assert by_hand == recipe
    assert data.content_key(by_hand, 0) == key
    # Any change to the recipe or the seed names another entry, and changing back restores it.
    for changed in (by_hand.replace(n_rows=1999),
                    by_hand.replace(noise=0.0),
                    by_hand.replace(weight_scale=2.0)):
        assert data.content_key(changed, 0) != key
    assert data.content_key(by_hand, 1) != key
    assert data.content_key(by_hand.replace(noise=0.1), 0) == key


# The rows each recipe gives under its seed: the sums of features and targets, and the last
# target row. A change to the code that makes rows fails here; it must bump data.ROWS_VERSION
# (so cached data and resumed studies stop matching the old rows) and update these figures.
ROWS_OF_VERSION_1 = {
    "crop_yields_builtin": (3366.0, 2523.0, [103.0, 119.0]),
    "line_2x_plus_1": (55.0, 121.0, [21.0]),
    "line_fit_15pts": (90.969, 34.866, [1.3]),
    "relu_line": (41.488, 23.2604, [0.575]),
    "slope_only": (-3.0000004112720493, 9.319817155599594, [-8.749968528747559]),
    "synthetic": (2.795326201442073, -3876.6314628968785, [-0.15753341124533712,
                                                           0.2944629091864272]),
    "noisy line, numpy": (22.5, 34.39298182590769, [7.813857530054018]),
}  # fmt: skip


@pytest.mark.parametrize("name", ROWS_OF_VERSION_1)
def test_rows_are_those_of_their_version(name):
    if name == "noisy line, numpy":
        rows = data.build(LineData(weight=2.0, bias=-1.0, x_range=(0, 5, 0.5), noise=0.3), 7)
    else:
        rows = built(name)
    assert data.ROWS_VERSION == 1
    features_sum, targets_sum, last_targets = ROWS_OF_VERSION_1[name]
    assert rows.features.sum() == pytest.approx(features_sum, rel=1e-12, abs=1e-12)
    assert rows.targets.sum() == pytest.approx(targets_sum, rel=1e-12, abs=1e-12)
    assert rows.targets[-1].tolist() == pytest.approx(last_targets, rel=1e-12)


def test_splits_and_csv_rows_are_those_of_their_version(tmp_path):
    # The split (which rows are held out) and the reading of a CSV decide a study's rows too.
    exp = experiment("synthetic")
    train_set, val_set = data.split(built("synthetic"), exp.val_fraction, exp.seed)
    assert data.ROWS_VERSION == 1 and val_set.n_rows == 400
    assert val_set.targets.sum() == pytest.approx(-775.9540050793987, rel=1e-12)
    assert train_set.features[0, 0] == pytest.approx(-0.6232744625373522, rel=1e-12)
    (tmp_path / "rows.csv").write_bytes(
        b'\xef\xbb\xbf"a", b ,c\r\n"1.5",+2,-3e2\r\n0.25,  4 ,5\r\n\r\n')
    rows = tables.read_table(tmp_path / "rows.csv", ("a", " b "), ("c",))
    assert rows.features.tolist() == [[1.5, 2.0], [0.25, 4.0]]
    assert rows.targets.tolist() == [[-300.0], [5.0]]


def test_content_key_does_not_follow_the_code_beside_the_rows():
    """Editing data.py elsewhere (a message, a check) must not orphan cached data or studies:
    the key names the recipe, the seed and the rows' version, not the module's source."""
    key = data.content_key(experiment("synthetic").data, 0)
    assert key == "09d1b65be8162c32cb3d3d3fb14120e4c189ad672714247c7bf6261046f79b00"


@pytest.mark.parametrize(
    ("name", "override"),
    [
        ("synthetic", "data.n_rows=2001"),
        ("synthetic", "data.noise=0.2"),
        ("slope_only", "data.weight=-2"),
        ("crop_yields_builtin", "data.repeat=2"),
    ],
)
def test_content_key_changes_with_any_recipe_value(name, override):
    before = experiment(name)
    after = config.load(str(EXPERIMENTS / f"{name}.yaml"), [override])
    assert data.content_key(before.data, 0) != data.content_key(after.data, 0)


def test_content_key_of_a_table_ignores_the_seed():
    # A table draws no random numbers, so every seed gives the same rows and may share a cache.
    recipe = experiment("crop_yields_manual").data
    assert data.content_key(recipe, 0) == data.content_key(recipe, 1)


@pytest.mark.parametrize("name", ["slope_only", "synthetic"])
def test_content_key_of_a_random_recipe_depends_on_the_seed(name):
    recipe = experiment(name).data
    assert data.content_key(recipe, 0) != data.content_key(recipe, 1)


def test_content_key_of_a_csv_follows_the_file_content(tmp_path):
    path = write_csv(tmp_path / "table.csv", "a,b\n1,2\n")
    recipe = CsvData(csv=str(path), features=("a",), targets=("b",))
    before = data.content_key(recipe, 0)
    assert data.content_key(recipe, 1) == before
    path.write_text("a,b\n1,3\n")
    assert data.content_key(recipe, 0) != before


def test_content_key_of_a_missing_csv_is_a_data_error(tmp_path):
    recipe = CsvData(csv=str(tmp_path / "gone.csv"), features=("a",), targets=("b",))
    with pytest.raises(DataError, match="no such file"):
        data.content_key(recipe, 0)


def test_line_recipes_differing_only_in_x_get_different_keys():
    first = LineData(weight=1.0, x=(1.0, 2.0))
    second = LineData(weight=1.0, x=(1.0, 3.0))
    assert data.content_key(first, 0) != data.content_key(second, 0)


def test_standard_scaling_uses_the_training_rows_statistics():
    features = np.array([[1.0, 5.0], [3.0, 5.0], [5.0, 5.0], [7.0, 5.0], [9.0, 5.0]])
    dataset = data.Dataset(features, features[:, :1] * 2, ("a", "b"), ("y",))
    train_set, val_set = data.split(dataset, 0.4, seed=0, scale="standard")
    raw_train, raw_val = data.split(dataset, 0.4, seed=0)
    mean, std = raw_train.features.mean(0), raw_train.features.std(0)
    np.testing.assert_allclose(train_set.scaler.mean, mean)
    np.testing.assert_allclose(train_set.scaler.std, [std[0], 1.0])  # constant column: std 1
    np.testing.assert_allclose(train_set.features.mean(0), [0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(train_set.features[:, 0].std(), 1.0)
    np.testing.assert_allclose(val_set.features, (raw_val.features - mean) / [std[0], 1.0])
    np.testing.assert_allclose(train_set.scaler.undo(train_set.features), raw_train.features)
    assert data.split(dataset, 0.4, seed=0)[0].scaler is None


@pytest.mark.parametrize("overrides", [
    ["data.x_range=[]", "data.x=[1,2,.nan]"],
    ["data.x_range=[]", "data.x=[1,.inf]"],
])
def test_inline_data_that_is_not_finite_is_refused(overrides):
    exp = config.load("line_2x_plus_1", overrides)
    with pytest.raises(DataError, match="inf or NaN"):
        data.build(exp.data, exp.seed)


@pytest.mark.parametrize("names, message", [
    ({"feature_names": ("a", "a")}, "data.feature_names lists column a more than once"),
    ({"feature_names": ("a", "b"), "target_names": ("a",)},
     "column a is in both data.feature_names and data.target_names"),
])
def test_a_table_naming_a_column_twice_is_refused(names, message):
    from pipeline.schema import ConfigError

    with pytest.raises(ConfigError, match=message):
        TableData(features=((1.0, 2.0), (2.0, 3.0)), targets=((1.0,), (2.0,)), **names)


@pytest.mark.parametrize("module, suffix", [("gzip", "gz"), ("bz2", "bz2"), ("lzma", "xz")])
def test_a_compressed_csv_cut_short_is_one_clear_error(tmp_path, module, suffix):
    import importlib

    packed = importlib.import_module(module).compress(
        ("x,y\n" + "".join(f"{i},{i}\n" for i in range(50_000))).encode())
    whole, cut = tmp_path / f"whole.csv.{suffix}", tmp_path / f"cut.csv.{suffix}"
    whole.write_bytes(packed)
    cut.write_bytes(packed[:len(packed) // 2])
    assert tables.read_table(whole, ("x",), ("y",)).n_rows == 50_000
    with pytest.raises(DataError, match="cannot be read: the compressed file ends early"):
        tables.read_table(cut, ("x",), ("y",))


def test_a_compressed_csv_pandas_cannot_open_names_the_package(tmp_path):
    import importlib.util

    if importlib.util.find_spec("zstandard") is not None:
        pytest.skip("zstandard is installed: pandas reads .zst files")
    (tmp_path / "rows.csv.zst").write_bytes(b"(\xb5/\xfd")
    with pytest.raises(DataError, match="pandas needs the zstandard package for .zst files"):
        tables.read_frame(tmp_path / "rows.csv.zst")


def test_a_fifo_is_not_a_regular_file(tmp_path):
    os.mkfifo(tmp_path / "rows.csv")
    with pytest.raises(DataError, match="rows.csv: not a regular file"):
        tables.read_frame(tmp_path / "rows.csv")
