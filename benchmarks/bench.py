"""Speed and memory of the pipeline's hot paths: `make bench` (results in bench-results/).

Measures, on whatever machine runs it:
- CLI start-up (`pipeline --help`), which must not import torch or mlflow;
- training throughput (rows × epochs per second) of both models, full batch and mini-batch,
  on a synthetic set of --rows rows, and the peak memory of the process;
- a full-batch epoch against the memory roofline (two reads of X at the measured bandwidth),
  one model's (`pipeline train`) and, per trial, a sweep's loop program's;
- `pipeline run` broken down by phase (imports, store, training, model export);
- the cost of logging a curve to the tracking store: one batch against one call per epoch;
- logging a model with explicit pip requirements;
- trials trained together against one at a time, and a sufficient-statistics sweep against one
  pass over the data;
- the project's 100-trial sweep against the naive peer (benchmarks/naive_peer.py), tracked and
  untracked, with and without per-trial models, side by side in one run, and the tracked
  sweep's time split by phase (imports, store, runs, curves, training, plots, champion),
  with its runs written again by MlflowClient alone (the floor of tracking them).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve()


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


def roofline(rows: int, epochs: int) -> dict:
    """A full-batch epoch against the memory roofline: two streaming reads of X (the least an
    epoch of gradient descent reads: once forward, once for the gradient), in the same run."""
    import torch

    from pipeline import config, data, engine
    from pipeline.train import features_tensor, resolve_device, train

    results = {}
    device = resolve_device("auto")
    exp = config.load("synthetic", [f"data.n_rows={rows}", "data.n_features=32",
                                    "data.n_targets=1", "val_fraction=0"])
    dataset = data.build(exp.data, exp.seed)
    x = torch.as_tensor(dataset.features, dtype=torch.float32, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # The fastest of four streaming reads, each the best of ten: a bandwidth, not a kernel's.
    # Stored by column as `pipeline train` stores a tall full batch (train.features_tensor),
    # X is read by its own products faster than by any sum.
    by_column = features_tensor(dataset.features, torch.float32, device, by_column=True)
    v = torch.ones(x.shape[1], 1, dtype=x.dtype, device=device)
    r = torch.ones(x.shape[0], 1, dtype=x.dtype, device=device)
    one_read = min(timed(lambda: (x.sum(), sync()), repeat=10),
                   timed(lambda: (x @ v, sync()), repeat=10),
                   timed(lambda: (by_column @ v, sync()), repeat=10),
                   timed(lambda: (r.T @ by_column, sync()), repeat=10))
    results[f"read {rows}x32 float32 once (s)"] = round(one_read, 4)
    results["memory bandwidth (GB/s)"] = round(x.numel() * 4 / one_read / 1e9, 1)
    # The two matrix-vector products an epoch is made of, as torch's BLAS runs them on the
    # rows as training stores them: the floor for any loop written with torch ops.
    w = torch.ones(1, x.shape[1], dtype=x.dtype, device=device)
    forward = timed(lambda: (by_column @ w.T, sync()), repeat=10)
    gradient = timed(lambda: (r.T @ by_column, sync()), repeat=10)
    results["forward X @ w.T (s)"] = round(forward, 4)
    results["gradient r.T @ X (s)"] = round(gradient, 4)
    results["the two products / roofline"] = round((forward + gradient) / (2 * one_read), 2)
    for model in ("manual", "builtin"):
        case = config.load("synthetic", [
            f"data.n_rows={rows}", "data.n_features=32", "data.n_targets=1", "val_fraction=0",
            f"model={model}", "batch_size=null", "shuffle=false", f"epochs={epochs}", "lr=0.01"])
        # Each epoch timed on its own, from one end of epoch to the next (what does not repeat,
        # the data's copy to the device, left out): the median, and the best as the reads are.
        ends: list[float] = []

        def stamp(*_, ends=ends) -> bool:
            ends.append(time.perf_counter())
            return False

        train(case.train, dataset, on_epoch=stamp)
        lengths = sorted(b - a for a, b in zip(ends, ends[1:], strict=False))
        per_epoch, best = lengths[len(lengths) // 2], lengths[0]
        results[f"{model} full-batch epoch, median of {len(lengths)} (s)"] = round(per_epoch, 4)
        results[f"{model} epoch / roofline"] = round(per_epoch / (2 * one_read), 2)
        results[f"{model} epoch / roofline, best epoch"] = round(best / (2 * one_read), 2)
        results[f"{model} epoch / the two products"] = round(per_epoch / (forward + gradient), 2)
    # engine=statistics: the same descent in closed form, the rows read once for X̃ᵀX̃, X̃ᵀY.
    closed = config.with_train(case, engine="statistics", epochs=1000)
    seconds = timed(lambda: engine.train_many(closed.train, dataset, None, [0.01], [1000]),
                    repeat=2)
    results["pipeline train engine=statistics, 1000 epochs (s)"] = round(seconds, 4)
    results["  the same epochs in the loop, estimated (s)"] = round(1000 * per_epoch, 2)
    results["  / one read of X"] = round(seconds / one_read, 1)
    # A sweep's loop program (ReLU: no closed form) trains K trials in one pass over X per
    # product: an epoch of the batch, per trial, against one model's roofline.
    relu = config.load("synthetic", [
        f"data.n_rows={rows}", "data.n_features=32", "data.n_targets=1", "val_fraction=0",
        "model=manual", "activation=relu", "batch_size=null", "shuffle=false"])
    for count in (1, 8):
        def sweep(epochs, count=count):
            trained = engine.train_many(relu.train, dataset, None, [1e-3] * count,
                                           [epochs] * count, program="loop")
            assert all(t.epochs_run == epochs for t in trained), "a trial stopped early"

        per_epoch = (timed(lambda: sweep(epochs), repeat=2) - timed(lambda: sweep(1), repeat=2)
                     ) / (epochs - 1)
        name = f"sweep loop, {count} trial{'s' * (count > 1)}"
        results[f"{name}: epoch (s)"] = round(per_epoch, 4)
        results[f"{name}: epoch per trial / roofline"] = round(
            per_epoch / count / (2 * one_read), 2)
    return results


def run_phases(experiment: str = "crop_yields_builtin") -> dict:
    """`pipeline run` broken down: imports, store, training, model export, the rest."""
    import numpy as np

    results = {}
    with tempfile.TemporaryDirectory() as folder:
        total = timed(lambda: subprocess.run(
            [sys.executable, "-m", "pipeline", "run", "-e", experiment, "--tracking-uri",
             f"sqlite:///{folder}/run.db"], check=True, capture_output=True, cwd=folder))
        bare = timed(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True),
                     repeat=3)
        imports = timed(lambda: subprocess.run(
            [sys.executable, "-c", "import torch, mlflow, pipeline.workflow"], check=True),
            repeat=2) - bare
        from pipeline import config, data, tracking
        from pipeline.train import train

        def store():
            tracking.connect(f"sqlite:///{folder}/{time.monotonic_ns()}.db")
            return tracking.experiment_id(experiment)

        seconds_store = timed(store)
        exp = config.load(experiment)
        dataset = data.build(exp.data, exp.seed)
        seconds_train = timed(lambda: train(exp.train, dataset), repeat=3)
        model = train(exp.train, dataset).model.to_module()
        with tracking.run(store(), "export") as run_id:
            seconds_model = timed(lambda: tracking.log_model(
                run_id, model, dataset, exp.train.dtype), repeat=2)
    phases = {"imports": imports, "store (fresh sqlite)": seconds_store,
              "training": seconds_train, "model export": seconds_model}
    results[f"pipeline run -e {experiment} (s)"] = round(total, 2)
    for name, seconds in phases.items():
        results[f"  {name} (s)"] = round(seconds, 3)
    results["  the rest: python, three stage runs, dataset, evaluation (s)"] = round(
        total - float(np.sum(list(phases.values()))) - bare, 2)
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
        with tracking.run(experiment, "batched") as run_id:
            results[f"log {epochs}-point curve, batched (s)"] = round(
                timed(lambda: tracking.log_curves(run_id, {"train_loss": curve})), 3)
        with tracking.run(experiment, "per epoch") as run_id:
            results[f"log {epochs}-point curve, one call per epoch (s)"] = round(timed(
                lambda: [mlflow.log_metric("train_loss", v, step=i, run_id=run_id)
                         for i, v in enumerate(curve)]
            ), 3)
        dataset = data.Dataset(np.ones((5, 3)), np.ones((5, 2)), ("a", "b", "c"), ("y", "z"))
        module = LinearRegressor(torch.ones(2, 3), torch.zeros(2))
        with tracking.run(experiment, "model") as run_id:
            results["log_model with explicit pip requirements (s)"] = round(timed(
                lambda: tracking.log_model(run_id, module, dataset, "float32")
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
                                            [epochs] * trials, program="statistics"), repeat=3)
    results[f"one pass over {rows}x32 (s)"] = round(one_pass, 4)
    results[f"{trials} trials x {epochs} epochs from statistics (s)"] = round(sweep, 3)
    results["statistics sweep / one pass"] = round(sweep / one_pass, 2)
    return results


SWEEP_ARGS = ["-e", "crop_yields_builtin", "--lr-range", "1e-7", "1e-4", "--epochs-range",
              "10", "200", "--pruner", "none"]


def untracked_sweep(trials: int) -> None:
    """The project's sweep without MLflow: the same Optuna journal storage, sampler and
    batches of 8 trials trained together, nothing sent to a tracking store; imports made with
    the collector paused, as the command makes them."""
    from pipeline import lifetime

    lifetime.own()
    import optuna
    from optuna.storages.journal import JournalFileBackend

    from pipeline import config, data, engine

    lifetime.settle()

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    exp = config.load("crop_yields_builtin")
    dataset = data.build(exp.data, exp.seed)
    folder = tempfile.mkdtemp()
    storage = optuna.storages.JournalStorage(JournalFileBackend(f"{folder}/untracked.journal"))
    study = optuna.create_study(storage=storage,
                                sampler=optuna.samplers.TPESampler(seed=0, constant_liar=True))
    while len(study.trials) < trials:
        asked = [study.ask() for _ in range(min(8, trials - len(study.trials)))]
        lrs = [t.suggest_float("lr", 1e-7, 1e-4, log=True) for t in asked]
        epochs = [t.suggest_int("epochs", 10, 200) for t in asked]
        for trial, result in zip(asked, engine.train_many(exp.train, dataset, None, lrs, epochs),
                                 strict=True):
            study.tell(trial, result.train_loss[-1])
    lifetime.leave()


class PhaseClock:
    """Exclusive wall time per phase: functions wrapped in place, time spent in a wrapped
    callee counted to the callee's phase only."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._stack: list[float] = []  # time spent in callees, per open call

    def wrap(self, owner, attribute: str, phase: str) -> None:
        original = getattr(owner, attribute)

        def timed_call(*args, **kwargs):
            self._stack.append(0.0)
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                inner = self._stack.pop()
                self.seconds[phase] = self.seconds.get(phase, 0.0) + elapsed - inner
                if self._stack:
                    self._stack[-1] += elapsed

        setattr(owner, attribute, timed_call)


