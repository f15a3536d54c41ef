"""The `pet-sweep` command: thin click commands over the library.

Each command parses its options, calls the library, and turns a
`PetSweepError` into a one-line message with exit code 2. Heavy modules
(torch, fastai, mlflow, optuna) are imported inside the commands, so
`pet-sweep --help` answers at once.
"""

from __future__ import annotations

import functools
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import click

from pet_sweep.config import DEFAULT_CONFIG, Experiment, load_experiment
from pet_sweep.errors import PetSweepError
from pet_sweep.tracking import redact_url

if TYPE_CHECKING:
    from pet_sweep.sweep.records import SweepResult


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


def _quiet_libraries() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*Consider using tensor.detach.*")


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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pet-sweep")
def cli() -> None:
    """Optuna sweeps of fastai fine-tunes (fastbook chapter 5), every trial logged to MLflow.

    Start with `pet-sweep run` (the default experiment of ./experiments.yaml).
    """


@cli.command()
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
@click.option("--quiet", "-q", is_flag=True, help="Print only failed trials and the final summary.")
@click.option("--verbose", "-v", is_flag=True, help="Also print one line per epoch.")
@fail_clearly
def run(experiment: str | None, config_path: str, n_trials: int | None, timeout: float | None,
        storage: str | None, tracking_uri: str | None, study_name: str | None, workers: int,
        gpus: str | None, quiet: bool, verbose: bool) -> None:
    """Run or resume the sweep of EXPERIMENT (default: the file's `default`).

    Running the same command again resumes the same study and adds trials to it.
    The same command on several machines, with a shared `--storage` database
    (PostgreSQL, MySQL/MariaDB) or journal file, joins one study.
    In a terminal a status line shows the trials done, the running trial and its
    epoch, the best error rate so far, and the time elapsed and left.
    """
    if quiet and verbose:
        raise CliError("--quiet and --verbose exclude each other; choose one")
    exp = load(config_path, experiment, n_trials=n_trials, timeout=timeout, storage=storage,
               tracking_uri=tracking_uri, study_name=study_name)
    _quiet_libraries()
    from pet_sweep import launch  # heavy: optuna, SQLAlchemy, the training stack on demand
    from pet_sweep.progress import Progress  # heavy: optuna (trial records)
    from pet_sweep.sweep.storage import quiet_optuna  # heavy: optuna

    quiet_optuna()
    _sigterm_is_interrupt()
    if not quiet:
        _print_banner(exp, workers)
    progress = Progress(exp.config.budget.n_trials, level="quiet" if quiet else "verbose" if verbose else "normal",
                        timeout=exp.config.budget.timeout, stream=click.get_text_stream("stdout"),
                        err=click.get_text_stream("stderr"))
    result = launch.run(exp, workers=workers, gpus=gpus, progress=progress, echo=click.echo,
                        warn=lambda line: click.echo(line, err=True))
    _print_result(exp, result, _Hints(click.get_current_context(), exp), quiet)


def _trials(n: int) -> str:
    return f"{n} trial" if n == 1 else f"{n} trials"


def _print_banner(exp: Experiment, workers: int) -> None:
    """Where the sweep goes: the experiment, the study and what this run adds, the two stores."""
    budget = exp.config.budget
    click.echo(f"experiment   {exp.name}  ({exp.config_path})")
    click.echo(f"study        {exp.study_name}  (+{_trials(budget.n_trials)}"
               + (f", timeout {budget.timeout:g}s" if budget.timeout else "")
               + (f", {workers} workers" if workers > 1 else "") + ")")
    click.echo(f"storage      {redact_url(exp.storage_url)}{_created(exp.storage_url)}")
    click.echo(f"MLflow       {redact_url(exp.tracking_uri)}  experiment '{exp.tracking_experiment}'"
               f"{_created(exp.tracking_uri)}")


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
        return (" ".join(["pet-sweep report", self.exp.name, *stores]) + "   |   "
                + " ".join(["pet-sweep ui", self.exp.name, *self.flags("tracking_uri")]))

    def resume(self, left: int) -> str:
        """`left`: the trials the budget has left (SweepResult.left); queued retries run free, so 0 runs only them."""
        again = ["pet-sweep run", self.exp.name,
                 *self.flags("storage", "tracking_uri", "study_name", "timeout", "gpus")]
        if self.workers > 1:
            again += ["--workers", str(self.workers)]
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
    _print_best(result.best, hints, quiet)
    if result.stopped_by == "workers":
        click.echo(f"the workers stopped early; resume with: {hints.resume(result.left)}", err=True)
        sys.exit(1)
    if result.stopped_by == "cap" and result.ran < n_trials:
        _print_capped(exp.config.budget.max_trials, result.ran, n_trials)
    elif result.stopped_by == "timeout":
        _print_timeout(exp.config.budget.timeout, result.ran, n_trials, hints.resume(result.left))


