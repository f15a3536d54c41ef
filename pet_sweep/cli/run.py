"""`pet-sweep run` and the hidden `pet-sweep worker`: parse, one `launch.run` call, print its result."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

import click

from pet_sweep.cli.common import (
    CliError,
    config_option,
    fail_clearly,
    load,
    sigterm_is_interrupt,
    tracking_option,
)
from pet_sweep.config import DEFAULT_CONFIG, Experiment
from pet_sweep.invocation import command
from pet_sweep.tracking import redact_url
from pet_sweep.tracking_spool import spool_dir
from pet_sweep.train import quiet_fastai_import

if TYPE_CHECKING:
    from pet_sweep.sweep.records import SweepResult


@click.command()
@click.argument("experiment", required=False)
@config_option
@click.option("--n-trials", type=int, help="Trials to add to the study in this run (default: budget.n_trials); "
                                           "0 runs only the trials queued again (retries).")
@click.option("--timeout", type=float, help="Stop starting new trials after this many seconds.")
@click.option("--storage", envvar="PET_SWEEP_STORAGE",
              help="Optuna storage URL (default: the experiment's `storage`; env PET_SWEEP_STORAGE): "
                   "sqlite:///file.db, postgresql://..., mysql+pymysql://..., journal:///shared/optuna.log.")
@tracking_option
@click.option("--study-name", help="Optuna study name (default: the experiment's name).")
@click.option("--workers", type=click.IntRange(1, 256), default=1, show_default=True,
              help="Worker processes sharing the study and the budget (one GPU each where there are GPUs).")
@click.option("--gpus", help="GPUs for the workers, e.g. 0,1 (default: every visible GPU).")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Run the workers as Ray tasks: on the cluster at ADDRESS ('auto' from a node of it, "
                   "ray://head:10001), or with no address on a Ray started here (pip install 'pet-sweep[ray]').")
@click.option("--cpus-per-worker", type=click.FloatRange(min=0, min_open=True),
              help="With Ray: CPUs Ray reserves for each worker (default: launch.cpus_per_worker, 1).")
@click.option("--gpus-per-worker", type=click.FloatRange(min=0),
              help="With Ray: GPUs for each worker; a fraction (0.5) packs small trials on one card "
                   "(default: launch.gpus_per_worker, 0).")
@click.option("--storage-proxy", is_flag=True,
              help="With Ray: the workers reach the study through Optuna's gRPC storage proxy, run by this "
                   "command, instead of the database (its connections stay few; the workers never see its URL).")
@click.option("--quiet", "-q", is_flag=True, help="Print only failed trials and the final summary.")
@click.option("--verbose", "-v", is_flag=True, help="Also print one line per epoch.")
@fail_clearly
def run(experiment: str | None, config_path: str, n_trials: int | None, timeout: float | None,
        storage: str | None, tracking_uri: str | None, study_name: str | None, workers: int,
        gpus: str | None, ray_address: str | None, cpus_per_worker: float | None, gpus_per_worker: float | None,
        storage_proxy: bool, quiet: bool, verbose: bool) -> None:
    """Run or resume the sweep of EXPERIMENT (default: the file's `default`).

    Running the same command again resumes the same study and adds trials to it.
    The same command on several machines, with a shared `--storage` database
    (PostgreSQL, MySQL/MariaDB) or journal file, joins one study; or, from one
    machine, `--workers N --ray ADDRESS` places the workers on a Ray cluster.
    In a terminal a status line shows the trials done, the running trial and its
    epoch, the best error rate so far, and the time elapsed and left.
    """
    if quiet and verbose:
        raise CliError("--quiet and --verbose exclude each other; choose one")
    exp = load(config_path, experiment, n_trials=n_trials, timeout=timeout, storage=storage,
               tracking_uri=tracking_uri, study_name=study_name)
    quiet_fastai_import()
    from pet_sweep import launch  # heavy: optuna, SQLAlchemy, the training stack on demand
    from pet_sweep.progress import Progress  # heavy: optuna (trial records)
    from pet_sweep.sweep.storage import quiet_optuna  # heavy: optuna

    ray = launch.RayOptions.resolve(exp, ray_address, cpus_per_worker, gpus_per_worker, gpus=gpus,
                                    storage_proxy=storage_proxy)  # the options given over `launch:`
    quiet_optuna()
    if not quiet:
        _print_banner(exp, workers, None if ray is None else ray.shown)
    progress = Progress(exp.config.budget.n_trials, level="quiet" if quiet else "verbose" if verbose else "normal",
                        timeout=exp.config.budget.timeout, stream=sys.stdout,
                        err=sys.stderr)
    with sigterm_is_interrupt():
        result = launch.run(exp, workers=workers, gpus=gpus, ray=ray, progress=progress, echo=click.echo,
                            warn=lambda line: click.echo(line, err=True))
    _print_result(exp, result, _Hints(click.get_current_context(), exp), quiet)


def _trials(n: int) -> str:
    return f"{n} trial" if n == 1 else f"{n} trials"


def _print_banner(exp: Experiment, workers: int, ray_address: str | None) -> None:
    """Where the sweep goes: the experiment, the study and what this run adds, the two stores."""
    budget = exp.config.budget
    click.echo(f"experiment   {exp.name}  ({exp.config_path})")
    click.echo(f"study        {exp.study_name}  (+{_trials(budget.n_trials)}"
               + (f", timeout {budget.timeout:g}s" if budget.timeout else "")
               + (f", {workers} workers" if workers > 1 or ray_address else "")
               + ("" if ray_address is None else f" on Ray {'started here' if ray_address == 'local' else ray_address}")
               + ")")
    click.echo(f"storage      {redact_url(exp.storage_url)}{_created(exp.storage_url)}")
    click.echo(f"MLflow       {redact_url(exp.tracking_uri)}  experiment '{exp.tracking_experiment}'"
               f"{_created(exp.tracking_uri)}")
    from pet_sweep.sweep.records import multi_objective_note  # heavy: optuna
    from pet_sweep.sweep.search import sampler_note  # heavy: optuna

    click.echo(f"sampler      {sampler_note(exp)}")
    note = multi_objective_note(exp.config.objectives, exp.config.pruner.name)
    if note:
        click.echo(f"objectives   {note}")
    click.echo(f"selection    {exp.config.selection.budget_text(budget.n_trials)}")
    if budget.stop_when == "converged":
        click.echo(f"stop when    converged: Optuna's Terminator rule (regret bound below the error's noise), checked "
                   f"once {budget.min_trials} searched trials have completed in the study; the baseline and the "
                   "confirmations still run")
    if exp.config.selection.baseline:
        from pet_sweep.sweep.confirm import baseline_text  # heavy: optuna

        click.echo(f"baseline     {baseline_text(exp)}")


def _created(url: str) -> str:
    """A store file that does not exist yet is created (its folder too): a mistyped path shows here."""
    from pet_sweep.sweep.storage import missing_store_file  # heavy: optuna

    new = missing_store_file(url)
    return "" if new is None else f"  (new file{'' if new.parent.is_dir() else ' and folder'})"


class _Hints:
    """The commands `run` suggests at its end. They repeat the options given on its command line
    (not those from the environment: a machine set up with them has them), passwords redacted."""

    def __init__(self, ctx: click.Context, exp: Experiment) -> None:
        self.ctx, self.exp = ctx, exp
        self.workers: int = ctx.params["workers"]

    def flags(self, *names: str) -> list[str]:
        params, source = self.ctx.params, self.ctx.get_parameter_source
        out = ["--config", params["config_path"]] if params["config_path"] != DEFAULT_CONFIG else []
        for name in names:
            value = params[name]
            if value is not None and source(name) != click.core.ParameterSource.ENVIRONMENT:
                shown = f"{value:g}" if isinstance(value, float) else redact_url(str(value))
                out += ["--" + name.replace("_", "-"), shown]
        return out

    def next_commands(self) -> str:
        """`report` and `ui` on the same study: the same stores and study name as this run."""
        stores = self.flags("storage", "tracking_uri", "study_name")
        return (command("report", self.exp.name, *stores) + "   |   "
                + command("ui", self.exp.name, *self.flags("tracking_uri")))

    def resume(self, left: int) -> str:
        """`left`: the trials the budget has left (SweepResult.left); queued retries run free, so 0 runs only them."""
        again = [command("run"), self.exp.name,
                 *self.flags("storage", "tracking_uri", "study_name", "timeout", "gpus")]
        if self.workers > 1:
            again += ["--workers", str(self.workers)]
        ray = self.ctx.params["ray_address"]
        if ray is not None:
            again += ["--ray"] + ([] if ray == "local" else [ray])
            again += [f"--{name.replace('_', '-')}={self.ctx.params[name]:g}" for name in ("cpus_per_worker", "gpus_per_worker")
                      if self.ctx.params[name] is not None]
            again += ["--storage-proxy"] if self.ctx.params["storage_proxy"] else []
        return " ".join([*again, "--n-trials", str(left)])


def _print_result(exp: Experiment, result: SweepResult, hints: _Hints, quiet: bool) -> None:
    """The end of `run`: the best trial, why fewer trials ran than asked, how to go on.
    Exit code 130 after Ctrl-C or SIGTERM, 1 when the workers stopped early."""
    n_trials = exp.config.budget.n_trials
    if result.stopped_by == "interrupt":
        lead = "" if hints.workers > 1 else "\n"  # one process: below the ^C and the status line
        click.echo(f"{lead}interrupted after {result.finished} of {_trials(n_trials)}; "
                   f"resume with: {hints.resume(result.left)}", err=True)
        sys.exit(130)
    _print_best(result.best, hints, quiet, result.best_config)
    if result.stopped_by == "tracking":
        _print_tracking_away(exp, result, hints)
    if result.stopped_by == "workers":
        click.echo(f"the workers stopped early; resume with: {hints.resume(result.left)}", err=True)
        sys.exit(1)
    if result.stopped_by == "converged":
        _print_converged(exp, result, n_trials)
    if result.stopped_by == "cap" and result.ran < n_trials:
        _print_capped(exp.config.budget.max_trials, result.ran, n_trials)
    elif result.stopped_by == "timeout":
        _print_timeout(exp.config.budget.timeout, result.ran, n_trials, hints.resume(result.left))


def _print_tracking_away(exp: Experiment, result: SweepResult, hints: _Hints) -> None:
    """The MLflow server stayed away past tracking.max_outage: stopped between trials, exit code 1."""
    click.echo(f"stopped      the MLflow tracking server {redact_url(exp.tracking_uri)} stayed unreachable past "
               f"tracking.max_outage ({exp.config.tracking.max_outage:g}s), after {result.finished} of "
               f"{_trials(exp.config.budget.n_trials)}; their MLflow records wait in "
               f"{spool_dir(exp.storage_url, exp.tracking_uri)} (sent by the next run or report, or "
               f"`pet-sweep sync {exp.name}`); resume with: {hints.resume(result.left)}", err=True)
    sys.exit(1)


def _print_capped(max_trials: int | None, ran: int, n_trials: int) -> None:
    """The study's cap, not this run's trial budget, ended the run."""
    click.echo(f"budget       the study's cap is reached (budget.max_trials {max_trials}, counting trials finished or "
               f"running anywhere): {ran} of {_trials(n_trials)} ran here; raise budget.max_trials to go on")


def _print_converged(exp: Experiment, result: SweepResult, n_trials: int) -> None:
    """budget.stop_when: converged ended the search with slots left: the rule's verdict, from the study."""
    from pet_sweep.sweep.converge import stored_verdict  # heavy: optuna
    from pet_sweep.sweep.storage import open_study  # heavy: optuna

    verdict = stored_verdict(open_study(exp, create=False))
    click.echo(f"budget       the search {verdict.text() if verdict else 'converged'}; {result.ran} of "
               f"{_trials(n_trials)} ran, {result.left} left unused")


def _print_timeout(timeout: float | None, ran: int, n_trials: int, command: str) -> None:
    """The time budget, not the trial budget, ended the run: say so, and how to add more."""
    click.echo(f"budget       time budget reached (budget.timeout {timeout:g}s): {ran} of {_trials(n_trials)} ran;"
               f" add more with: {command} (--timeout SECONDS for a longer run)")


def _print_best(best: tuple[float, int] | None, hints: _Hints, quiet: bool, best_config: str = "") -> None:
    if best is None:
        click.echo("no trial completed")
        return
    click.echo(f"best         trial {best[1]}: error_rate {best[0]:.4f}")
    if best_config:
        click.echo(f"best config  {best_config}")
    if not quiet:
        click.echo(f"next         {hints.next_commands()}")


@click.command(hidden=True)
@click.argument("role")
@click.argument("experiment")
@fail_clearly
def worker(role: str, experiment: str) -> None:
    """One of the workers `pet-sweep run --workers N` starts; ROLE is its place among them.

    The supervisor's validated experiment (and callbacks) come in the environment
    (EXPERIMENT is its name, for `ps`); the supervisor prints the banner, the result and
    the hints. Exit code 130 after Ctrl-C.
    """
    quiet_fastai_import()
    from pet_sweep.launch.local import EXPERIMENT_ENV, unpack_experiment, work  # heavy: optuna, the training stack
    from pet_sweep.sweep.storage import quiet_optuna  # heavy: optuna

    if EXPERIMENT_ENV not in os.environ:
        raise click.UsageError(f"the worker command is started by `pet-sweep run --workers N` ({EXPERIMENT_ENV} "
                               "is not set)")
    exp, callbacks = unpack_experiment(os.environ[EXPERIMENT_ENV])
    quiet_optuna()
    with sigterm_is_interrupt():
        stopped_by = work(exp, role, echo=click.echo, callbacks=callbacks).stopped_by
    if stopped_by == "interrupt":
        sys.exit(130)
    if stopped_by == "tracking":  # the supervisor says so: the workers stopped early
        sys.exit(1)