def sweep_phases(trials: int, folder: str) -> None:
    """`pipeline sweep` as the comparison runs it, in this process, with its time split by
    phase; prints the phases as JSON (run as a subprocess by :func:`versus_naive_peer`)."""
    from pipeline import lifetime

    lifetime.own()  # as `pipeline sweep` starts: imports with the collector paused
    start = time.perf_counter()
    clock = PhaseClock()
    import_start = time.perf_counter()
    import optuna  # noqa: F401
    import torch  # noqa: F401
    clock.seconds["import torch, optuna"] = time.perf_counter() - import_start
    import_start = time.perf_counter()
    from mlflow.tracking import MlflowClient

    clock.seconds["import mlflow"] = time.perf_counter() - import_start
    from pipeline import engine, entry, sweep_report, tracking

    clock.wrap(tracking, "connect", "store: open, check, migrate")
    clock.wrap(MlflowClient, "create_run", "runs: create and end")
    clock.wrap(MlflowClient, "set_terminated", "runs: create and end")
    clock.wrap(MlflowClient, "log_batch", "params and curves (log_batch)")
    clock.wrap(engine, "train_many", "training")
    clock.wrap(sweep_report, "log_study", "trials table and plots")
    clock.wrap(sweep_report, "_log_best_model", "champion: retrain, export, log")
    sys.argv = ["pipeline", "sweep", *SWEEP_ARGS, "--n-trials", str(trials), "--tracking-uri",
                f"sqlite:///{folder}/phases.db", "--storage", f"{folder}/phases.journal"]
    try:
        entry.main()
    except SystemExit as done:
        if done.code:
            raise
    total = time.perf_counter() - start
    clock.seconds["Optuna (ask, tell, journal) and the rest"] = total - sum(clock.seconds.values())
    print(json.dumps(clock.seconds))


