"""The Python API (`import pet_sweep`): what a notebook or a script calls, the commands' library side.

    exp = pet_sweep.Experiment.from_dict({...})       # or Experiment.from_yaml("experiments.yaml", "digits")
    result, study = pet_sweep.run(exp, workers=2)
    analysis = pet_sweep.report(exp)                  # a StudyReport; out_dir= also writes the files
    doc = pet_sweep.export(exp, pick="cheapest")      # the trial as a `pet-sweep train` config

Everything else in the package is internal.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from pet_sweep.config import Experiment

if TYPE_CHECKING:
    import optuna

    from pet_sweep.report.analysis import StudyReport
    from pet_sweep.sweep.records import SweepResult


def run(exp: Experiment, *, workers: int = 1, n_trials: int | None = None, callbacks: Sequence[Any] = (),
        gpus: str | None = None, echo: Any = print) -> tuple["SweepResult", "optuna.Study"]:
    """Run (or resume) `exp`'s sweep, as `pet-sweep run` does; return its result and the Optuna study.

    `callbacks`: epoch listeners (`listener(trial_number, EpochRecord)`) and fastai `Callback`s
    (instances or classes), given to every trial. In this process (`workers=1`) they are the
    objects passed; with `workers > 1` each worker process gets its own pickled copy (so they
    must pickle, and what they record stays in the worker). `echo` gets the lines the CLI prints.
    """
    import optuna  # heavy

    from pet_sweep.launch import local  # heavy: optuna, the training stack
    from pet_sweep.sweep.loop import run_sweep, split_callbacks
    from pet_sweep.sweep.storage import open_study

    if n_trials is not None:
        exp = exp.with_overrides(n_trials=n_trials)
    callbacks = tuple(callbacks)
    # `echo` gets one line per trial: Optuna's own INFO line per trial (a pruned one carries fastai's
    # "Exception occured in ..." wrapping) would say it twice. Its level is the caller's again after.
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(max(verbosity, optuna.logging.WARNING))
    try:
        if workers > 1:
            result = local.supervise(exp, workers, local.parse_gpus(gpus), echo=echo, callbacks=callbacks)
        else:
            listeners, cbs = split_callbacks(callbacks)
            result = run_sweep(exp, echo=echo, epoch_listeners=listeners, fastai_cbs=cbs)
    finally:
        optuna.logging.set_verbosity(verbosity)
    return result, open_study(exp)


def report(exp: Experiment, *, out_dir: str | Path | None = None, attach: bool = False) -> "StudyReport":
    """The analysis of `exp`'s study (the numbers `pet-sweep report` prints). With `out_dir`,
    also write report.html, report.md and the figures there (`attach`: and to the MLflow parent run)."""
    from pet_sweep.report.read import load_report, write_report  # heavy: optuna, matplotlib, mlflow

    bundle = load_report(exp)
    if out_dir is None:
        return bundle.report
    return write_report(bundle, Path(out_dir), attach=attach).report


def export(exp: Experiment, pick: str | int | None = None, *, output: str | Path | None = None) -> dict[str, Any]:
    """One trial of `exp` as a standalone `pet-sweep train` config: `pick` "best" (default),
    "cheapest" (the cheapest within noise of the best) or a trial number. With `output`,
    also write it there (passwords replaced, as `pet-sweep export` does)."""
    from pet_sweep.exported import export_config, write_config  # heavy: optuna

    doc, _number = export_config(exp, pick)
    if output is not None:
        write_config(doc, Path(output))
    return doc


__all__ = ["Experiment", "run", "report", "export"]
