"""Whether a generated recipe fits in this machine's memory, checked before anything is
allocated: a recipe that would need more than the memory available is refused in one line,
naming the key that sets its size."""

from __future__ import annotations

import math
import os
from decimal import Decimal
from pathlib import Path

from pipeline.dataset import DataError
from pipeline.recipes import DataConfig, LineData, SyntheticData, TableData

MEMINFO = Path("/proc/meminfo")
# Bytes held at the peak per generated value: the float64 rows, their split, the table written
# as Parquet and its buffers, the training tensors. Measured: `pipeline run` of 5,000,000 and
# 10,000,000 rows x 33 values peaked at 42 and 39 bytes a value.
BYTES_PER_VALUE = 6 * 8


def check_fits(config: DataConfig) -> None:
    """Refuse, before allocating anything, a generated recipe too large for this machine."""
    planned = _planned_shape(config)
    available = available_memory()
    if planned is None or available is None:
        return
    (n, d, k), key = planned
    needed = BYTES_PER_VALUE * (n * (d + k) + k * (d + 1))  # rows, then weights and bias
    if needed > available:
        raise DataError(
            f"{config.source} data of {n} × {d} → {k} needs about {_size(needed)} of memory; "
            f"this machine has {_size(available)} available; lower {key}"
        )


def _planned_shape(config: DataConfig) -> tuple[tuple[int, int, int], str] | None:
    """(rows, features, targets) a recipe will generate, and the key that sets its size."""
    if isinstance(config, SyntheticData):
        shape = (config.n_rows, config.n_features, config.n_targets)
        largest = ("n_rows", "n_features", "n_targets")[shape.index(max(shape))]
        return shape, f"data.{largest}"
    if isinstance(config, TableData):
        rows = config.repeat * len(config.features)
        return (rows, len(config.features[0]), len(config.targets[0])), "data.repeat"
    if isinstance(config, LineData) and config.x_range:
        start, stop, step = config.x_range
        count = (stop - start) / step
        if not math.isfinite(count):  # a span too wide for a float to count
            raise DataError(f"data.x_range {list(config.x_range)} gives too many rows to count")
        return (max(0, math.ceil(count)), 1, 1), "data.x_range"
    return None  # a CSV is as large as its file; listed x values are already in memory


def available_memory() -> int | None:
    """Bytes of memory free for new data: MemAvailable, else physical memory, else unknown."""
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # the kernel writes kB meaning KiB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def _size(count: int) -> str:
    """Bytes in decimal units, one decimal: 9_600_000_000_000 -> ``9.6 TB``."""
    units = ("bytes", "kB", "MB", "GB", "TB", "PB")
    for power, unit in enumerate(units):
        if count < 1000 ** (power + 1):
            return f"{Decimal(count).scaleb(-3 * power):.1f} {unit}"
    return f"{Decimal(count).scaleb(-3 * len(units)):,.1f} EB"