def mlflow_alone(store: str, folder: str) -> dict:
    """The tracked sweep's trial runs written again by MlflowClient alone, into a fresh store:
    the same runs, tags, params and curve points, three calls per run. The floor for the
    sweep's runs and log_batch phases that any code tracking these trials in MLflow pays."""
    import logging

    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # "Creating initial ... tables"
    source = MlflowClient(store)
    [experiment] = [e for e in source.search_experiments() if e.name != "Default"]
    runs = [run for run in source.search_runs([experiment.experiment_id])
            if "mlflow.parentRunId" in run.data.tags]
    written = []
    for run in runs:
        points = [Metric(key, point.value, point.timestamp, point.step)
                  for key in run.data.metrics
                  for point in source.get_metric_history(run.info.run_id, key)]
        tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")}
        written.append((tags, run.data.params, points))
    client = MlflowClient(f"sqlite:///{folder}/alone.db")
    target = client.create_experiment("alone")
    parent = client.create_run(target).info.run_id
    clock = {"create and end": 0.0, "log_batch": 0.0}
    for tags, params, points in written:
        start = time.perf_counter()
        run_id = client.create_run(target, tags={**tags, "mlflow.parentRunId": parent}).info.run_id
        middle = time.perf_counter()
        client.log_batch(run_id, metrics=points,
                         params=[Param(k, v) for k, v in params.items()])
        end = time.perf_counter()
        client.set_terminated(run_id, "FINISHED")
        clock["create and end"] += middle - start + time.perf_counter() - end
        clock["log_batch"] += end - middle
    count = sum(len(points) for *_, points in written)
    return {f"  MLflow alone, the same {len(written)} runs ({count} points): {phase} (s)":
            round(seconds, 3) for phase, seconds in clock.items()}


