"""After a sweep: `report`, `export`, `train` (replay on the held-out split), `register` (a kept model),
`list`, `fail-stale`."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import click

from pet_sweep.browse import format_states, list_studies
from pet_sweep.cli.common import (
    config_option,
    fail_clearly,
    load,
    storage_option,
    study_name_option,
    tracking_option,
)
from pet_sweep.invocation import command
from pet_sweep.tracking import redact_url, send_spooled
from pet_sweep.tracking_spool import spool_dir
from pet_sweep.train import quiet_fastai_import


@click.command()
@click.argument("experiment", required=False)
@config_option
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Folder for report.html, report.md and figures/ (default: reports/<study> beside the config).")
@storage_option
@tracking_option
@study_name_option
@click.option("--no-mlflow-attach", is_flag=True, help="Do not attach the report to the sweep's MLflow run.")
@click.option("--time-costs", is_flag=True,
              help="First time every model of the study side by side on this machine (interleaved repeats, "
                   "median with its 95% interval; FLOPs and parameters beside) and store that in the study; "
                   "`run` does it at the end of a sweep. It loads torch and takes seconds per model.")
@fail_clearly
def report(experiment: str | None, config_path: str, out_dir: str | None, storage: str | None,
           tracking_uri: str | None, study_name: str | None, no_mlflow_attach: bool, time_costs: bool) -> None:
    """Read the sweep of EXPERIMENT: verdicts, tables, intervals, figures; never trains.

    Works on a finished or a still-running study. Writes a self-contained
    report.html and report.md (with figures/) and attaches them to the sweep's
    parent MLflow run.

    \b
    Example:
      pet-sweep report digits --out reports/digits
    """
    exp = load(config_path, experiment, storage=storage, tracking_uri=tracking_uri, study_name=study_name)
    quiet_fastai_import()
    from pet_sweep.report.read import load_report, write_report  # heavy: optuna, matplotlib, mlflow
    from pet_sweep.report.render import summary_text

    _clean_leftovers([exp])
    if time_costs:
        from pet_sweep.report.read import open_existing_study
        from pet_sweep.train.timing import time_study  # heavy: torch, fastai (this option only)

        time_study(open_existing_study(exp), exp, click.echo)
    bundle = load_report(exp)
    out = Path(out_dir) if out_dir else exp.base_dir / "reports" / exp.study_name
    written = write_report(bundle, out, attach=not no_mlflow_attach)
    click.echo(summary_text(written.report))
    click.echo(f"report       {written.out_dir / 'report.html'}  (+ report.md, {len(written.files) - 2} figures)"
               + ("" if no_mlflow_attach else f"; attached to MLflow run {written.parent_run_id}"))


PICKS = "best, cheapest or trial N"


class PickCommand(click.Command):
    """`export`: `--pick best | cheapest | trial N`. Click options take a fixed number of values,
    so before click parses, `--pick trial N` is joined into the one value `trial:N`
    (`Command.parse_args`, click's public hook; `--pick trial:N` and `--trial N` need nothing)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        joined: list[str] = []
        rest = list(args)
        while rest:
            arg = rest.pop(0)
            if arg == "--":
                joined += [arg, *rest]
                break
            if arg in ("--pick", "--pick=trial") and rest:
                value = "trial" if arg == "--pick=trial" else rest.pop(0)
                if value == "trial" and rest and not rest[0].startswith("-"):
                    value = f"trial:{rest.pop(0)}"
                arg = f"--pick={value}"
            joined.append(arg)
        return super().parse_args(ctx, joined)


def parse_pick(value: str | None, trial: int | None) -> str | int | None:
    """`--pick` as export_config takes it ("best", "cheapest" or a trial number); `--trial N` is `--pick trial N`."""
    if value is None:
        return trial
    if trial is not None:
        raise click.UsageError("give --pick or --trial, not both (--trial N is --pick trial N)")
    word, _, number = value.strip().replace(":", " ", 1).partition(" ")
    if word in ("best", "cheapest") and not number:
        return word
    if word == "trial" and number.strip().isdigit():
        return int(number)
    hint = "`trial` needs the trial's number: --pick trial 7" if word == "trial" else f"expected {PICKS}"
    raise click.BadParameter(f"{value!r}: {hint}", param_hint="'--pick'")


@click.command(cls=PickCommand)
@click.argument("experiment", required=False)
@config_option
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Where to write the standalone config (default: best.yaml, cheapest.yaml with --pick cheapest, "
                   "trial-N.yaml with --pick trial N).")
@click.option("--force", is_flag=True, help="Replace OUTPUT even where it holds another trial's config.")
@click.option("--pick", metavar="best|cheapest|trial N",
              help="Which trial: the lowest error (best, the default), the cheapest trial within noise of it "
                   "(cheapest: the report's recommendation), or trial N.")
@click.option("--trial", type=int, help="Export this trial number (the same as --pick trial N).")
@storage_option
@tracking_option
@study_name_option
@fail_clearly
def export(experiment: str | None, config_path: str, output: str | None, force: bool, pick: str | None,
           trial: int | None, storage: str | None, tracking_uri: str | None, study_name: str | None) -> None:
    """Write one trial of EXPERIMENT (the best, the cheapest within noise of it, or trial N)
    as a standalone config for `pet-sweep train`; the file records which rule picked it and
    what the trial cost. A file holding another trial's config is left alone unless --force.

    \b
    Example:
      pet-sweep export digits                   # best.yaml
      pet-sweep export digits --pick cheapest   # cheapest.yaml
      pet-sweep export digits --pick trial 7 -o seven.yaml
    """
    chosen = parse_pick(pick, trial)
    exp = load(config_path, experiment, storage=storage, tracking_uri=tracking_uri, study_name=study_name)
    quiet_fastai_import()
    from pet_sweep.exported import default_output, export_config, write_config  # heavy: optuna

    doc, number = export_config(exp, chosen)
    output = output or default_output(chosen)
    path = write_config(doc, Path(output), force=force)
    source = doc["source"]
    costs = ", ".join(f"{k} {v:.3g}" for k, v in (source.get("costs") or {}).items()) or "no costs recorded"
    click.echo(f"trial {number} of study {exp.study_name} -> {path}  (picked: {source['picked_by']}; {costs})")
    click.echo(f"next         {command('train', shlex.quote(output))}   (add --export-model to keep the learner)")


@click.command()
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.option("--export-model", is_flag=True, help="Save the trained learner (learn.export) as an MLflow artifact.")
@click.option("--tracking-uri", envvar="PET_SWEEP_TRACKING_URI",
              help="MLflow tracking URI (default: the one in CONFIG_FILE, the sweep's; env PET_SWEEP_TRACKING_URI); "
                   "needed where export replaced its password with ***.")
@click.option("--allow-split-change", is_flag=True,
              help="Measure the test split even if it changed since the sweep (labelled 'not held out').")
@click.option("--register", metavar="NAME",
              help="Also log the learner as an MLflow pyfunc model and register it as a new version of NAME.")
@fail_clearly
def train(config_file: str, export_model: bool, tracking_uri: str | None, allow_split_change: bool,
          register: str | None) -> None:
    """Re-run the fine-tune of CONFIG_FILE (written by `pet-sweep export`) once, logged to MLflow.

    Reports the validation error (and whether it reproduces the trial's, within
    its 95 % interval) and the error on the held-out test split, if any. A test split
    that differs from the sweep's (its fingerprint in CONFIG_FILE) is refused.

    \b
    Example:
      pet-sweep train best.yaml --export-model
      pet-sweep train best.yaml --register digits-best   # then: pet-sweep serve digits-best
    """
    quiet_fastai_import()
    from pet_sweep.progress import Progress, shows_status_line  # heavy: optuna (trial records)
    from pet_sweep.replay import train as replay  # heavy: optuna; the training stack on demand
    from pet_sweep.report.stats import format_rate

    # as `run` shows a sweep: a status line in a terminal, else a line per epoch (a replay has few)
    stdout = sys.stdout
    progress = Progress(1, level="normal" if shows_status_line(stdout) else "verbose", stream=stdout,
                        err=sys.stderr)
    outcome = replay(config_file, export_model=export_model, tracking_uri=tracking_uri,
                     allow_split_change=allow_split_change, register=register, echo=progress.echo,
                     progress=progress)
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
    if outcome.registered is not None:
        click.echo(f"registered   {register} version {outcome.registered}: "
                   f"{command('serve', shlex.quote(register), '--version', str(outcome.registered))}")


@click.command(cls=PickCommand)
@click.argument("experiment")
@click.argument("name")
@config_option
@click.option("--pick", metavar="best|cheapest|trial N",
              help="Which trial's kept model: the lowest error (best, the default), the report's "
                   "recommendation (cheapest), or trial N.")
@storage_option
@tracking_option
@study_name_option
@fail_clearly
def register(experiment: str, name: str, config_path: str, pick: str | None, storage: str | None,
             tracking_uri: str | None, study_name: str | None) -> None:
    """Register the model the sweep kept of one trial of EXPERIMENT as a new version of NAME in
    MLflow's Model Registry, with no training (a sweep keeps the best trial's and the
    recommended one's learners: `keep_winner`). Where it kept none, train it once instead:
    `pet-sweep train best.yaml --register NAME`.

    \b
    Example:
      pet-sweep register digits digits-best                   # then: pet-sweep serve digits-best
      pet-sweep register digits --pick cheapest digits-small
    """
    chosen = parse_pick(pick, None)
    exp = load(config_path, experiment, storage=storage, tracking_uri=tracking_uri, study_name=study_name)
    quiet_fastai_import()
    from pet_sweep.sweep.keep import register_kept  # heavy: optuna, mlflow

    version, number = register_kept(exp, chosen, name)
    click.echo(f"registered   {name} version {version}: the kept model of trial {number} of study "
               f"{exp.study_name}, nothing trained: {command('serve', shlex.quote(name), '--version', str(version))}")


@click.command("list")
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
    states, default = list_studies(config_path, storage)
    for line in format_states(states, default):
        click.echo(line.rstrip())
    _clean_leftovers(load(config_path, state.experiment, storage=storage) for state in states if state.found)


def _clean_leftovers(exps: Any) -> None:
    """What a killed `pet-sweep run` left (its lock file, its MLflow parent run RUNNING): cleaned, in one line."""
    from pet_sweep.sweep.lifecycle import clean_leftovers  # heavy: optuna

    cleaned = clean_leftovers(exps)
    if cleaned:
        click.echo(cleaned)


@click.command("fail-stale")
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
    quiet_fastai_import()
    from pet_sweep.sweep.lifecycle import fail_stale as fail  # heavy: optuna
    from pet_sweep.sweep.storage import quiet_optuna

    quiet_optuna()
    # a "no" aborts (exit 1) with nothing changed
    failed = fail(exp, number, confirm=lambda question: yes or click.confirm(question, default=False, abort=True),
                  echo=lambda line: click.echo(line))
    click.echo(f"failed       trial(s) {', '.join(map(str, failed))}" if failed else "failed       no trial")


@click.command()
@click.argument("experiment", required=False)
@config_option
@storage_option
@tracking_option
@fail_clearly
def sync(experiment: str | None, config_path: str, storage: str | None, tracking_uri: str | None) -> None:
    """Send to the MLflow server the runs a sweep of EXPERIMENT kept on disk while the server was away.

    A sweep goes on while its tracking server is unreachable (up to tracking.max_outage)
    and keeps its trials' metrics, params, tags and artifacts in a spool folder beside
    the Optuna storage; it sends them itself when the server answers again, and so do
    the next `run` and `report`. Exit code 1 if some stay (a sweep still writes them).
    """
    exp = load(config_path, experiment, storage=storage, tracking_uri=tracking_uri)
    folder = spool_dir(exp.storage_url, exp.tracking_uri)
    sent, busy = send_spooled(exp.tracking_uri, folder)
    click.echo(f"sent         {sent} write(s) kept in {folder} to {redact_url(exp.tracking_uri)}")
    if busy:
        click.echo(f"kept         {busy} spool file(s) a running sweep still writes: it sends them itself", err=True)
        raise SystemExit(1)

