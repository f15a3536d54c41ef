"""Optuna studies: storage, sampler, pruner, the objective, and the sweep loop.

Data flow of one sweep process: open the study (created or resumed by name) ->
open the MLflow parent run -> build the DataLoaders once -> for each trial:
`space.suggest` -> child MLflow run -> `recipe.fine_tune` with the epoch
listeners (MLflow, Optuna pruning) -> result back to Optuna.
"""

from __future__ import annotations

import functools
import gc
import logging
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from pet_sweep.callbacks import EpochRecord
from pet_sweep.config import JOURNAL_PREFIX, Experiment, FaultsConfig
from pet_sweep.data import SplitFingerprint
from pet_sweep.errors import DataError, StudyError, TrainingDiverged, TrialFailed
from pet_sweep.pretrain import CHECKPOINT_ATTR, Checkpoint, checkpoints_for, starting_model
from pet_sweep.space import Anchors, TrialParams, anchor_params, lr_text, suggest
from pet_sweep.tracking import PARENT_RUN_ATTR, RUN_ID_ATTR, Tracker, check_server, redact_url, redact_url_in
from pet_sweep.workers import (INTERRUPTED, INVOCATION_ATTR, OOM_RETRY_OF, PARENT_OPEN_ATTR, RETRY_OF, Budget, Claim,
                               WorkerRole, this_process)

# Trial user attributes pet-sweep writes (the report reads them back).
PARAMS_ATTR = "params"            # the full TrialParams, fixed values included
HISTORY_ATTR = "history"          # per-epoch records, global epoch numbering
PRECISION_ATTR = "precision"      # what really ran
PREDS_ATTR = "valid_preds"        # predicted class per validation item (last epoch)
TARGETS_ATTR = "valid_targets"
REASON_ATTR = "reason"            # why a trial was pruned or failed
WORKER_ATTR = "worker"            # host:pid of the process that ran the trial
BATCH_ATTR = "batch_size"         # set on a trial re-queued after an out-of-memory: the halved batch size
SPLIT_ATTR = "split"              # study attribute: the data split's fingerprint, recorded when the sweep starts

STALE_REASON = "its worker stopped sending heartbeats (killed or lost)"


class StaleTrialHandler:
    """Storage callback for a trial whose worker died: retry it and close its MLflow run.

    Optuna calls it from `fail_stale_trials` in whichever worker notices first; the
    trial's MLflow run id is in its user attrs, so that worker closes the run.
    """

    def __init__(self, max_retry: int, reason: str = STALE_REASON) -> None:
        self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
        self.max_retry, self.reason = max_retry, reason
        self.tracker: Tracker | None = None  # set once the worker has opened MLflow
        self.echo: Callable[[str], None] = lambda line: None
        self.closed_runs: list[str] = []  # the MLflow runs it closed

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.retry(study, trial)
        queued = self.max_retry > len(trial.system_attrs.get("retry_history", []))
        self.echo(f"trial {trial.number:>3} FAIL     {self.reason}; "
                  + ("queued to run again" if queued else f"not retried (faults.max_retry={self.max_retry})"))
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        if self.tracker is not None and run_id:
            from mlflow.exceptions import MlflowException

            try:
                self.tracker.finish_trial(run_id, "FAIL", tags={"reason": self.reason})
                self.closed_runs.append(run_id)
            except MlflowException:  # the run lives in another tracking store; close_stale_runs there
                pass


# the project's extras that bring a database driver, by URL scheme
DRIVER_EXTRAS = {"postgresql": "postgres", "mysql": "mysql", "mariadb": "mysql"}


