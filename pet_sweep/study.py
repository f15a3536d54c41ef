"""Optuna studies: storage, sampler, pruner, the objective, and the sweep loop.

Data flow of one sweep process: open the study (created or resumed by name) ->
open the MLflow parent run -> build the DataLoaders once -> for each trial:
`space.suggest` -> child MLflow run -> `recipe.fine_tune` with the epoch
listeners (MLflow, Optuna pruning) -> result back to Optuna.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from pet_sweep.callbacks import EpochRecord
from pet_sweep.config import Experiment
from pet_sweep.errors import StudyError, TrainingDiverged, TrialFailed
from pet_sweep.space import TrialParams, suggest
from pet_sweep.tracking import PARENT_RUN_ATTR, RUN_ID_ATTR, Tracker, redact_url

# Trial user attributes pet-sweep writes (the report reads them back).
PARAMS_ATTR = "params"            # the full TrialParams, fixed values included
HISTORY_ATTR = "history"          # per-epoch records, global epoch numbering
PRECISION_ATTR = "precision"      # what really ran
PREDS_ATTR = "valid_preds"        # predicted class per validation item (last epoch)
TARGETS_ATTR = "valid_targets"
REASON_ATTR = "reason"            # why a trial was pruned or failed

HEARTBEAT_INTERVAL = 30  # seconds between a running trial's heartbeats (RDB storages)
GRACE_PERIOD = 120       # a trial silent this long is stale: failed and retried


def make_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna RDB storage with heartbeats: a killed worker's trial is failed and retried."""
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    try:
        return optuna.storages.RDBStorage(
            url, heartbeat_interval=HEARTBEAT_INTERVAL, grace_period=GRACE_PERIOD,
            failed_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3),
            engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None)
    except Exception as err:  # SQLAlchemy/driver errors: bad URL, server down, missing driver
        raise StudyError(f"cannot open the Optuna storage {redact_url(url)}: "
                         f"{type(err).__name__}: {str(err).splitlines()[0][:300]}") from None


def make_sampler(exp: Experiment) -> optuna.samplers.BaseSampler:
    cfg = exp.config.sampler
    if cfg.name == "random":
        return optuna.samplers.RandomSampler(seed=cfg.seed)
    return optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=cfg.n_startup_trials)


def make_pruner(exp: Experiment) -> optuna.pruners.BasePruner:
    cfg = exp.config.pruner
    if cfg.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.n_startup_trials, n_warmup_steps=cfg.n_warmup_steps)
    if cfg.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=cfg.min_resource, reduction_factor=cfg.reduction_factor)
    return optuna.pruners.NopPruner()


def open_study(exp: Experiment, *, create: bool = True) -> optuna.Study:
    """Create the experiment's study, or load it to resume (same name = same study)."""
    storage = make_storage(exp.storage_url)
    if not create:
        try:
            return optuna.load_study(study_name=exp.study_name, storage=storage,
                                     sampler=make_sampler(exp), pruner=make_pruner(exp))
        except KeyError:
            raise StudyError(f"no study named {exp.study_name!r} in {redact_url(exp.storage_url)}; "
                             f"run `pet-sweep run {exp.name}` first") from None
    study = optuna.create_study(study_name=exp.study_name, storage=storage, sampler=make_sampler(exp),
                                pruner=make_pruner(exp), direction="minimize", load_if_exists=True)
    if "experiment" not in study.user_attrs:
        study.set_user_attr("experiment", exp.name)
        study.set_user_attr("metric", "error_rate")
    return study


def sweep_settings(exp: Experiment) -> dict[str, Any]:
    """The study's settings, as the parent MLflow run's params (passwords hidden)."""
    cfg = exp.config
    return {
        "experiment": exp.name, "study_name": exp.study_name, "storage": redact_url(exp.storage_url),
        "data": cfg.data.source, "valid_pct": cfg.data.valid_pct, "test_pct": cfg.data.test_pct,
        "img_size": cfg.model.img_size, "batch_size": cfg.model.batch_size,
        "pretrained": cfg.model.pretrained, "precision_requested": cfg.model.precision,
        "sampler": cfg.sampler.name, "sampler_seed": cfg.sampler.seed, "pruner": cfg.pruner.name,
        "n_trials": cfg.budget.n_trials, "timeout": cfg.budget.timeout, "seed": cfg.seed,
        "sweep": cfg.sweep if isinstance(cfg.sweep, str) else "inline",
    }


def trial_config(exp: Experiment, params: TrialParams) -> dict[str, Any]:
    """A trial's complete configuration (what `export` writes and `train` replays)."""
    cfg = exp.config
    return {
        "experiment": exp.name,
        "data": cfg.data.model_dump(exclude_none=True),
        "model": cfg.model.model_dump(exclude_none=True),
        "params": params.as_dict(),
        "seed": cfg.seed,
    }


