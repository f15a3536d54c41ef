"""What a sweep writes into Optuna and reads back: trial attribute names, one epoch's
record, a finished trial's outcome and its one-line summary, a sweep's result.

Pure: imports neither torch, fastai nor MLflow, so the light commands (report,
export, list) can read a study without the training stack."""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Sequence, Union

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from pet_sweep.config import NO_MO_PRUNING, OBJECTIVES, Experiment
from pet_sweep.params import TrialParams, lr_text
from pet_sweep.selection import BASELINE_ATTR, CONFIG_ATTR, SEED_ATTR, kind_of
from pet_sweep.tracking import redact_url

# Trial user attributes pet-sweep writes (the report reads them back).
PARAMS_ATTR = "params"            # the full TrialParams, fixed values included
HISTORY_ATTR = "history"          # per-epoch records, global epoch numbering
PRECISION_ATTR = "precision"      # what really ran
PREDS_ATTR = "valid_preds"        # predicted class per validation item (last epoch)
TARGETS_ATTR = "valid_targets"
REASON_ATTR = "reason"            # why a trial was pruned or failed
WORKER_ATTR = "worker"            # host:pid of the process that ran the trial
DEVICE_ATTR = "device"            # the device the trial ran on ("cpu", "cuda:0"): part of its cost key
BATCH_ATTR = "batch_size"         # set on a trial re-queued after an out-of-memory: the halved batch size
OOM_RETRY_OF = "oom_retry_of"     # set on that re-queued trial: the number of the trial that ran out of memory
INVOCATION_ATTR = "pet_sweep_invocation"  # the invocation (one `pet-sweep run`) whose budget the trial used
# What a completed trial cost, one user attr each (also MLflow metrics of its run): seconds of
# fine-tuning, milliseconds to predict one image at batch size 1 and at the training batch
# size, parameters in millions, and the peak memory it took (CUDA max allocated on a GPU,
# peak resident-set growth on a CPU). The same names are `objectives:` choices.
COST_ATTRS = OBJECTIVES[1:]
COST_SECONDS_ATTR = "cost_measure_seconds"  # what measuring those costs took (bench.overhead reads it)

# What an objective returns to Optuna: the error rate, or in a multi-objective study the
# error rate and then the costs `objectives:` names.
ObjectiveValues = Union[float, tuple[float, ...]]

# Study user attributes.
SPLIT_ATTR = "split"              # the data split's fingerprint, recorded when the sweep starts
# "host:pid@unix-time" of the process that last opened the MLflow parent run and will
# close it; "" once closed. A killed opener leaves it set (`lifecycle.clean_leftovers`).
PARENT_OPEN_ATTR = "mlflow_parent_open"

# Reasons of failed trials.
STALE_REASON = "its worker stopped sending heartbeats (killed or lost)"
INTERRUPTED = "interrupted"       # Ctrl-C or SIGTERM stopped the trial (it is not retried)

# The system attr Optuna's RetryHeartbeatStaleTrialCallback sets on a retry. Read it
# through `retried_trial_number` (no ExperimentalWarning per call).
RETRY_OF = "failed_trial"


@contextlib.contextmanager
def experimental_relied_on() -> Iterator[None]:
    """Optuna features marked experimental that pet-sweep relies on: no warning per use
    (a command that opens a study would otherwise print them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def fail_stale_trials(study: optuna.Study) -> None:
    """Optuna's `fail_stale_trials` (experimental since Optuna 2.9): fail the trials whose heartbeat
    stopped, calling the study's stale-trial callback for each."""
    with experimental_relied_on():
        optuna.storages.fail_stale_trials(study)


def retried_trial_number(trial: FrozenTrial) -> int | None:
    """The trial of a dead worker that `trial` runs again (Optuna's heartbeat retry); None if not a retry."""
    with experimental_relied_on():  # experimental since Optuna 2.8
        return RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)


def retry_history(trial: FrozenTrial) -> list[int]:
    """The trials before `trial` in its series of retries, the original first (each one's worker died); [] if none."""
    with experimental_relied_on():
        return RetryHeartbeatStaleTrialCallback.retry_history(trial)


