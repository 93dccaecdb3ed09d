"""The `pipeline` command's process and CPython's cyclic garbage collector.

A command imports torch, MLflow, SQLAlchemy, pandas and Optuna: some 700,000 objects that live
as long as the process. Left alone, the collector walks all of them again and again while they
are imported (a full collection each time the heap grows by a quarter: 1.3 s of a 6.4 s
`pipeline run`), and once more while the interpreter shuts down (1.5-2 s). So the command's
own process (:func:`own`, called by ``pipeline.entry.main``) imports with the collector paused;
:func:`settle`, once the store is connected, moves everything alive into the permanent
generation (``gc.freeze``), which collections skip, and resumes collecting, so what the
command makes from then on is collected as usual, however long it runs. Bounded work that
imports heavily late (a sweep's plots and champion export: matplotlib, scikit-learn through
Optuna's importances, torch.export) runs :func:`paused` the same way. A program that imports
the package is left as it is.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

_owned = False


def own() -> None:
    """This process is the `pipeline` command's: pause collection until :func:`settle`."""
    global _owned
    _owned = True
    gc.disable()


def settle() -> None:
    """The heavy imports are done: exempt what is alive now, and collect the rest as usual."""
    if _owned:
        gc.freeze()
        gc.enable()


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """Bounded work that imports heavy libraries: collection paused, then :func:`settle`."""
    if not _owned or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        settle()


def leave() -> None:
    """On the way out: nothing more to collect, so the interpreter's teardown is quick."""
    if _owned:
        gc.freeze()