def versus_naive_peer(trials: int, model_trials: int) -> dict:
    """Wall time of whole commands, start-up included, side by side in one run."""
    peer = [sys.executable, str(SCRIPT.with_name("naive_peer.py"))]
    ours = [sys.executable, "-m", "pipeline", "sweep", *SWEEP_ARGS]
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        runs = iter(range(1_000))

        def wall(command, name: str, repeat: int = 1) -> float:
            """The best of ``repeat`` runs, each on a fresh store and storage ({n} in
            ``command`` is replaced by a new number every run)."""
            def once():
                n = str(next(runs))
                subprocess.run([part.replace("{n}", n) for part in command], check=True,
                               capture_output=True, cwd=folder)

            seconds = timed(once, repeat=repeat)
            results[f"{name} (s)"] = round(seconds, 2)
            return seconds

        # The sweeps without models run twice each and count their best: a store's commit
        # latency (the peer makes one commit per epoch) varies from run to run on a shared disk.
        store = f"sqlite:///{folder}/peer{{n}}.db"
        peer_tracked = wall([*peer, "--trials", str(trials), "--tracking-uri", store],
                            f"naive peer, {trials} trials, tracked, best of 2", repeat=2)
        peer_untracked = wall([*peer, "--trials", str(trials), "--untracked"],
                              f"naive peer, {trials} trials, untracked, best of 2", repeat=2)
        peer_models = wall([*peer, "--trials", str(model_trials), "--log-models",
                            "--tracking-uri", store],
                           f"naive peer, {model_trials} trials with models")
        ours_tracked = wall([*ours, "--n-trials", str(trials), "--tracking-uri",
                             f"sqlite:///{folder}/ours{{n}}.db", "--storage",
                             f"{folder}/ours{{n}}.journal"],
                            f"pipeline sweep, {trials} trials, tracked, best of 2", repeat=2)
        ours_untracked = wall([sys.executable, str(SCRIPT), "--untracked-sweep", str(trials)],
                              f"pipeline engine, {trials} trials, untracked, best of 2",
                              repeat=2)
        phases = json.loads(subprocess.run(
            [sys.executable, str(SCRIPT), "--sweep-phases", str(trials), folder],
            check=True, capture_output=True, text=True, cwd=folder).stdout.splitlines()[-1])
        floor = mlflow_alone(f"sqlite:///{folder}/phases.db", folder)
        ours_models = wall([*ours, "--n-trials", str(trials), "--log-models", "all",
                            "--tracking-uri", f"sqlite:///{folder}/models.db",
                            "--storage", f"{folder}/models.journal"],
                           f"pipeline sweep, {trials} trials with models")
    # The peer's model logging is too slow to run in full: its per-trial cost, scaled.
    per_model = (peer_models - peer_tracked * model_trials / trials) / model_trials
    peer_models_full = peer_tracked + per_model * trials
    results[f"naive peer, {trials} trials with models, scaled (s)"] = round(peer_models_full, 1)
    results["speed-up over the peer, tracked"] = round(peer_tracked / ours_tracked, 2)
    results["speed-up over the peer, with models"] = round(peer_models_full / ours_models, 2)
    results["ours tracked / untracked"] = round(ours_tracked / ours_untracked, 2)
    results["peer tracked / untracked"] = round(peer_tracked / peer_untracked, 2)
    # Where the tracked sweep's time goes (one more run, timed in-process, start-up left out).
    results[f"pipeline sweep, {trials} trials, by phase (s)"] = round(sum(phases.values()), 2)
    for name, seconds in phases.items():
        results[f"  sweep: {name} (s)"] = round(seconds, 3)
    results.update(floor)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--curve", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--model-trials", type=int, default=5,
                        help="trials of the naive peer that log a model (slow: scaled up)")
    parser.add_argument("--untracked-sweep", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--sweep-phases", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.untracked_sweep is not None:
        untracked_sweep(args.untracked_sweep)
        return
    if args.sweep_phases is not None:
        sweep_phases(int(args.sweep_phases[0]), args.sweep_phases[1])
        return

    results = {"rows": args.rows, "epochs": args.epochs}
    out_folder = args.out.resolve()
    # Runs logged in-process put their artifacts under ./mlruns: a scratch folder, not here.
    with tempfile.TemporaryDirectory() as scratch:
        home = os.getcwd()
        os.chdir(scratch)
        try:
            for part in (cli_startup, lambda: training(args.rows, args.epochs),
                         lambda: roofline(args.rows, 41), run_phases,
                         lambda: tracking_costs(args.curve), lambda: many_trials(args.rows),
                         lambda: versus_naive_peer(args.trials, args.model_trials)):
                results.update(part())
        finally:
            os.chdir(home)
    width = max(map(len, results))
    for key, value in results.items():
        print(f"{key:<{width}}  {value}")
    out_folder.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out_folder / f"bench-{stamp}.json").write_text(json.dumps(results, indent=2))
    table = ["| measure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in results.items())]
    (out_folder / f"bench-{stamp}.md").write_text("\n".join(table) + "\n")
    with open(out_folder / f"bench-{stamp}.csv", "w") as out:
        out.write("measure,value\n" + "".join(f'"{k}",{v}\n' for k, v in results.items()))


if __name__ == "__main__":
    main()