def _print_capped(max_trials: int | None, ran: int, n_trials: int) -> None:
    """The study's cap, not this run's trial budget, ended the run."""
    click.echo(f"budget       the study's cap is reached (budget.max_trials {max_trials}, counting trials finished or "
               f"running anywhere): {ran} of {_trials(n_trials)} ran here; raise budget.max_trials to go on")


def _print_timeout(timeout: float | None, ran: int, n_trials: int, command: str) -> None:
    """The time budget, not the trial budget, ended the run: say so, and how to add more."""
    click.echo(f"budget       time budget reached (budget.timeout {timeout:g}s): {ran} of {_trials(n_trials)} ran;"
               f" add more with: {command} (--timeout SECONDS for a longer run)")


def _print_best(best: tuple[float, int] | None, hints: _Hints, quiet: bool) -> None:
    if best is None:
        click.echo("no trial completed")
        return
    click.echo(f"best         trial {best[1]}: error_rate {best[0]:.4f}")
    if not quiet:
        click.echo(f"next         {hints.next_commands()}")


@cli.command(hidden=True)
@click.argument("role")
@click.argument("experiment")
@config_option
@click.option("--n-trials", type=int)
@click.option("--timeout", type=float)
@storage_option
@tracking_option
@click.option("--study-name")
@fail_clearly
def worker(role: str, experiment: str, config_path: str, n_trials: int | None, timeout: float | None,
           storage: str | None, tracking_uri: str | None, study_name: str | None) -> None:
    """One of the workers `pet-sweep run --workers N` starts; ROLE is its place among them.

    It repeats the supervisor's settings (the URLs come in the environment); the
    supervisor prints the banner, the result and the hints. Exit code 130 after Ctrl-C.
    """
    exp = load(config_path, experiment, n_trials=n_trials, timeout=timeout, storage=storage,
               tracking_uri=tracking_uri, study_name=study_name)
    _quiet_libraries()
    from pet_sweep.launch.local import work  # heavy: optuna, the training stack
    from pet_sweep.sweep.storage import quiet_optuna  # heavy: optuna

    quiet_optuna()
    _sigterm_is_interrupt()
    if work(exp, role, echo=click.echo).stopped_by == "interrupt":
        sys.exit(130)


