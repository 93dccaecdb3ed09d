"""The sweep a user would write from the MLflow and Optuna docs: the peer `make bench` measures.

One nested MLflow run per trial opened with ``mlflow.start_run(nested=True)``, ``log_metric``
once per epoch, the tutorial's training loop (``nn.Linear``, ``optim.SGD``, a shuffled
``DataLoader``), ``study.optimize``; with ``--log-models`` every trial's model is logged with
``mlflow.pytorch.log_model`` and its inferred requirements. ``--untracked`` drops every MLflow
call, leaving Optuna and torch.

    python benchmarks/naive_peer.py --trials 100 --tracking-uri sqlite:///naive.db
"""

from __future__ import annotations

import argparse
import time

import optuna
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

FEATURES = [[73, 67, 43], [91, 88, 64], [87, 134, 58], [102, 43, 37], [69, 96, 70]] * 3
TARGETS = [[56, 70], [81, 101], [119, 133], [22, 37], [103, 119]] * 3


def objective(trial: optuna.Trial, tracked: bool, log_models: bool) -> float:
    import mlflow

    lr = trial.suggest_float("lr", 1e-7, 1e-4, log=True)
    epochs = trial.suggest_int("epochs", 10, 200)
    x = torch.tensor(FEATURES, dtype=torch.float32)
    y = torch.tensor(TARGETS, dtype=torch.float32)
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loader = DataLoader(TensorDataset(x, y), batch_size=5, shuffle=True)
    run = mlflow.start_run(nested=True, run_name=f"trial {trial.number}") if tracked else None
    try:
        if tracked:
            mlflow.log_params({"lr": lr, "epochs": epochs})
        for epoch in range(epochs):
            for xb, yb in loader:
                loss = nn.functional.mse_loss(model(xb), yb)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
            with torch.no_grad():
                train_loss = nn.functional.mse_loss(model(x), y).item()
            if tracked:
                mlflow.log_metric("train_loss", train_loss, step=epoch)
        if tracked and log_models:
            import mlflow.pytorch

            mlflow.pytorch.log_model(model, name="model", input_example=x[:5].numpy())
    finally:
        if run is not None:
            mlflow.end_run()
    return train_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--tracking-uri", default="sqlite:///naive.db")
    parser.add_argument("--untracked", action="store_true")
    parser.add_argument("--log-models", action="store_true")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    start = time.perf_counter()
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    run = lambda: study.optimize(  # noqa: E731
        lambda t: objective(t, not args.untracked, args.log_models), n_trials=args.trials)
    if args.untracked:
        run()
    else:
        import mlflow

        mlflow.set_tracking_uri(args.tracking_uri)
        mlflow.set_experiment("naive sweep")
        with mlflow.start_run(run_name="naive sweep"):
            run()
    print(f"{time.perf_counter() - start:.3f}")


if __name__ == "__main__":
    main()
