"""The command's process and the garbage collector (pipeline.lifetime): paused while importing,
frozen once the store is connected, collecting as usual after; library users untouched."""

from __future__ import annotations

import gc
import subprocess
import sys

from pipeline import lifetime, tracking
from tests.conftest import subprocess_env

COMMAND_PROCESS = """
import gc, weakref
from pipeline import lifetime, tracking
lifetime.own()
paused = not gc.isenabled()
tracking.connect("sqlite:///{db}")
frozen = gc.get_freeze_count()


class Node:
    pass


a, b = Node(), Node()
a.other, b.other = b, a  # a cycle made after settling: garbage the collector must still find
gone = []
weakref.finalize(a, gone.append, True)
del a, b
gc.collect()
with lifetime.paused():  # a sweep's finalisation: paused, then frozen again
    paused_again = not gc.isenabled()
    import matplotlib.pyplot  # noqa: F401
print(paused, gc.isenabled(), frozen > 100_000, gone == [True], paused_again,
      gc.get_freeze_count() > frozen)
"""


def test_the_command_pauses_then_freezes_then_collects_as_usual(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", COMMAND_PROCESS.format(db=tmp_path / "mlflow.db")],
        capture_output=True, text=True, env=subprocess_env(), timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # Paused while importing; enabled after connecting, with the imports frozen; a cycle made
    # later is collected; late imports paused and frozen too.
    assert result.stdout.split() == ["True"] * 6


def test_a_program_that_imports_the_package_keeps_its_collector(tmp_path):
    before = gc.get_freeze_count()
    tracking.connect(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with lifetime.paused():
        assert gc.isenabled()
    assert gc.isenabled() and gc.get_freeze_count() == before
