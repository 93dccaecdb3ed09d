"""What runs record, by id: params, curves, final metrics and tags in batches, text and
figures, the machine's load while they train; and what they hold, read back.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline import interrupts

PARAM_CHARS = 6000  # what MLflow keeps of a param's value (it cuts longer ones, warning)


def _param_value(value: Any) -> str:
    """A param as the store keeps it: lists as JSON, cut (with "…") where MLflow would cut it,
    so that what a run holds can be compared with a config's value (a long feature list)."""
    text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return text if len(text) <= PARAM_CHARS else text[:PARAM_CHARS - 1] + "…"


@interrupts.shielded
def log_params(run_id: str, params: dict[str, Any]) -> None:
    """Log the flattened config; lists become JSON so the UI shows them as written."""
    log_to_run(run_id, params=params)


def _curve_metrics(curves: dict[str, list[float]], final: dict[str, float] | None = None):
    now = int(time.time() * 1000)
    metrics = [
        Metric(key, float(value), now, step)
        for key, values in curves.items()
        for step, value in enumerate(values)
    ]
    metrics += [Metric(key, float(value), now, 0) for key, value in (final or {}).items()]
    return metrics


CURVE_CHUNK = 10_000  # points a shielded store call writes: a stop waits for one chunk


def log_curves(run_id: str, curves: dict[str, list[float]]) -> None:
    """Whole curves (step = epoch) in calls of :data:`CURVE_CHUNK` points, each kept whole:
    Ctrl-C during a million-point curve stops within a call (0.4 s), not after 40 s."""
    metrics = _curve_metrics(curves)
    for start in range(0, len(metrics), CURVE_CHUNK):
        _log_metrics(run_id, metrics[start:start + CURVE_CHUNK])


@interrupts.shielded
def _log_metrics(run_id: str, metrics: list[Metric]) -> None:
    MlflowClient().log_batch(run_id, metrics=metrics)


@interrupts.shielded
def log_to_run(run_id: str, params: dict[str, Any] | None = None,
               metrics: dict[str, float] | None = None,
               tags: dict[str, str] | None = None,
               curves: dict[str, list[float]] | None = None) -> None:
    """Params, final metrics, tags and whole curves (step = epoch) in one store call per
    1,000 points."""
    MlflowClient().log_batch(
        run_id,
        metrics=_curve_metrics(curves or {}, metrics),
        params=[Param(k, _param_value(v)) for k, v in (params or {}).items()],
        tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
    )


SYSTEM_METRICS_S = 2.0  # how often MLflow's monitor samples and logs the machine's load


@contextlib.contextmanager
def system_metrics(run_id: str) -> Iterator[None]:
    """While the block runs, MLflow's monitor thread logs this machine's CPU, memory, disk,
    network (and GPU, where there is one) to the run as ``system/*`` metrics, one batch every
    :data:`SYSTEM_METRICS_S` seconds (at least once, however short the block), continuing
    the steps of a resumed run."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    # Its failures to log (a server gone) are the sweep's to report, in one line.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)
    monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_S,
                                   resume_logging=True)
    first_step = monitor._logging_step
    monitor.start()
    try:
        yield
    finally:
        if interrupts.requested() is not None and interrupts.store_is_remote():
            # Stopping: the monitor's thread (a daemon) may be retrying a call to a server
            # that is gone, for minutes; it is not waited for.
            monitor._shutdown_event.set()
        else:
            monitor.finish()
            if monitor._logging_step == first_step:  # shorter than one interval: one sample
                monitor.collect_metrics()
                monitor.publish_metrics(monitor.aggregate_metrics())
                monitor.mlflow_logger.flush()


@interrupts.shielded
def metric_histories(run_ids: dict[Any, str], key: str,
                     known: Mapping[str, Sequence[float]] | None = None) -> dict[Any, list[float]]:
    """The ``key`` curve (by step) of each run: from ``known`` (by run id) where it is there,
    else one store call per run."""
    client = MlflowClient()
    curves = {}
    for name, run_id in run_ids.items():
        if known is not None and run_id in known:
            curves[name] = list(known[run_id])
            continue
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        if history:
            curves[name] = [m.value for m in history]
    return curves


@interrupts.shielded
def log_text(run_id: str, text: str, path: str) -> None:
    MlflowClient().log_text(run_id, text, path)


@interrupts.shielded
def log_figure(run_id: str, fig, path: str) -> None:
    """Draw and log ``fig``. Axes over extreme values (an lr range up to 1e308) overflow in
    matplotlib's transforms; the figure is still drawn, without numpy's warnings on screen."""
    import numpy as np

    from pipeline import plots

    with np.errstate(over="ignore", invalid="ignore"), plots.quiet_glyphs():
        MlflowClient().log_figure(run_id, fig, path)
    plots.close(fig)


@interrupts.shielded
def run_tags(run_id: str) -> dict[str, str]:
    return MlflowClient().get_run(run_id).data.tags


@interrupts.shielded
def run_experiment(run_id: str) -> str | None:
    """The experiment of run ``run_id`` (deleted or not), or None where this store lacks it."""
    try:
        return MlflowClient().get_run(run_id).info.experiment_id
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def get_run(run_id: str):
    """A run as MLflow keeps it (``.info``, ``.data.tags``, ``.data.params``): one read."""
    return MlflowClient().get_run(run_id)


def param_text(value: Any) -> str:
    """A value as :func:`log_params` writes it, to compare with what a run holds."""
    return _param_value(value)


def log_metrics(run_id: str, metrics: dict[str, float]) -> None:
    log_to_run(run_id, metrics=metrics)


def set_tags(run_id: str, tags: dict[str, str]) -> None:
    log_to_run(run_id, tags=tags)