def make_storage(url: str, faults: FaultsConfig | None = None,
                 on_stale: StaleTrialHandler | None = None) -> optuna.storages.BaseStorage:
    """The Optuna storage of a URL.

    RDB URLs (sqlite, postgresql, mysql+pymysql) get heartbeats: a killed worker's
    trial is failed after the grace period and retried. ``journal:///path/optuna.log``
    is Optuna's journal file storage for a shared file system with no database
    server; it has no heartbeats, so a killed worker's trial stays RUNNING.
    """
    faults = faults or FaultsConfig()
    try:
        if url.startswith(JOURNAL_PREFIX):
            from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage

            path = Path(url[len(JOURNAL_PREFIX):])
            path.parent.mkdir(parents=True, exist_ok=True)
            # the open(O_EXCL) lock works on NFSv3+, where symlink locks may not
            return JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
        if url.startswith("sqlite:///"):
            Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
            # several workers on one file: wait for the write lock instead of "database is locked"
            engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}}
        else:
            engine_kwargs = {"pool_pre_ping": True}
        return _rdb_storage(url, faults, on_stale or StaleTrialHandler(faults.max_retry), engine_kwargs)
    except Exception as err:  # SQLAlchemy/driver errors: bad URL, server down, missing driver
        extra = next((name for prefix, name in DRIVER_EXTRAS.items() if url.startswith(prefix)), None)
        hint = (f"; install its driver with: pip install -e '.[{extra}]'"
                if extra and isinstance(err, ImportError) else "")
        raise StudyError(f"cannot open the Optuna storage {redact_url(url)}: "
                         f"{type(err).__name__}: {redact_url_in(str(err).splitlines()[0][:300], url)}{hint}") from None


def _rdb_storage(url: str, faults: FaultsConfig, on_stale: StaleTrialHandler,
                 engine_kwargs: dict[str, Any]) -> optuna.storages.RDBStorage:
    import sqlalchemy.exc

    def open_rdb() -> optuna.storages.RDBStorage:
        return optuna.storages.RDBStorage(
            url, heartbeat_interval=faults.heartbeat_interval, grace_period=faults.grace_period,
            heartbeat_stale_trial_callback=on_stale, engine_kwargs=engine_kwargs)

    for delay in (1, 2):
        try:
            return open_rdb()
        except sqlalchemy.exc.DBAPIError as err:
            # Two processes created the tables of a new database at once (machines started
            # together, or `pet-sweep list` while a run starts); the other one won, so the
            # next try finds them. PostgreSQL says so with an IntegrityError, SQLite and
            # MySQL with "table ... already exists".
            if not (isinstance(err, sqlalchemy.exc.IntegrityError) or "already exists" in str(err)):
                raise
            time.sleep(delay)
    return open_rdb()


def missing_store_file(url: str) -> Path | None:
    """The file of a sqlite or journal storage URL when it does not exist (opening it would create it)."""
    from pet_sweep.tracking import sqlite_path

    path = Path(url[len(JOURNAL_PREFIX):]) if url.startswith(JOURNAL_PREFIX) else sqlite_path(url)
    return path if path is not None and not path.is_file() else None


def trial_seed(seed: int, number: int) -> int:
    """The seed of trial `number`'s draws: the same trial of the same study draws the same."""
    import numpy as np

    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """Optuna's sampler, seeded afresh for each trial from the seed and the trial's number.

    Trial numbers are handed out by the storage, one per trial across every worker and
    machine. So two machines that open a new study at the same moment do not draw the
    same parameters (as one seeded sampler per process would), a resume does not repeat
    the first run's draws, and a study stays reproducible: what a trial draws depends
    only on the seed, its number and the trials before it.
    """

    def __init__(self, make: Callable[[int | None], optuna.samplers.BaseSampler], seed: int | None) -> None:
        self._make, self._seed = make, seed
        self._inner = make(seed)

    def __str__(self) -> str:
        return f"{type(self._inner).__name__} (seeded per trial from {self._seed})"

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if self._seed is not None:
            self._inner = self._make(trial_seed(self._seed, trial.number))
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, Any]) -> dict[str, Any]:
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: Any) -> Any:
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


def make_sampler(exp: Experiment) -> optuna.samplers.BaseSampler:
    cfg = exp.config.sampler
    if cfg.name == "random":
        return TrialSeededSampler(lambda seed: optuna.samplers.RandomSampler(seed=seed), cfg.seed)
    return TrialSeededSampler(lambda seed: optuna.samplers.TPESampler(seed=seed, n_startup_trials=cfg.n_startup_trials),
                              cfg.seed)


