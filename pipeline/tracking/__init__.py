"""The MLflow layer: the one package that talks to the tracking store.

- :mod:`.store`: reaching a store, creating its tables once, experiments;
- :mod:`.checks`: what is checked before MLflow sees a store, each in one line and seconds;
- :mod:`.runs`: runs by id, opened and always closed, also for processes that died;
- :mod:`.records`: what runs record, in batches (params, curves, metrics, tags, figures), and
  what they hold, read back; system metrics;
- :mod:`.artifacts`: datasets and models logged with runs, and read back.
"""

from pipeline.tracking.artifacts import (  # noqa: F401
    find_cached_dataset,
    log_dataset,
    log_model,
    pip_requirements,
    portable_uri,
    read_dataset,
    runs_frame,
    write_dataset,
)
from pipeline.tracking.records import (  # noqa: F401
    PARAM_CHARS,
    SYSTEM_METRICS_S,
    get_run,
    log_curves,
    log_figure,
    log_metrics,
    log_params,
    log_text,
    log_to_run,
    metric_histories,
    param_text,
    run_experiment,
    run_tags,
    set_tags,
    system_metrics,
)
from pipeline.tracking.runs import (  # noqa: F401
    close_dead_runs,
    close_run,
    close_running,
    environment_tags,
    find_child,
    open_child,
    open_parent,
    record_launched,
    run,
    running_children,
)
from pipeline.tracking.store import (  # noqa: F401
    EXPERIMENT_KIND,
    HEALTH_TIMEOUT_S,
    NOTE,
    SQLITE_HEADER,
    TrackingError,
    check_store,
    connect,
    experiment_id,
    experiment_name,
    filter_value,
    store_error,
    store_lock,
)
