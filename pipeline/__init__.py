"""Tracked, reproducible PyTorch regression experiments.

Stages: ``data`` builds datasets, ``models`` defines the manual and builtin linear models,
``train`` fits them, ``evaluate`` scores them; ``tracking`` records everything in MLflow and
``workflow`` wires the stages to it; ``cli`` is the `pipeline` command.
"""