def make_pruner(exp: Experiment) -> optuna.pruners.BasePruner:
    cfg = exp.config.pruner
    if cfg.name == "schedule":
        from pet_sweep.pruners import SchedulePruner

        return SchedulePruner(n_startup_trials=cfg.n_startup_trials, n_warmup_steps=cfg.n_warmup_steps,
                              percentile=cfg.percentile, min_fraction=cfg.min_fraction)
    if cfg.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.n_startup_trials, n_warmup_steps=cfg.n_warmup_steps)
    if cfg.name == "percentile":
        return optuna.pruners.PercentilePruner(cfg.percentile, n_startup_trials=cfg.n_startup_trials,
                                               n_warmup_steps=cfg.n_warmup_steps)
    if cfg.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=cfg.min_resource, reduction_factor=cfg.reduction_factor)
    if cfg.name == "wilcoxon":
        with warnings.catch_warnings():  # chosen knowingly in the config: no ExperimentalWarning per study opened
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.pruners.WilcoxonPruner(p_threshold=cfg.p_threshold, n_startup_steps=cfg.n_warmup_steps)
    return optuna.pruners.NopPruner()


def open_study(exp: Experiment, *, create: bool = True,
               on_stale: StaleTrialHandler | None = None) -> optuna.Study:
    """Create the experiment's study, or load it to resume (same name = same study).

    With ``create=False`` (report, export, bench) nothing is created: a sqlite or
    journal file that does not exist is an error, not a new empty store.
    """
    if not create:
        missing = missing_store_file(exp.storage_url)
        if missing is not None:
            raise StudyError(f"no Optuna storage at {missing}; run `pet-sweep run {exp.name}` first")
    storage = make_storage(exp.storage_url, exp.config.faults, on_stale)
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
        study.set_metric_names(["error_rate"])  # optuna-dashboard and `optuna trials` name the value
    return study


def check_split(study: optuna.Study, exp: Experiment, fingerprint: SplitFingerprint,
                echo: Callable[[str], None] = print) -> None:
    """Record the split's fingerprint in a new study; refuse to resume one on another split.

    Trials of one study are compared on the same validation items, and `train` calls the
    test split held out only when its fingerprint matches the one recorded here.
    """
    recorded = study.user_attrs.get(SPLIT_ATTR)
    if recorded is None:
        if study.get_trials(deepcopy=False):
            # its earlier trials ran before fingerprints were recorded: on which split is unknown
            echo(f"note         study {exp.study_name!r} predates split fingerprints: its split stays unrecorded, "
                 "and `pet-sweep train` will call its test error unverifiable")
            return
        study.set_user_attr(SPLIT_ATTR, fingerprint.model_dump())
        return
    changes = SplitFingerprint.model_validate(recorded).changes(fingerprint)
    if changes:
        raise DataError(f"{exp.config_path}: experiment '{exp.name}': study {exp.study_name!r} was run on another "
                        f"split of the data ({'; '.join(changes)}), so new trials would be judged on other items; "
                        "restore the data (data.path, data.limit, data.split_seed, data.valid_pct, data.test_pct) "
                        "or start a new study (--study-name)")


def sweep_settings(exp: Experiment) -> dict[str, Any]:
    """The study's settings, as the parent MLflow run's params (passwords hidden)."""
    cfg = exp.config
    return {
        "experiment": exp.name, "study_name": exp.study_name, "storage": redact_url(exp.storage_url),
        "data": cfg.data.source, "valid_pct": cfg.data.valid_pct, "test_pct": cfg.data.test_pct,
        "img_size": cfg.model.img_size, "batch_size": cfg.model.batch_size,
        "pretrained": cfg.model.pretrained, "precision_requested": cfg.model.precision,
        "channels_last": cfg.model.channels_last,
        "sampler": cfg.sampler.name, "sampler_seed": cfg.sampler.seed, "pruner": cfg.pruner.name,
        "n_trials": cfg.budget.n_trials, "timeout": cfg.budget.timeout, "seed": cfg.seed,
        "sweep": cfg.sweep if isinstance(cfg.sweep, str) else "inline",
    }


def trial_config(exp: Experiment, params: TrialParams, batch_size: int | None = None) -> dict[str, Any]:
    """A trial's complete configuration (what `export` writes and `train` replays).

    `batch_size`: the one the trial really ran with, where an out-of-memory retry halved it.
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
        "seed": cfg.seed,
    }


def history_from_attrs(trial: FrozenTrial) -> list[EpochRecord]:
    return [EpochRecord(**r) for r in trial.user_attrs.get(HISTORY_ATTR, [])]


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the sweep; the running trial was closed first."""

    def __init__(self, finished: int, left: int) -> None:
        super().__init__(f"interrupted after {finished} finished trial(s)")
        self.finished = finished  # this invocation's trials that ran to the end
        self.left = left          # what a resume must run to finish the budget (Budget.left)


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


