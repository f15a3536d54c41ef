"""What every command shares: the error turned into exit code 2, the common options,
loading an experiment with the command line's overrides, SIGTERM as Ctrl-C."""

from __future__ import annotations

import functools
import signal
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import click

from pet_sweep.config import DEFAULT_CONFIG, Experiment, load_experiment
from pet_sweep.errors import PetSweepError, Preempted


class CliError(click.ClickException):
    """A user-facing error: message on stderr, exit code 2."""

    exit_code = 2


def fail_clearly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the library's errors into `CliError` (exit code 2, no traceback)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PetSweepError as err:
            raise CliError(str(err)) from None

    return wrapper


config_option = click.option(
    "--config", "config_path", default=DEFAULT_CONFIG, show_default=True,
    type=click.Path(dir_okay=False), help="The experiments file.")
# Every command reads the same stores: a machine set up with the two variables (see the
# README's "Scale out") reports, exports and browses the shared study as it runs it.
storage_option = click.option(
    "--storage", envvar="PET_SWEEP_STORAGE",
    help="Optuna storage URL (default: the experiment's `storage`; env PET_SWEEP_STORAGE).")
tracking_option = click.option(
    "--tracking-uri", envvar="PET_SWEEP_TRACKING_URI",
    help="MLflow tracking URI (default: the experiment's `tracking.uri`; env PET_SWEEP_TRACKING_URI).")
study_name_option = click.option("--study-name", help="Optuna study name (default: the experiment's name).")


def load(config_path: str, experiment: str | None, **overrides: Any) -> Experiment:
    return load_experiment(config_path, experiment).with_overrides(**overrides)


@contextmanager
def sigterm_is_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler, a spot machine's reclaim, `kill`) stops a sweep the way Ctrl-C does,
    the trial closed first, but as `Preempted`: its trial is queued to resume from its checkpoint.
    Raised once: a second SIGTERM (sent to every process of a node, then forwarded) would
    interrupt the closing. The handlers before are back on leaving (a command run in-process,
    by a test or a notebook, leaves no handler behind for the processes it forks later)."""
    def interrupt(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Preempted

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, interrupt)
    # A shell script that starts `pet-sweep run ... &` leaves SIGINT ignored (POSIX, for
    # background jobs), and the workers inherit that: the supervisor's forwarded Ctrl-C
    # would then not stop them. Interrupts always stop a sweep.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
