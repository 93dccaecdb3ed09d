"""The process a `pipeline` command runs in: SIGTERM stops it as Ctrl-C does, every error
is one line (and, under `mlflow run`, a note on the run it opened), and a reader may leave its
standard output without failing the work.
"""

from __future__ import annotations

import signal
import sys

import click

from pipeline import redact
from pipeline.cli import cli


def _note_on_launched_run(err: click.ClickException) -> None:
    """Under `mlflow run`, a command refused before it opened a run leaves the run `mlflow run`
    opened FAILED and empty: say why there (not where the store is what failed)."""
    import os

    if "MLFLOW_RUN_ID" in os.environ and type(err).__name__ != "TrackingError":
        from pipeline.tracking.runs import note_on_launched_run

        note_on_launched_run(f"Refused: {redact.mask(err.format_message())}")


class _Stdout:
    """Standard output that a reader may leave (`pipeline run | head -1`): the command's work
    goes on, its lines going nowhere, instead of a BrokenPipeError failing the run it was
    reporting on."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._left()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._left()

    def _left(self) -> None:
        import os

        # What is still buffered, and anything printed later, goes to /dev/null (the exit's
        # own flush too).
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, self._stream.fileno())
        os.close(null)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def main() -> None:
    from pipeline import lifetime

    lifetime.own()
    sys.stdout = _Stdout(sys.stdout)
    try:
        _main()
    finally:
        lifetime.leave()


def _main() -> None:
    from pipeline import interrupts

    # SIGTERM (a process manager, `kill`) stops any command as Ctrl-C does: runs are closed.
    interrupts.immediate()
    try:
        returned = cli.main(prog_name="pipeline", standalone_mode=False)
    except click.UsageError as err:
        # One line, where Click would print the usage, a hint and the error on four.
        command = err.ctx.command_path if err.ctx is not None else "pipeline"
        if command == "pipeline":  # an option's missing value is raised with no command
            first = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), None)
            command += f" {first}" if first in cli.commands else ""
        click.echo(f"Error: {redact.mask(err.format_message())} "
                   f"(see `{command} --help`)", err=True)
        _note_on_launched_run(err)
        sys.exit(err.exit_code)
    except click.ClickException as err:
        err.show()
        _note_on_launched_run(err)
        sys.exit(err.exit_code)
    except click.Abort:  # Ctrl-C while Click itself was parsing or prompting
        click.echo("interrupted", err=True)
        sys.exit(128 + signal.SIGINT)
    sys.exit(returned if isinstance(returned, int) else 0)
