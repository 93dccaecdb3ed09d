"""Speed and memory of the pipeline's hot paths: `make bench` (results in bench-results/).

Measures, on whatever machine runs it:
- CLI start-up (`pipeline --help`), which must not import torch or mlflow;
- training throughput (rows × epochs per second) of both models, full batch and mini-batch,
  on a synthetic set of --rows rows, and the peak memory of the process;
- the cost of logging a curve to the tracking store: one batch against one call per epoch;
- logging a model with explicit pip requirements.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(func, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        func()
        best = min(best, time.perf_counter() - start)
    return best


def cli_startup() -> dict:
    seconds = timed(lambda: subprocess.run([sys.executable, "-m", "pipeline", "--help"],
                                           check=True, capture_output=True), repeat=3)
    return {"pipeline --help (s)": round(seconds, 3)}


def training(rows: int, epochs: int) -> dict:
    from pipeline import config, data
    from pipeline.train import train

    results = {}
    exp = config.load("synthetic", [f"data.n_rows={rows}", "data.n_features=10",
                                    "val_fraction=0", "lr=0.1"])
    dataset = data.build(exp.data, exp.seed)
    cases = {
        "manual full batch": ["model=manual", "batch_size=null", "shuffle=false"],
        "builtin full batch": ["model=builtin", "batch_size=null", "shuffle=false"],
        "builtin batches of 4096, shuffled": ["model=builtin", "batch_size=4096",
                                             "shuffle=true"],
    }
    for name, overrides in cases.items():
        case = config.load("synthetic", [*overrides, f"epochs={epochs}", "lr=0.1"])
        seconds = timed(lambda case=case: train(case.train, dataset), repeat=2)
        results[f"{name}: rows·epochs/s"] = round(rows * epochs / seconds)
        results[f"{name}: s/epoch"] = round(seconds / epochs, 4)
    results["peak memory (MiB)"] = round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return results


def tracking_costs(epochs: int) -> dict:
    import mlflow
    import numpy as np
    import torch

    from pipeline import data, tracking
    from pipeline.models import LinearRegressor

    results = {}
    with tempfile.TemporaryDirectory() as folder:
        tracking.connect(f"sqlite:///{folder}/bench.db")
        experiment = tracking.experiment_id("bench")
        curve = list(np.linspace(10, 1, epochs))
        with tracking.run(experiment, "batched") as active:
            results[f"log {epochs}-point curve, batched (s)"] = round(
                timed(lambda: tracking.log_curves(active.info.run_id, {"train_loss": curve})), 3)
        with tracking.run(experiment, "per epoch"):
            results[f"log {epochs}-point curve, one call per epoch (s)"] = round(timed(
                lambda: [mlflow.log_metric("train_loss", v, step=i) for i, v in enumerate(curve)]
            ), 3)
        dataset = data.Dataset(np.ones((5, 3)), np.ones((5, 2)), ("a", "b", "c"), ("y", "z"))
        module = LinearRegressor(torch.ones(2, 3), torch.zeros(2))
        with tracking.run(experiment, "model"):
            results["log_model with explicit pip requirements (s)"] = round(timed(
                lambda: tracking.log_model(module, dataset, "float32")
            ), 3)
    return results


def many_trials(rows: int, trials: int = 100, epochs: int = 1000) -> dict:
    """Trials trained together (pipeline.engine) against one at a time, and the full-batch
    sweep from sufficient statistics against one pass over the data."""
    import numpy as np

    from pipeline import config, data, engine
    from pipeline.train import train

    results = {}
    exp = config.load("crop_yields_manual")
    dataset = data.build(exp.data, exp.seed)
    lrs = list(np.geomspace(1e-7, 1e-4, trials))
    counts = [int(c) for c in np.linspace(10, 200, trials)]
    alone = timed(lambda: [train(config.with_train(exp, lr=lr, epochs=n).train, dataset)
                           for lr, n in zip(lrs, counts, strict=True)])
    together = timed(lambda: engine.train_many(exp.train, dataset, None, lrs, counts,
                                               program="loop"), repeat=3)
    results[f"{trials} crop trials one at a time (s)"] = round(alone, 3)
    results[f"{trials} crop trials together, loop (s)"] = round(together, 3)
    results["together / one at a time"] = round(together / alone, 4)

    big = config.load("synthetic", [f"data.n_rows={rows}", "data.n_features=32",
                                    "data.n_targets=1", "val_fraction=0", "batch_size=null"])
    big_data = data.build(big.data, big.seed)
    one_pass = timed(lambda: big_data.features.sum(axis=0), repeat=3)
    sweep = timed(lambda: engine.train_many(big.train, big_data, None,
                                            list(np.geomspace(1e-3, 0.5, trials)),
                                            [epochs] * trials, program="statistics"))
    results[f"one pass over {rows}x32 (s)"] = round(one_pass, 4)
    results[f"{trials} trials x {epochs} epochs from statistics (s)"] = round(sweep, 3)
    results["statistics sweep / one pass"] = round(sweep / one_pass, 2)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--curve", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args()

    results = {"rows": args.rows, "epochs": args.epochs}
    for part in (cli_startup, lambda: training(args.rows, args.epochs),
                 lambda: tracking_costs(args.curve), lambda: many_trials(args.rows)):
        results.update(part())
    width = max(map(len, results))
    for key, value in results.items():
        print(f"{key:<{width}}  {value}")
    args.out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.out / f"bench-{stamp}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
