"""Errors a user can cause: each prints as one line and exits non-zero, without a traceback."""

from __future__ import annotations

import click


class UserError(click.ClickException):
    """Bad input or an environment that cannot serve the request; the message says which."""


class DivergedError(UserError):
    """Training produced an infinite or NaN loss; the run is recorded as diverged."""