@dataclass
class SweepOutcome:
    study_name: str
    parent_run_id: str
    trials: list[TrialOutcome] = field(default_factory=list)
    best_value: float | None = None
    best_trial: int | None = None
    timed_out: bool = False  # budget.timeout ended the run with trials of its budget left to start
    capped: bool = False     # budget.max_trials, the cap of the whole study, ended it


def message_of(err: BaseException) -> str:
    """An error's own message, without the line fastai prepends when a callback raises."""
    text = str(err)
    if text.startswith("Exception occured in `") and ":\n\t" in text:
        return text.split(":\n\t", 1)[1]
    return text


def torch_oom() -> type[BaseException]:
    """The error type of a CUDA (or other accelerator) out-of-memory."""
    import torch

    return torch.OutOfMemoryError


def release_cuda_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class TrialListener(Protocol):
    """Told when a trial starts and ends (the progress display of `pet-sweep run`)."""

    def trial_started(self, number: int, params: dict[str, Any]) -> None: ...

    def trial_finished(self, outcome: TrialOutcome, best: tuple[float, int] | None) -> None: ...


class Objective:
    """One trial: suggest -> child run -> fine-tune -> report back; never leaves a run RUNNING."""

    def __init__(self, exp: Experiment, data: Any, tracker: Tracker, parent_run_id: str,
                 listeners: tuple[Callable[[int, EpochRecord], None], ...] = (),
                 trial_listeners: tuple[TrialListener, ...] = (), anchors: Anchors | None = None) -> None:
        self.exp, self.data, self.tracker, self.parent_run_id = exp, data, tracker, parent_run_id
        self.listeners, self.trial_listeners = listeners, trial_listeners
        self.anchors = anchors or {}  # LR-finder suggestions of an anchored space (lrfind.study_anchors)
        # called first thing in every trial: the sweep loop takes the budget slot there
        self.on_start: Callable[[optuna.Trial], None] | None = None
        self._loaders = {exp.config.model.batch_size: data.dls}  # batch size -> DataLoaders
        self.checkpoints: dict[str, Checkpoint] = {}  # arch -> what the trial starts from (pretrain)

    def loaders(self, batch_size: int) -> Any:
        """The worker's DataLoaders at another batch size (an out-of-memory retry), made once."""
        if batch_size not in self._loaders:
            from fastai.data.core import DataLoaders

            dls = self.data.dls
            self._loaders[batch_size] = DataLoaders(*(dl.new(bs=batch_size) for dl in dls.loaders),
                                                    path=dls.path, device=dls.device)
        return self._loaders[batch_size]

    def __call__(self, trial: optuna.Trial) -> float:
        from pet_sweep import lrfind, recipe

        if self.on_start is not None:
            self.on_start(trial)
        exp, model = self.exp, self.exp.config.model
        params = suggest(exp.space, trial, self.anchors)
        batch_size = int(trial.user_attrs.get(BATCH_ATTR, model.batch_size))
        dls = self.loaders(batch_size)
        precision = recipe.precision_for(model.precision, dls.device)
        trial.set_user_attr(PARAMS_ATTR, params.as_dict())
        trial.set_user_attr(PRECISION_ATTR, precision)
        checkpoint = self.checkpoints.get(params.arch)
        model = starting_model(model, self.checkpoints, params.arch)
        if checkpoint is not None:
            trial.set_user_attr(CHECKPOINT_ATTR, asdict(checkpoint))
        retry = {OOM_RETRY_OF: trial.user_attrs[OOM_RETRY_OF]} if OOM_RETRY_OF in trial.user_attrs else {}
        run_id = self.tracker.start_trial(
            self.parent_run_id, exp.study_name, trial.number,
            {**params.as_dict(), "precision": precision, "img_size": model.img_size,
             "batch_size": batch_size, "pretrained": model.pretrained, "channels_last": model.channels_last,
             "seed": exp.config.seed,
             "device": str(dls.device), **retry, **anchor_params(exp.space, params, self.anchors),
             **(checkpoint.params() if checkpoint else {})},
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
                artifacts = self._artifacts(Path(tmp), params, history, trial.number, batch_size)
                self.tracker.finish_trial(run_id, state, metrics or {},
                                          {"reason": reason} if reason else {}, artifacts)

        started = time.perf_counter()
        oom, reason = False, ""
        try:
            result = recipe.fine_tune(dls, params, model, seed=exp.config.seed,
                                      listeners=[self.tracker.epoch_logger(run_id), report],
                                      lr_find=lrfind.trial_finder(self.tracker, run_id) if exp.config.lr_find else None)
        except optuna.TrialPruned as err:
            close("PRUNED", message_of(err))
            raise
        except TrainingDiverged as err:
            close("PRUNED", message_of(err))
            raise optuna.TrialPruned(message_of(err)) from None
        except TrialFailed as err:
            close("FAIL", message_of(err))
            raise
        except torch_oom() as err:
            # a deeper architecture or larger batch than the GPU holds: this trial fails,
            # the sweep goes on (recipe.fine_tune has already released the learner)
            reason = f"out of memory: {message_of(err).splitlines()[0][:200] or 'CUDA'}"
            oom = True
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: Optuna marks the trial FAIL, MLflow agrees
            close("FAIL", INTERRUPTED)
            raise
        except BaseException as err:  # bugs: close the run, then let them stop the sweep
            close("FAIL", f"{type(err).__name__}: {err}" if str(err) else type(err).__name__)
            raise
        if oom:
            release_cuda_memory()
            reason += self._requeue_smaller(trial, batch_size)
            close("FAIL", reason)
            raise TrialFailed(reason)
        trial.set_user_attr(PREDS_ATTR, result.valid_preds)
        trial.set_user_attr(TARGETS_ATTR, result.valid_targets)
        close("COMPLETE", metrics={"final_error_rate": result.error_rate,
                                   "best_error_rate": min(r.error_rate for r in result.history),
                                   "duration_s": time.perf_counter() - started})
        return result.error_rate

    def _requeue_smaller(self, trial: optuna.Trial, batch_size: int) -> str:
        """Queue the same parameters at half the batch size, `faults.oom_retries` halvings at most.

        Returns what to add to the failed trial's reason. The retry is a new trial
        (Optuna's own queue: `enqueue_trial`), so the failed attempt's epochs never mix
        with its own; it uses no second slot of the budget.
        """
        allowed = self.exp.config.faults.oom_retries
        halvings = (self.exp.config.model.batch_size // batch_size).bit_length() - 1
        smaller = batch_size // 2
        if allowed == 0:
            return ""
        if halvings >= allowed:
            return f" (not re-queued: halved {halvings} time(s) already, faults.oom_retries is {allowed})"
        if smaller < 2:  # batch norm needs two items a batch
            return f" (not re-queued: batch_size {batch_size} cannot be halved)"
        trial.study.enqueue_trial(dict(trial.params), user_attrs={BATCH_ATTR: smaller, OOM_RETRY_OF: trial.number})
        return f"; re-queued at batch_size {smaller}"

    def _artifacts(self, folder: Path, params: TrialParams, history: list[EpochRecord], number: int,
                   batch_size: int) -> list[Path]:
        from pet_sweep.plots import loss_curve

        config = folder / "trial_config.yaml"
        config.write_text(yaml.safe_dump(trial_config(self.exp, params, batch_size), sort_keys=False))
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
    retry_of = trial.system_attrs.get(RETRY_OF)
    return TrialOutcome(trial.number, trial.state.name, value, params, seconds,
                        str(trial.user_attrs.get(REASON_ATTR, "")), retry_of,
                        trial.user_attrs.get(OOM_RETRY_OF), trial.user_attrs.get(BATCH_ATTR))


def format_trial(outcome: TrialOutcome, best: tuple[float, int] | None) -> str:
    p = outcome.params
    shown = f"arch={p.get('arch')} {lr_text(p)} freeze_epochs={p.get('freeze_epochs')} epochs={p.get('epochs')}"
    value = f"error_rate={outcome.value:.4f}" if outcome.value is not None else "error_rate=-"
    line = f"trial {outcome.number:>3} {outcome.state:<8} {value}  {shown}  ({outcome.seconds:.1f}s)"
    if best:
        line += f"  best={best[0]:.4f} (trial {best[1]})"
    if outcome.retry_of is not None:
        line += f"  [retry of trial {outcome.retry_of}]"
    if outcome.oom_retry_of is not None:
        line += f"  [batch_size {outcome.batch_size}: trial {outcome.oom_retry_of} ran out of memory]"
    if outcome.reason and outcome.state != "COMPLETE":
        line += f"\n            reason: {outcome.reason}"
    return line


def best_of(study: optuna.Study) -> tuple[float, int] | None:
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    if not done:
        return None
    top = min(done, key=lambda t: t.value)
    return float(top.value), top.number


def open_parent_run(exp: Experiment, study: optuna.Study, tracker: Tracker) -> str:
    """The study's MLflow parent run (the sweep), reused by resumes and every worker.

    Machines opening a new study together agree on one run (`Tracker.sweep_run`).
    The study records who holds it open, so a command can close it if that process is killed.
    """
    parent = tracker.sweep_run(exp.study_name, sweep_settings(exp), study.user_attrs.get(PARENT_RUN_ATTR))
    study.set_user_attr(PARENT_OPEN_ATTR, f"{this_process()}@{time.time():.0f}")
    if study.user_attrs.get(PARENT_RUN_ATTR) != parent:
        study.set_user_attr(PARENT_RUN_ATTR, parent)
        study.set_user_attr("mlflow_experiment_id", tracker.experiment_id)
        study.set_user_attr("mlflow_tracking_uri", redact_url(exp.tracking_uri))
    return parent


def close_parent_run(study: optuna.Study, tracker: Tracker, parent: str, status: str) -> bool:
    """End this invocation's hold on the sweep's parent run: close it, unless trials of
    other machines still run under it (the last machine to finish closes it). True if closed."""
    if any(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False)):
        return False
    tracker.finish_sweep(parent, status)
    study.set_user_attr(PARENT_OPEN_ATTR, "")
    return True


def close_dead_runs(study: optuna.Study, tracker: Tracker) -> int:
    """Close MLflow trial runs left RUNNING whose Optuna trial is no longer running."""
    trials = study.get_trials(deepcopy=False)
    return tracker.close_stale_runs(
        study.study_name, {t.number for t in trials if t.state == TrialState.RUNNING},
        {t.number: t.state.name for t in trials})


def run_sweep(exp: Experiment, *, echo: Callable[[str], None] = print,
              epoch_listeners: tuple[Callable[[int, EpochRecord], None], ...] = (),
              trial_listeners: tuple[TrialListener, ...] = (),
              role: WorkerRole | None = None) -> SweepOutcome:
    """Run (or resume) the experiment's study in this process: `budget.n_trials` more trials.

    With a `role` from a supervisor (`pet-sweep run --workers N`) this process is one
    of N workers sharing that budget, and the supervisor owns the MLflow parent run.
    """
    from optuna.storages import fail_stale_trials

    from pet_sweep import lrfind
    from pet_sweep.data import build_data

    role = role or WorkerRole()
    if role.threads:
        import torch

        torch.set_num_threads(role.threads)
    check_server(exp.tracking_uri)  # an MLflow server that is down: said in seconds, before the data
    data = build_data(exp)  # before any store: a missing data folder must not leave a study or run behind
    stale = StaleTrialHandler(exp.config.faults.max_retry)
    study = open_study(exp, on_stale=stale)  # a bad storage URL: before the MLflow store
    check_split(study, exp, data.fingerprint, echo)  # another split: refused before any run is opened
    tracker = Tracker(exp.tracking_uri, exp.tracking_experiment)
    stale.tracker, stale.echo = tracker, echo
    owns_parent = role.parent_run_id is None
    if owns_parent:
        from pet_sweep.workers import clean_leftovers

        cleaned = clean_leftovers([exp])
        if cleaned:
            echo(cleaned)
    parent = open_parent_run(exp, study, tracker) if owns_parent else role.parent_run_id
    outcome = SweepOutcome(exp.study_name, parent)
    budget_cfg, faults = exp.config.budget, exp.config.faults
    budget = Budget(role, budget_cfg.n_trials, budget_cfg.max_trials,
                    heartbeats=not exp.storage_url.startswith(JOURNAL_PREFIX))  # make_storage: RDB has them

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

    objective = Objective(exp, data, tracker, parent, epoch_listeners, trial_listeners)
    started = time.monotonic()
    status = "FAILED"
    if owns_parent:
        role.own_lock()  # removed in `finally`; left behind only by a kill -9 (clean_leftovers)
    try:
        # anchored spaces: the LR finder once per (arch, phase) for the study, before any trial.
        # Under the claim lock, so of the workers starting together on one machine the first
        # runs it and stores it in the study, and the others read it back when it is their turn.
        with budget.claim():
            objective.checkpoints = checkpoints_for(exp, echo=echo)  # a missing one is pretrained first
            objective.anchors = lrfind.study_anchors(study, exp, data, tracker=tracker, parent_run_id=parent,
                                                     echo=echo, checkpoints=objective.checkpoints)
        freeze_long_lived_objects()
        waiting = False
        while budget_cfg.timeout is None or time.monotonic() - started < budget_cfg.timeout:
            with budget.claim() as claim:
                step = budget.next_step(study)
                if step == "stop":
                    outcome.capped = budget.capped
                    break
                waiting, was_waiting = step == "wait", waiting
                if step == "run":
                    objective.on_start = functools.partial(_take_slot, role=role, claim=claim)
                    # no gc_after_trial: recipe.release already collects once per trial (a full
                    # collection costs ~0.4 s with fastai loaded)
                    study.optimize(objective, n_trials=1, callbacks=[after_trial], catch=(TrialFailed,))
                    continue
            # "wait": another worker's trial is running; if that worker died, its trial
            # turns stale after the grace period and is failed and retried here.
            if not was_waiting:
                echo(f"waiting      {budget.waiting_on}: staying to run the retry of any whose worker "
                     f"dies (no heartbeat for {faults.grace_period}s)")
            time.sleep(min(faults.heartbeat_interval, 5))
            fail_stale_trials(study)
        else:
            # the loop's condition ended it (no break); it cut the run short only with slots left
            outcome.timed_out = budget.used(study.get_trials(deepcopy=False)) < budget_cfg.n_trials
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        trials = study.get_trials(deepcopy=False)
        raise SweepInterrupted(budget.finished(trials), budget.left(trials)) from None
    finally:
        gc.unfreeze()  # a library caller's later collections see everything again
        if owns_parent:
            close_dead_runs(study, tracker)
            close_parent_run(study, tracker, parent, status)
            role.lock_path.unlink(missing_ok=True)
    best = best_of(study)
    if best:
        outcome.best_value, outcome.best_trial = best
    return outcome


def freeze_long_lived_objects() -> None:
    """Move everything alive now (modules, stores, DataLoaders, cached images) out of
    the garbage collector's sight.

    `recipe.release` runs a full collection after every trial so a finished
    learner's reference cycles free their memory at once. With torch, fastai, MLflow
    and SQLAlchemy loaded that is some 600,000 objects and about 0.3 s a trial; after
    `gc.freeze()` a collection scans only what the trial itself created.
    """
    gc.collect()
    gc.freeze()


def _take_slot(trial: optuna.Trial, *, role: WorkerRole, claim: Claim) -> None:
    """The trial exists (RUNNING): mark it as this invocation's, then let the next worker claim.

    A retry of a dead worker's trial carries the original's user attrs, so it
    already has an invocation and takes no new slot.
    """
    if INVOCATION_ATTR not in trial.user_attrs:
        trial.set_user_attr(INVOCATION_ATTR, role.invocation)
    trial.set_user_attr(WORKER_ATTR, this_process())
    claim.release()


class _NoInterruptTraceback(logging.Filter):
    """Drop Optuna's two warnings about a trial that Ctrl-C stopped (the first with a traceback)."""

    def __init__(self) -> None:
        super().__init__()
        self.next_line = ""  # Optuna's second line about the same trial

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.next_line and message.startswith(self.next_line):
            self.next_line = ""
            return False
        if record.exc_info and record.exc_info[0] is not None and issubclass(record.exc_info[0], KeyboardInterrupt):
            self.next_line = " ".join(message.split()[:2]) + " failed with value"  # "Trial 3 failed with value"
            return False
        return True


def quiet_optuna() -> None:
    """Optuna logs every trial at INFO; pet-sweep prints its own one line per trial."""
    import warnings

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Ctrl-C (or SIGTERM) in a trial: Optuna logs the trial's failure with the whole
    # traceback through fastai and torch; pet-sweep says it in one line with the resume command
    optimize_log = logging.getLogger("optuna.study._optimize")
    if not any(isinstance(f, _NoInterruptTraceback) for f in optimize_log.filters):
        optimize_log.addFilter(_NoInterruptTraceback())
    # heartbeats and their retry callback are marked experimental; they are what we rely on
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

