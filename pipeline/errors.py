"""Errors a user can cause: each prints as one line and exits non-zero, without a traceback."""

from __future__ import annotations

import click


class UserError(click.ClickException):
    """Bad input or an environment that cannot serve the request; the message says which."""


class DivergedError(UserError):
    """Training produced an infinite or NaN loss; the run is recorded as diverged."""


def first_line(err: BaseException) -> str:
    """The first line of an error's message (MLflow's ``.message`` where it has one), which is
    all a user needs to read; the error's type name when the message is empty."""
    message = str(getattr(err, "message", None) or err).strip()
    # SQLAlchemy opens some messages with a line on its autoflush, the cause on the next.
    lines = [line for line in message.splitlines()
             if line.strip() and not line.startswith("(raised as a result of ")]
    return lines[0] if lines else type(err).__name__