@cli.command("lr-find")
@click.argument("experiment", required=False)
@config_option
@click.option("--arch", "archs", multiple=True, help="Architecture to probe (repeatable; default: every one in the space).")
@click.option("--out", "out_dir", default="lr-find", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the loss-vs-LR plots.")
@click.option("--freeze-epochs", type=int,
              help="Frozen epochs before the unfrozen phase (default: the space's value, or its lower bound).")
@click.option("--num-it", type=click.IntRange(min=30), default=100, show_default=True,
              help="Mock-training steps per phase (fastai's num_it); fewer is faster and coarser.")
@tracking_option
@fail_clearly
def lr_find(experiment: str | None, config_path: str, archs: tuple[str, ...], out_dir: str,
            freeze_epochs: int | None, num_it: int, tracking_uri: str | None) -> None:
    """Run fastai's learning-rate finder for EXPERIMENT, frozen and then unfrozen.

    Prints fastai's four suggestions (minimum, steep, valley, slide) per phase, writes
    each phase's loss-vs-learning-rate plot, and logs a run `lr-find-<arch>` to MLflow.

    \b
    Example:
      pet-sweep lr-find digits --arch resnet18 --out lr-find
    """
    exp = load(config_path, experiment, tracking_uri=tracking_uri)
    _quiet_libraries()
    from pet_sweep.train.lrfind import find_for_experiment
    from pet_sweep.tracking import redact_url

    click.echo(f"experiment   {exp.name}  ({exp.config_path})")
    click.echo(f"MLflow       {redact_url(exp.tracking_uri)}  experiment '{exp.tracking_experiment}'")
    findings = find_for_experiment(exp, out_dir=Path(out_dir), archs=archs, freeze_epochs=freeze_epochs,
                                   num_it=num_it, echo=lambda line: click.echo(line))
    for found in findings:
        click.echo(f"plots        {', '.join(str(p) for p in found.plots)}")
        click.echo(f"MLflow run   lr-find-{found.arch} ({found.run_id})")


@cli.command()
@click.argument("experiment", required=False)
@config_option
@click.option("--arch", "archs", multiple=True,
              help="Architecture to pretrain (repeatable; default: every ResNet in the space).")
@tracking_option
@fail_clearly
def pretrain(experiment: str | None, config_path: str, archs: tuple[str, ...], tracking_uri: str | None) -> None:
    """Train a body from scratch on EXPERIMENT's data, for experiments with `model.pretrained_on: EXPERIMENT`.

    Saves the full model's state dict in pet-sweep's cache (what `model.weights`
    loads) and logs a run `pretrain-<arch>` to MLflow. A checkpoint of the same data,
    architecture, image size, seed and `pretrain` settings is reused, not trained again.

    \b
    Example:
      pet-sweep pretrain digits-source
    """
    exp = load(config_path, experiment, tracking_uri=tracking_uri)
    _quiet_libraries()
    from pet_sweep.train.pretrain import pretrain as pretrain_bodies
    from pet_sweep.tracking import redact_url

    click.echo(f"experiment   {exp.name}  ({exp.config_path})")
    click.echo(f"MLflow       {redact_url(exp.tracking_uri)}  experiment '{exp.tracking_experiment}'")
    for found in pretrain_bodies(exp, archs, echo=lambda line: click.echo(line)):
        click.echo(f"checkpoint   {found.arch}: {found.path}  sha256 {found.sha256[:16]}  "
                   f"(MLflow run pretrain-{found.arch} {found.run_id})")


def _sigterm_is_interrupt() -> None:
    """SIGTERM (a scheduler or `kill`) stops a sweep the way Ctrl-C does: the trial is closed first."""
    import signal

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    # A shell script that starts `pet-sweep run ... &` leaves SIGINT ignored (POSIX, for
    # background jobs), and the workers inherit that: the supervisor's forwarded Ctrl-C
    # would then not stop them. Interrupts always stop a sweep.
    signal.signal(signal.SIGINT, signal.default_int_handler)


@cli.command()
@click.argument("experiment", required=False)
@config_option
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Folder for report.html, report.md and figures/ (default: reports/<study> beside the config).")
@storage_option
@tracking_option
@study_name_option
@click.option("--no-mlflow-attach", is_flag=True, help="Do not attach the report to the sweep's MLflow run.")
@fail_clearly
def report(experiment: str | None, config_path: str, out_dir: str | None, storage: str | None,
           tracking_uri: str | None, study_name: str | None, no_mlflow_attach: bool) -> None:
    """Read the sweep of EXPERIMENT: verdicts, tables, intervals, figures; never trains.

    Works on a finished or a still-running study. Writes a self-contained
    report.html and report.md (with figures/) and attaches them to the sweep's
    parent MLflow run.

    \b
    Example:
      pet-sweep report digits --out reports/digits
    """
    exp = load(config_path, experiment, storage=storage, tracking_uri=tracking_uri, study_name=study_name)
    _quiet_libraries()
    from pet_sweep.report.render import summary_text
    from pet_sweep.report.read import load_report, write_report

    _clean_leftovers([exp])
    bundle = load_report(exp)
    out = Path(out_dir) if out_dir else exp.base_dir / "reports" / exp.study_name
    written = write_report(bundle, out, attach=not no_mlflow_attach)
    click.echo(summary_text(bundle.report))
    click.echo(f"report       {written.out_dir / 'report.html'}  (+ report.md, {len(written.files) - 2} figures)"
               + ("" if no_mlflow_attach else f"; attached to MLflow run {written.parent_run_id}"))


@cli.command()
@click.argument("experiment", required=False)
@config_option
@click.option("-o", "--output", default="best.yaml", show_default=True, type=click.Path(dir_okay=False),
              help="Where to write the standalone config.")
@click.option("--trial", type=int, help="Export this trial number instead of the best completed one.")
@storage_option
@tracking_option
@study_name_option
@fail_clearly
def export(experiment: str | None, config_path: str, output: str, trial: int | None, storage: str | None,
           tracking_uri: str | None, study_name: str | None) -> None:
    """Write the best (or --trial N) trial of EXPERIMENT as a standalone config for `pet-sweep train`.

    \b
    Example:
      pet-sweep export digits -o best.yaml
    """
    exp = load(config_path, experiment, storage=storage, tracking_uri=tracking_uri, study_name=study_name)
    _quiet_libraries()
    from pet_sweep.replay import export_config, write_config

    doc, number = export_config(exp, trial)
    path = write_config(doc, Path(output))
    click.echo(f"trial {number} of study {exp.study_name} -> {path}")
    click.echo(f"next         pet-sweep train {output}   (add --export-model to keep the learner)")


@cli.command()
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.option("--export-model", is_flag=True, help="Save the trained learner (learn.export) as an MLflow artifact.")
@click.option("--tracking-uri", envvar="PET_SWEEP_TRACKING_URI",
              help="MLflow tracking URI (default: the one in CONFIG_FILE, the sweep's; env PET_SWEEP_TRACKING_URI); "
                   "needed where export replaced its password with ***.")
@click.option("--allow-split-change", is_flag=True,
              help="Measure the test split even if it changed since the sweep (labelled 'not held out').")
@fail_clearly
def train(config_file: str, export_model: bool, tracking_uri: str | None, allow_split_change: bool) -> None:
    """Re-run the fine-tune of CONFIG_FILE (written by `pet-sweep export`) once, logged to MLflow.

    Reports the validation error (and whether it reproduces the trial's, within
    its 95 % interval) and the error on the held-out test split, if any. A test split
    that differs from the sweep's (its fingerprint in CONFIG_FILE) is refused.

    \b
    Example:
      pet-sweep train best.yaml --export-model
    """
    _quiet_libraries()
    from pet_sweep.replay import train as replay
    from pet_sweep.report.stats import format_rate

    outcome = replay(config_file, export_model=export_model, tracking_uri=tracking_uri,
                     allow_split_change=allow_split_change, echo=lambda line: click.echo(line))
    click.echo(f"valid error  {format_rate(outcome.valid_error, outcome.n_valid)}"
               + ("" if outcome.reproduced is None else
                  "  reproduces the trial (within its 95% interval)" if outcome.reproduced else
                  "  does NOT reproduce the trial (outside its 95% interval)"))
    # "never seen" only where the fingerprint check proved it (replay.check_test_split)
    held = {True: "held out: never seen by any trial",
            False: "not held out: the test split changed since the sweep",
            None: "held out unverified: no split fingerprint in the config"}[outcome.held_out]
    click.echo("test error   " + (f"{format_rate(outcome.test_error, outcome.n_test)}  ({held})"
                                  if outcome.test_error is not None else "no held-out split (data.test_pct: 0)"))
    click.echo(f"MLflow run   {outcome.run_id}" + (f"; model {outcome.model_artifact}" if outcome.model_artifact else ""))


@cli.command("list")
@config_option
@storage_option
@fail_clearly
def list_(config_path: str, storage: str | None) -> None:
    """List the experiments of the file with their studies' state (the default marked *).

    Counts trials complete / pruned / failed / running and shows the best error
    rate; reads the storages without creating anything.

    \b
    Example:
      pet-sweep list --config ~/pets/experiments.yaml
    """
    from pet_sweep.browse import format_states, list_studies

    states, default = list_studies(config_path, storage)
    for line in format_states(states, default):
        click.echo(line.rstrip())
    _clean_leftovers(load(config_path, state.experiment, storage=storage) for state in states if state.found)


def _clean_leftovers(exps: Any) -> None:
    """What a killed `pet-sweep run` left (its lock file, its MLflow parent run RUNNING): cleaned, in one line."""
    from pet_sweep.sweep.lifecycle import clean_leftovers

    cleaned = clean_leftovers(exps)
    if cleaned:
        click.echo(cleaned)


@cli.command("fail-stale")
@click.argument("experiment", required=False)
@config_option
@click.option("--trial", "number", type=int, help="Fail this RUNNING trial, after a confirmation (the way to free "
                                                  "a trial where there are no heartbeats: journal storage).")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation (scripts).")
@storage_option
@tracking_option
@study_name_option
@fail_clearly
def fail_stale(experiment: str | None, config_path: str, number: int | None, yes: bool, storage: str | None,
               tracking_uri: str | None, study_name: str | None) -> None:
    """Fail the RUNNING trials of EXPERIMENT whose worker is gone: queue them again
    (faults.max_retry) and close their MLflow runs.

    A dead worker's trial holds its place under budget.max_trials until then. With
    heartbeats (SQLite, PostgreSQL, MySQL storages) this fails the trials silent for
    longer than faults.grace_period (Optuna's fail_stale_trials), as a running sweep
    does. Without them (journal storage), name the trial.

    \b
    Example:
      pet-sweep fail-stale digits
      pet-sweep fail-stale digits --storage journal:///shared/optuna.log --trial 7 --yes
    """
    exp = load(config_path, experiment, storage=storage, tracking_uri=tracking_uri, study_name=study_name)
    _quiet_libraries()
    from pet_sweep.sweep.storage import quiet_optuna
    from pet_sweep.sweep.lifecycle import fail_stale as fail

    quiet_optuna()
    # a "no" aborts (exit 1) with nothing changed
    failed = fail(exp, number, confirm=lambda question: yes or click.confirm(question, default=False, abort=True),
                  echo=lambda line: click.echo(line))
    click.echo(f"failed       trial(s) {', '.join(map(str, failed))}" if failed else "failed       no trial")


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
@tracking_option
@fail_clearly
def ui(experiment: str | None, config_path: str, port: int, host: str, tracking_uri: str | None) -> None:
    """Open the MLflow UI on EXPERIMENT's tracking store and print its page's URL.

    The sweep is a parent run `sweep-<study>` with the trials `trial-<n>` nested
    under it. With a remote tracking server (http[s]://), prints that server's
    page for the experiment instead of starting anything. Ctrl-C stops the UI.

    \b
    Example:
      pet-sweep ui digits --port 5001
    """
    from pet_sweep import browse

    exp = load(config_path, experiment, tracking_uri=tracking_uri)
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
@storage_option
@fail_clearly
def dashboard(experiment: str | None, config_path: str, port: int, host: str, storage: str | None) -> None:
    """Open optuna-dashboard on EXPERIMENT's study storage and print the study's URL.

    Needs the optional extra: pip install 'pet-sweep[dashboard]'. Ctrl-C stops it.

    \b
    Example:
      pet-sweep dashboard digits
    """
    from pet_sweep import browse

    exp = load(config_path, experiment, storage=storage)
    browse.require_dashboard()
    _warn_host(host)
    state = browse.study_state(exp)
    if not state.found:
        raise CliError(f"no study {exp.study_name!r} in {state.storage}"
                       + (f" ({state.note})" if state.note else "") + f"; run `pet-sweep run {exp.name}` first")
    browse.open_ui(f"optuna-dashboard on {state.storage}",
                   browse.dashboard_command(exp.storage_url, host, port), host, port,
                   ready_path="/api/studies", page_path=f"/dashboard/studies/{state.study_id}", echo=click.echo)