def sweep_settings(exp: Experiment) -> dict[str, Any]:
    """The study's settings, as the parent MLflow run's params (passwords hidden)."""
    cfg = exp.config
    return {
        "experiment": exp.name, "study_name": exp.study_name, "storage": redact_url(exp.storage_url),
        "data": cfg.data.source, "valid_pct": cfg.data.valid_pct, "test_pct": cfg.data.test_pct,
        "img_size": cfg.model.img_size, "batch_size": cfg.model.batch_size,
        "pretrained": cfg.model.pretrained, "precision_requested": cfg.model.precision,
        "channels_last": cfg.model.channels_last,
        "objectives": ",".join(cfg.objectives),
        "sampler": cfg.sampler.name, "sampler_seed": cfg.sampler.seed, "pruner": cfg.pruner.name,
        "warm_start": ",".join(cfg.sampler.warm_start), "warm_start_top": cfg.sampler.top,
        "n_trials": cfg.budget.n_trials, "timeout": cfg.budget.timeout, "seed": cfg.seed,
        "sweep": cfg.sweep if isinstance(cfg.sweep, str) else "inline",
    }


def trial_config(exp: Experiment, params: TrialParams, batch_size: int | None = None,
                 seed: int | None = None) -> dict[str, Any]:
    """A trial's complete configuration (what `export` writes and `train` replays).

    `batch_size`: the one the trial really ran with, where an out-of-memory retry halved it;
    `seed`: the training seed it ran on (`selection.SEED_ATTR`), the experiment's where None.
    """
    cfg = exp.config
    model = cfg.model.model_dump(exclude_none=True)
    if batch_size is not None:
        model["batch_size"] = int(batch_size)
    return {
        "experiment": exp.name,
        "data": cfg.data.model_dump(exclude_none=True),
        "model": model,
        "params": params.as_dict(),
        "seed": cfg.seed if seed is None else int(seed),
    }


@dataclass
class TrialOutcome:
    number: int
    state: str
    value: float | None
    params: dict[str, Any]
    seconds: float
    reason: str = ""
    retry_of: int | None = None  # the trial of a dead worker this one re-ran
    oom_retry_of: int | None = None  # the trial that ran out of memory at twice this one's batch size
    batch_size: int | None = None    # set where an out-of-memory retry changed it
    costs: dict[str, float] = field(default_factory=dict)  # the costs its line shows (`describe_trial`)
    selection: str = ""              # "baseline, seed 1" or "repeat of trial 4, seed 1"; "" for a searched config's first run


def error_of(trial: FrozenTrial) -> float | None:
    """A finished trial's error rate: its value, or its first value in a multi-objective
    study (`objectives:` starts with error_rate); None before it completes."""
    return float(trial.values[0]) if trial.values else None


def multi_objective_note(objectives: Sequence[str], pruner: str) -> str | None:
    """What a multi-objective study means for pruning, in one line (None for a single objective)."""
    if len(objectives) < 2:
        return None
    unused = "no pruner is set" if pruner == "none" else f"pruner {pruner} is not used"
    return f"multi-objective ({', '.join(objectives)}): {NO_MO_PRUNING}; {unused}"


def describe_trial(trial: FrozenTrial, objectives: Sequence[str] = ("error_rate",)) -> TrialOutcome:
    """A finished trial's outcome. Its line shows the costs that are objectives of its study
    (`objectives`), or predict_ms in a single-objective one."""
    seconds = ((trial.datetime_complete - trial.datetime_start).total_seconds()
               if trial.datetime_complete and trial.datetime_start else 0.0)
    params = trial.user_attrs.get(PARAMS_ATTR) or dict(trial.params)
    value = error_of(trial) if trial.state == TrialState.COMPLETE else (
        trial.intermediate_values[max(trial.intermediate_values)] if trial.intermediate_values else None)
    shown = list(objectives[1:]) or ["predict_ms"]
    costs = {name: float(trial.user_attrs[name]) for name in shown if name in trial.user_attrs}
    return TrialOutcome(trial.number, trial.state.name, value, params, seconds,
                        str(trial.user_attrs.get(REASON_ATTR, "")), retried_trial_number(trial),
                        trial.user_attrs.get(OOM_RETRY_OF), trial.user_attrs.get(BATCH_ATTR), costs,
                        _selection_label(trial))


