"""The `pet-sweep` command: thin click commands over the library.

Each command parses its options, calls the library, and turns a
`PetSweepError` into a one-line message with exit code 2. Heavy modules
(torch, fastai, mlflow, optuna) are imported inside the commands, so
`pet-sweep --help` answers at once.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any, Callable

import click

from pet_sweep.config import DEFAULT_CONFIG, Experiment, load_experiment
from pet_sweep.errors import PetSweepError


class CliError(click.ClickException):
    """A user-facing error: message on stderr, exit code 2."""

    exit_code = 2


def fail_clearly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the library's errors into `CliError` (exit code 2, no traceback)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PetSweepError as err:
            raise CliError(str(err)) from None

    return wrapper


def _quiet_libraries() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*Consider using tensor.detach.*")


config_option = click.option(
    "--config", "config_path", default=DEFAULT_CONFIG, show_default=True,
    type=click.Path(dir_okay=False), help="The experiments file.")


def load(config_path: str, experiment: str | None, **overrides: Any) -> Experiment:
    return load_experiment(config_path, experiment).with_overrides(**overrides)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pet-sweep")
def cli() -> None:
    """Optuna sweeps of fastai fine-tunes (fastbook chapter 5), every trial logged to MLflow.

    Start with `pet-sweep run` (the default experiment of ./experiments.yaml).
    """


@cli.command()
@click.argument("experiment", required=False)
@config_option
@click.option("--n-trials", type=int, help="Trials to add to the study in this run (default: budget.n_trials).")
@click.option("--timeout", type=float, help="Stop starting new trials after this many seconds.")
@click.option("--storage", help="Optuna storage URL (default: the experiment's `storage`).")
@click.option("--tracking-uri", help="MLflow tracking URI (default: the experiment's `tracking.uri`).")
@click.option("--study-name", help="Optuna study name (default: the experiment's name).")
@click.option("--quiet", "-q", is_flag=True, help="Print only failed trials and the final summary.")
@click.option("--verbose", "-v", is_flag=True, help="Also print one line per epoch.")
@fail_clearly
def run(experiment: str | None, config_path: str, n_trials: int | None, timeout: float | None,
        storage: str | None, tracking_uri: str | None, study_name: str | None,
        quiet: bool, verbose: bool) -> None:
    """Run or resume the sweep of EXPERIMENT (default: the file's `default`).

    Running the same command again resumes the same study and adds trials to it.
    In a terminal a status line shows the trials done, the running trial and its
    epoch, the best error rate so far, and the time elapsed and left.
    """
    if quiet and verbose:
        raise CliError("--quiet and --verbose exclude each other; choose one")
    exp = load(config_path, experiment, n_trials=n_trials, timeout=timeout, storage=storage,
               tracking_uri=tracking_uri, study_name=study_name)
    _quiet_libraries()
    from pet_sweep.progress import Progress
    from pet_sweep.study import quiet_optuna, run_sweep
    from pet_sweep.tracking import redact_url

    quiet_optuna()
    budget = exp.config.budget
    where = f" --config {config_path}" if config_path != DEFAULT_CONFIG else ""
    if not quiet:
        click.echo(f"experiment   {exp.name}  ({exp.config_path})")
        click.echo(f"study        {exp.study_name}  (+{budget.n_trials} trials"
                   + (f", timeout {budget.timeout:g}s" if budget.timeout else "") + ")")
        click.echo(f"storage      {redact_url(exp.storage_url)}")
        click.echo(f"MLflow       {redact_url(exp.tracking_uri)}  experiment '{exp.tracking_experiment}'")
    progress = Progress(budget.n_trials, level="quiet" if quiet else "verbose" if verbose else "normal",
                        timeout=budget.timeout, stream=click.get_text_stream("stdout"),
                        err=click.get_text_stream("stderr"))
    try:
        outcome = run_sweep(exp, echo=progress.echo, epoch_listeners=(progress.epoch_done,),
                            trial_listeners=(progress,))
    except KeyboardInterrupt:
        progress.close()
        click.echo(f"\ninterrupted; resume with: pet-sweep run {exp.name}{where}", err=True)
        sys.exit(130)
    progress.close()
    if outcome.best_trial is None:
        click.echo("no trial completed")
        return
    click.echo(f"best         trial {outcome.best_trial}: error_rate {outcome.best_value:.4f}")
    if not quiet:
        click.echo(f"next         pet-sweep report {exp.name}{where}   |   pet-sweep ui {exp.name}{where}")


@cli.command("list")
@config_option
@fail_clearly
def list_(config_path: str) -> None:
    """List the experiments of the file with their studies' state (default marked *).

    Counts trials complete / pruned / failed / running and shows the best error
    rate; reads the storages without creating anything.
    """
    from pet_sweep.browse import format_states, list_studies

    states, default = list_studies(config_path)
    for line in format_states(states, default):
        click.echo(line.rstrip())


def _warn_host(host: str) -> None:
    from pet_sweep.browse import host_warning

    warning = host_warning(host)
    if warning:
        click.echo(warning, err=True)


host_option = click.option("--host", default="127.0.0.1", show_default=True,
                           help="Interface to bind; anything but loopback exposes the UI (no login).")


@cli.command()
@click.argument("experiment", required=False)
@config_option
@click.option("--port", type=click.IntRange(1, 65535), default=5000, show_default=True, help="Port to listen on.")
@host_option
@fail_clearly
def ui(experiment: str | None, config_path: str, port: int, host: str) -> None:
    """Open the MLflow UI on EXPERIMENT's tracking store and print its page's URL.

    The sweep is a parent run `sweep-<study>` with the trials `trial-<n>` nested
    under it. With a remote tracking server (http[s]://), prints that server's
    page for the experiment instead of starting anything. Ctrl-C stops the UI.
    """
    from pet_sweep import browse

    exp = load(config_path, experiment)
    if browse.is_remote(exp.tracking_uri):
        url, note = browse.remote_experiment_url(exp.tracking_uri, exp.tracking_experiment)
        click.echo(f"MLflow experiment '{exp.tracking_experiment}' is on the tracking server")
        click.echo(f"open {browse.redact_url(url)}")
        if note:
            click.echo(f"note: {note}", err=True)
        return
    _warn_host(host)
    experiment_id = browse.mlflow_experiment_id(exp)
    browse.open_ui(f"the MLflow UI on {browse.redact_url(exp.tracking_uri)}",
                   browse.mlflow_command(exp.tracking_uri, host, port), host, port,
                   ready_path="/health", page_path=browse.mlflow_experiment_url("", experiment_id), echo=click.echo)


@cli.command()
@click.argument("experiment", required=False)
@config_option
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True, help="Port to listen on.")
@host_option
@fail_clearly
def dashboard(experiment: str | None, config_path: str, port: int, host: str) -> None:
    """Open optuna-dashboard on EXPERIMENT's study storage and print the study's URL.

    Needs the optional extra: pip install 'pet-sweep[dashboard]'. Ctrl-C stops it.
    """
    from pet_sweep import browse

    exp = load(config_path, experiment)
    executable = browse.dashboard_executable()
    _warn_host(host)
    state = browse.study_state(exp)
    if not state.found:
        raise CliError(f"no study {exp.study_name!r} in {state.storage}"
                       + (f" ({state.note})" if state.note else "") + f"; run `pet-sweep run {exp.name}` first")
    browse.open_ui(f"optuna-dashboard on {state.storage}",
                   browse.dashboard_command(executable, exp.storage_url, host, port), host, port,
                   ready_path="/api/studies", page_path=f"/dashboard/studies/{state.study_id}", echo=click.echo)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