def history_from_attrs(trial: FrozenTrial) -> list[EpochRecord]:
    return [EpochRecord(**r) for r in trial.user_attrs.get(HISTORY_ATTR, [])]


@dataclass
class TrialOutcome:
    number: int
    state: str
    value: float | None
    params: dict[str, Any]
    seconds: float
    reason: str = ""


@dataclass
class SweepOutcome:
    study_name: str
    parent_run_id: str
    trials: list[TrialOutcome] = field(default_factory=list)
    best_value: float | None = None
    best_trial: int | None = None


class TrialListener(Protocol):
    """Told when a trial starts and ends (the progress display of `pet-sweep run`)."""

    def trial_started(self, number: int, params: dict[str, Any]) -> None: ...

    def trial_finished(self, outcome: TrialOutcome, best: tuple[float, int] | None) -> None: ...


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


class Objective:
    """One trial: suggest -> child run -> fine-tune -> report back; never leaves a run RUNNING."""

    def __init__(self, exp: Experiment, data: Any, tracker: Tracker, parent_run_id: str,
                 listeners: tuple[Callable[[int, EpochRecord], None], ...] = (),
                 trial_listeners: tuple[TrialListener, ...] = ()) -> None:
        self.exp, self.data, self.tracker, self.parent_run_id = exp, data, tracker, parent_run_id
        self.listeners, self.trial_listeners = listeners, trial_listeners

    def __call__(self, trial: optuna.Trial) -> float:
        from pet_sweep import recipe

        exp, model = self.exp, self.exp.config.model
        params = suggest(exp.space, trial)
        precision = recipe.precision_for(model.precision, self.data.dls.device)
        trial.set_user_attr(PARAMS_ATTR, params.as_dict())
        trial.set_user_attr(PRECISION_ATTR, precision)
        run_id = self.tracker.start_trial(
            self.parent_run_id, exp.study_name, trial.number,
            {**params.as_dict(), "precision": precision, "img_size": model.img_size,
             "batch_size": model.batch_size, "pretrained": model.pretrained, "seed": exp.config.seed,
             "device": str(self.data.dls.device)},
            tags={"arch": params.arch})
        trial.set_user_attr(RUN_ID_ATTR, run_id)
        for listener in self.trial_listeners:
            listener.trial_started(trial.number, params.as_dict())
        history: list[EpochRecord] = []

        def report(record: EpochRecord) -> None:
            history.append(record)
            trial.set_user_attr(HISTORY_ATTR, [vars(r) for r in history])
            for listener in self.listeners:
                listener(trial.number, record)
            trial.report(record.error_rate, step=record.epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {record.epoch} with error_rate {record.error_rate:.4f}")

        def close(state: str, reason: str = "", metrics: dict[str, float] | None = None) -> None:
            if reason:
                trial.set_user_attr(REASON_ATTR, reason)
            with tempfile.TemporaryDirectory() as tmp:
                artifacts = self._artifacts(Path(tmp), params, history, trial.number)
                self.tracker.finish_trial(run_id, state, metrics or {},
                                          {"reason": reason} if reason else {}, artifacts)

        started = time.perf_counter()
        try:
            result = recipe.fine_tune(self.data.dls, params, model, seed=exp.config.seed,
                                      listeners=[self.tracker.epoch_logger(run_id), report])
        except optuna.TrialPruned as err:
            close("PRUNED", str(err))
            raise
        except TrainingDiverged as err:
            close("PRUNED", str(err))
            raise optuna.TrialPruned(str(err)) from None
        except TrialFailed as err:
            close("FAIL", str(err))
            raise
        except BaseException as err:  # interrupts and bugs: close the run, then let them stop the sweep
            close("FAIL", f"{type(err).__name__}: {err}" if str(err) else type(err).__name__)
            raise
        trial.set_user_attr(PREDS_ATTR, result.valid_preds)
        trial.set_user_attr(TARGETS_ATTR, result.valid_targets)
        close("COMPLETE", metrics={"final_error_rate": result.error_rate,
                                   "best_error_rate": min(r.error_rate for r in result.history),
                                   "duration_s": time.perf_counter() - started})
        return result.error_rate

    def _artifacts(self, folder: Path, params: TrialParams, history: list[EpochRecord], number: int) -> list[Path]:
        from pet_sweep.plots import loss_curve

        config = folder / "trial_config.yaml"
        config.write_text(yaml.safe_dump(trial_config(self.exp, params), sort_keys=False))
        paths = [config]
        if history:
            paths.append(loss_curve(history, folder / "loss_curve.png",
                                    f"trial {number}: {params.arch}, error rate {history[-1].error_rate:.4f}"))
        return paths


def describe_trial(trial: FrozenTrial) -> TrialOutcome:
    seconds = ((trial.datetime_complete - trial.datetime_start).total_seconds()
               if trial.datetime_complete and trial.datetime_start else 0.0)
    params = trial.user_attrs.get(PARAMS_ATTR) or dict(trial.params)
    value = trial.value if trial.state == TrialState.COMPLETE else (
        trial.intermediate_values[max(trial.intermediate_values)] if trial.intermediate_values else None)
    return TrialOutcome(trial.number, trial.state.name, value, params, seconds,
                        str(trial.user_attrs.get(REASON_ATTR, "")))


def format_trial(outcome: TrialOutcome, best: tuple[float, int] | None) -> str:
    p = outcome.params
    shown = (f"arch={p.get('arch')} base_lr={p.get('base_lr', 0):.2e} lr=slice({p.get('lr_lo', 0):.2e}, "
             f"{p.get('lr_hi', 0):.2e}) freeze_epochs={p.get('freeze_epochs')} epochs={p.get('epochs')}")
    value = f"error_rate={outcome.value:.4f}" if outcome.value is not None else "error_rate=-"
    line = f"trial {outcome.number:>3} {outcome.state:<8} {value}  {shown}  ({outcome.seconds:.1f}s)"
    if best:
        line += f"  best={best[0]:.4f} (trial {best[1]})"
    if outcome.reason and outcome.state != "COMPLETE":
        line += f"\n            reason: {outcome.reason}"
    return line


def best_of(study: optuna.Study) -> tuple[float, int] | None:
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    if not done:
        return None
    top = min(done, key=lambda t: t.value)
    return float(top.value), top.number


def run_sweep(exp: Experiment, *, echo: Callable[[str], None] = print,
              epoch_listeners: tuple[Callable[[int, EpochRecord], None], ...] = (),
              trial_listeners: tuple[TrialListener, ...] = ()) -> SweepOutcome:
    """Run (or resume) the experiment's study in this process: `budget.n_trials` more trials."""
    from pet_sweep.data import build_data

    data = build_data(exp)  # first: a missing data folder must not leave a study or run behind
    study = open_study(exp)
    tracker = Tracker(exp.tracking_uri, exp.tracking_experiment)
    parent = tracker.sweep_run(exp.study_name, sweep_settings(exp), study.user_attrs.get(PARENT_RUN_ATTR))
    if study.user_attrs.get(PARENT_RUN_ATTR) != parent:
        study.set_user_attr(PARENT_RUN_ATTR, parent)
        study.set_user_attr("mlflow_experiment_id", tracker.experiment_id)
        study.set_user_attr("mlflow_tracking_uri", redact_url(exp.tracking_uri))
    outcome = SweepOutcome(exp.study_name, parent)

    def after_trial(study: optuna.Study, trial: FrozenTrial) -> None:
        done = describe_trial(trial)
        outcome.trials.append(done)
        best = best_of(study)
        echo(format_trial(done, best))
        for listener in trial_listeners:
            listener.trial_finished(done, best)
        counts = {s.name.lower(): 0 for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
        for t in study.get_trials(deepcopy=False):
            if t.state.name.lower() in counts:
                counts[t.state.name.lower()] += 1
        metrics = {f"n_{k}": float(v) for k, v in counts.items()}
        tags = {}
        if best:
            metrics.update(best_error_rate=best[0], best_trial=float(best[1]))
            tags["best_trial"] = str(best[1])
        tracker.update_sweep(parent, metrics, tags)

    callbacks: list[Callable[[optuna.Study, FrozenTrial], None]] = [after_trial]
    if exp.config.budget.max_trials:
        callbacks.append(optuna.study.MaxTrialsCallback(
            exp.config.budget.max_trials, states=(TrialState.COMPLETE, TrialState.PRUNED)))
    objective = Objective(exp, data, tracker, parent, epoch_listeners, trial_listeners)
    status = "FAILED"
    try:
        study.optimize(objective, n_trials=exp.config.budget.n_trials, timeout=exp.config.budget.timeout,
                       callbacks=callbacks, catch=(TrialFailed,), gc_after_trial=True)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.finish_sweep(parent, status)
    best = best_of(study)
    if best:
        outcome.best_value, outcome.best_trial = best
    return outcome


def quiet_optuna() -> None:
    """Optuna logs every trial at INFO; pet-sweep prints its own one line per trial."""
    import warnings

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # heartbeats and their retry callback are marked experimental; they are what we rely on
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