def _selection_label(trial: FrozenTrial) -> str:
    """What a trial is to the selection, for its line: the baseline or a repeat, on which seed."""
    kind, attrs = kind_of(trial.user_attrs, trial.number), trial.user_attrs
    if kind == "search":
        return ""
    what = "baseline (fastai's fine_tune defaults)" if kind == "baseline" else f"repeat of trial {attrs[CONFIG_ATTR]}"
    return f"{what}, seed {attrs.get(SEED_ATTR, '?')}"


def best_of(study: optuna.Study) -> tuple[float, int] | None:
    """(error rate, trial number) of the study's best completed trial; None before one completes."""
    # the baseline (fastai's fine_tune defaults) is a reference, never the sweep's pick
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if error_of(t) is not None and not t.user_attrs.get(BASELINE_ATTR)]
    if not done:
        return None
    top = min(done, key=lambda t: (error_of(t), t.number))
    return error_of(top), top.number


def worker_line(index: int, line: str) -> str:
    """A worker's line as the local supervisor and the Ray driver show it, prefixed by the worker."""
    return f"w{index}| {line}"


def format_trial(outcome: TrialOutcome, best: tuple[float, int] | None) -> str:
    p = outcome.params
    shown = f"arch={p.get('arch')} {lr_text(p)} freeze_epochs={p.get('freeze_epochs')} epochs={p.get('epochs')}"
    value = f"error_rate={outcome.value:.4f}" if outcome.value is not None else "error_rate=-"
    costs = "".join(f" {name}={cost:.3g}" for name, cost in outcome.costs.items())
    line = f"trial {outcome.number:>3} {outcome.state:<8} {value}{costs}  {shown}  ({outcome.seconds:.1f}s)"
    if best:
        line += f"  best={best[0]:.4f} (trial {best[1]})"
    if outcome.retry_of is not None:
        line += f"  [retry of trial {outcome.retry_of}]"
    if outcome.selection:
        line += f"  [{outcome.selection}]"
    if outcome.oom_retry_of is not None:
        line += f"  [batch_size {outcome.batch_size}: trial {outcome.oom_retry_of} ran out of memory]"
    if outcome.reason and outcome.state != "COMPLETE":
        line += f"\n            reason: {outcome.reason}"
    return line


@dataclass(frozen=True)
class EpochRecord:
    """One finished epoch, numbered across both phases."""

    epoch: int
    phase: str  # "frozen" or "unfrozen"
    train_loss: float
    valid_loss: float
    error_rate: float
    seconds: float


EpochListener = Callable[[EpochRecord], None]


# Why a sweep stopped: every slot of its budget used; budget.timeout; budget.max_trials (the
# study's cap); Ctrl-C or SIGTERM; or, with --workers, the workers exited with slots left;
# or the MLflow tracking server stayed away past tracking.max_outage; or budget.stop_when: converged
# ended the search with slots left.
StoppedBy = Literal["budget", "timeout", "cap", "interrupt", "workers", "tracking", "converged"]


@dataclass
class SweepResult:
    """What one `pet-sweep run` ended with, the same for one process and for supervised workers."""

    study_name: str
    parent_run_id: str
    ran: int                          # budget slots this invocation used (failed trials count; retries run free)
    finished: int                     # this invocation's trials that ran to the end (complete or pruned)
    best: tuple[float, int] | None    # (error rate, trial number) of the study's best trial
    stopped_by: StoppedBy
    left: int                         # slots a resume must run to finish the budget (queued retries aside)
    trials: list[TrialOutcome] = field(default_factory=list)  # the trials this process saw end
    best_config: str = ""             # the best config over its seeds and the verdict against the baseline; "": none
