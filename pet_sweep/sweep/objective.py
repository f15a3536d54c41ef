"""One trial: suggest its parameters, run the chapter-5 recipe under a child MLflow
run, report each epoch to Optuna (pruning) and return the error rate, or in a
multi-objective study (`objectives:`) the error rate and the costs it names."""

from __future__ import annotations

import functools
import gc
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import optuna
import yaml

from pet_sweep.config import Experiment, ModelConfig
from pet_sweep.errors import Preempted, TrainingDiverged, TrialFailed
from pet_sweep.params import TrialParams
from pet_sweep.selection import SEED_ATTR
from pet_sweep.space import Anchors, anchor_params, suggest
from pet_sweep.sweep import confirm, resume
from pet_sweep.sweep.records import (
    BATCH_ATTR,
    COST_SECONDS_ATTR,
    DEVICE_ATTR,
    HISTORY_ATTR,
    INTERRUPTED,
    OOM_RETRY_OF,
    PARAMS_ATTR,
    PRECISION_ATTR,
    PREDS_ATTR,
    REASON_ATTR,
    TARGETS_ATTR,
    EpochRecord,
    ObjectiveValues,
    TrialOutcome,
    trial_config,
)
from pet_sweep.sweep.training import Training
from pet_sweep.tracking import RUN_ID_ATTR, Tracker
from pet_sweep.train.pretrain import CHECKPOINT_ATTR, Checkpoint, starting_model


def message_of(err: BaseException) -> str:
    """An error's own message, without the line fastai prepends when a callback raises."""
    text = str(err)
    if text.startswith("Exception occured in `") and ":\n\t" in text:
        return text.split(":\n\t", 1)[1]
    return text


def release_cuda_memory() -> None:
    import torch  # heavy: torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class TrialListener(Protocol):
    """Told when a trial starts and ends (the progress display of `pet-sweep run`)."""

    def trial_started(self, number: int, params: dict[str, Any]) -> None: ...

    def trial_finished(self, outcome: TrialOutcome, best: tuple[float, int] | None) -> None: ...


@dataclass
class TrialRun:
    """One trial under way: what its epochs are reported with and its MLflow run is closed with."""

    trial: optuna.Trial
    params: TrialParams
    model: ModelConfig       # the experiment's, with the weights of the trial's checkpoint if it has one
    batch_size: int          # the experiment's, or half of it in an out-of-memory retry
    dls: Any                 # the DataLoaders at that batch size
    run_id: str              # its child MLflow run
    history: list[EpochRecord] = field(default_factory=list)
    seed: int = 0            # its training seed: the experiment's, or a repeat's own (`selection.SEED_ATTR`)


class Objective:
    """One trial: suggest -> child run -> fine-tune -> report back; never leaves a run RUNNING.

    `anchors`: the LR-finder suggestions of an anchored space (`lrfind.study_anchors`);
    `checkpoints`: arch -> what its trials start from (`pretrain.checkpoints_for`);
    `training`: what the trials train with (`sweep.training`; a benchmark's stand-in).
    """

    def __init__(self, exp: Experiment, data: Any, tracker: Tracker, parent_run_id: str,
                 listeners: tuple[Callable[[int, EpochRecord], None], ...] = (),
                 trial_listeners: tuple[TrialListener, ...] = (), anchors: Anchors | None = None,
                 checkpoints: Mapping[str, Checkpoint] | None = None, fastai_cbs: tuple[Any, ...] = (),
                 training: Training | None = None) -> None:
        self.fastai_cbs, self.training = fastai_cbs, training or Training()
        self.exp, self.data, self.tracker, self.parent_run_id = exp, data, tracker, parent_run_id
        self.listeners, self.trial_listeners = listeners, trial_listeners
        self.anchors = anchors or {}
        self.checkpoints = dict(checkpoints or {})
        self._loaders = {exp.config.model.batch_size: data.dls}  # batch size -> DataLoaders
        self.preempted: list[int] = []  # trials SIGTERM stopped, to be queued to resume (`resume.queue_preempted`)
        self._finished: tuple[int, Any] = (-1, None)  # the last completed trial's learner, for `keep.KeepWinner`

    def _hand_over(self, number: int, learner: Any) -> None:
        """Hold the completed trial's learner for `take_learner`; one no callback took is released first."""
        if self._finished[1] is not None:  # the trial before failed after its training
            from pet_sweep.train.recipe import release  # heavy: torch, fastai (only with a learner to free)

            release(self.take_learner()[1])
        self._finished = (number, learner)

    def take_learner(self) -> tuple[int, Any]:
        """(trial number, learner) of the last trial that completed with `keep_winner` on, handed over
        once: the caller releases it; (-1, None) where there is none."""
        finished, self._finished = self._finished, (-1, None)
        return finished

    def loaders(self, batch_size: int) -> Any:
        """The worker's DataLoaders at another batch size (an out-of-memory retry), made once."""
        if batch_size not in self._loaders:
            from fastai.data.core import DataLoaders  # heavy: fastai

            dls = self.data.dls
            self._loaders[batch_size] = DataLoaders(*(dl.new(bs=batch_size) for dl in dls.loaders),
                                                    path=dls.path, device=dls.device)
        return self._loaders[batch_size]

    def __call__(self, trial: optuna.Trial,
                 on_start: Callable[[optuna.Trial], None] | None = None) -> ObjectiveValues:
        """Run the trial; return its error rate (with the costs `objectives:` names after it, in a
        multi-objective study), or raise TrialPruned or TrialFailed.

        `on_start` is called first, once the trial exists (the sweep loop takes its budget slot there).
        """
        if on_start is not None:
            on_start(trial)
        run = self._start(trial)
        started = time.perf_counter()
        oom_reason: str | None = None
        checkpoints, logger = self._checkpoints(run)
        try:
            result = self.training.fine_tune(
                run.dls, run.params, run.model, seed=run.seed,
                listeners=[logger, functools.partial(self._report, run)], checkpoint=checkpoints,
                cbs=self.fastai_cbs, keep_learner=self.exp.config.keep_winner,
                lr_find=self.training.trial_finder(self.tracker, run.run_id)
                if self.exp.config.lr_find and checkpoints.resume is None else None)
        except optuna.TrialPruned as err:
            self._close(run, "PRUNED", message_of(err))
            raise
        except TrainingDiverged as err:
            self._close(run, "PRUNED", message_of(err))
            raise optuna.TrialPruned(message_of(err)) from None
        except TrialFailed as err:
            self._close(run, "FAIL", message_of(err))
            raise
        except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM: Optuna marks the trial FAIL, MLflow agrees
            self._interrupted(run, err)
            raise
        except self.training.out_of_memory() as err:
            # a deeper architecture or larger batch than the GPU holds: this trial fails,
            # the sweep goes on (recipe.fine_tune has already released the learner)
            oom_reason = f"out of memory: {message_of(err).splitlines()[0][:200] or 'CUDA'}"
        except BaseException as err:  # bugs: close the run, then let them stop the sweep
            self._close(run, "FAIL", f"{type(err).__name__}: {err}" if str(err) else type(err).__name__)
            raise
        finally:
            if trial.number not in self.preempted:  # ended for good (an out-of-memory retry is a new trial at another batch size)
                resume.discard(self.exp, checkpoints)
        if oom_reason is not None:  # after the `except`: there, its traceback still holds the trial's tensors
            release_cuda_memory()
            oom_reason += self._requeue_smaller(trial, run.batch_size)
            self._close(run, "FAIL", oom_reason)
            raise TrialFailed(oom_reason)
        self._hand_over(trial.number, result.learner)
        trial.set_user_attr(PREDS_ATTR, result.valid_preds)
        trial.set_user_attr(TARGETS_ATTR, result.valid_targets)
        for name, cost in result.costs.items():
            trial.set_user_attr(name, cost)
        trial.set_user_attr(COST_SECONDS_ATTR, result.cost_seconds)
        self._close(run, "COMPLETE", metrics={"final_error_rate": result.error_rate,
                                              "best_error_rate": min(r.error_rate for r in result.history),
                                              "duration_s": time.perf_counter() - started, **result.costs,
                                              COST_SECONDS_ATTR: result.cost_seconds})
        return self._values(result.error_rate, result.costs)

    def _checkpoints(self, run: TrialRun) -> tuple[Any, Callable[[EpochRecord], None]]:
        """The trial's checkpoint plan (`resume.plan`) and its MLflow epoch logger. A retry's epochs so far
        come from the checkpoint it goes on from, not trained again: its history, MLflow curve, Optuna's values."""
        logger = self.tracker.epoch_logger(run.run_id)
        checkpoints = self.training.checkpoint_plan(self.exp, run.trial, run.params.freeze_epochs)
        if checkpoints.resume is not None:
            resume.note_resumed(run.trial, checkpoints.resume, lambda r: (logger(r), self._report(run, r, judge=False)),
                                lambda text: self.tracker.update_sweep(run.run_id, {}, {resume.RESUMED_TAG: text}))
        return checkpoints, logger

    def _interrupted(self, run: TrialRun, err: KeyboardInterrupt) -> None:
        """Ctrl-C stopped the trial; or SIGTERM (`Preempted`): its checkpoint stays, and the sweep
        loop queues it to resume from there (`resume.queue_preempted`)."""
        if not isinstance(err, Preempted):
            self._close(run, "FAIL", INTERRUPTED)
            return
        self.preempted.append(run.trial.number)
        self._close(run, "FAIL", resume.preempted_reason(run.trial.user_attrs.get(resume.CHECKPOINT_EPOCHS_ATTR)))

    def _values(self, error_rate: float, costs: Mapping[str, float]) -> ObjectiveValues:
        """What Optuna is told: the error rate alone, or with the costs `objectives:` names after it."""
        objectives = self.exp.config.objectives
        if len(objectives) == 1:
            return error_rate
        return (error_rate, *(costs[name] for name in objectives[1:]))

    def _start(self, trial: optuna.Trial) -> TrialRun:
        """Suggest the trial's parameters, record them on the trial and open its child MLflow run."""
        exp, model = self.exp, self.exp.config.model
        with confirm.fixed_values_quiet(trial):
            params = suggest(exp.space, trial, self.anchors)
        seed = int(trial.user_attrs.get(SEED_ATTR, exp.config.seed))
        trial.set_user_attr(SEED_ATTR, seed)  # the seed the trial trains on, recorded (a repeat's is its own)
        # a searched config's trial records no config_id (it is its own number), so the retry of one
        # (Optuna's heartbeat retry copies the user attrs) stays a searched trial, never a "repeat"
        batch_size = int(trial.user_attrs.get(BATCH_ATTR, model.batch_size))
        dls = self.loaders(batch_size)
        precision = self.training.precision(model.precision, dls.device)
        trial.set_user_attr(PARAMS_ATTR, params.as_dict())
        trial.set_user_attr(PRECISION_ATTR, precision)
        trial.set_user_attr(DEVICE_ATTR, str(dls.device))
        checkpoint = self.checkpoints.get(params.arch)
        model = starting_model(model, self.checkpoints, params.arch)
        if checkpoint is not None:
            trial.set_user_attr(CHECKPOINT_ATTR, asdict(checkpoint))
        retry = {OOM_RETRY_OF: trial.user_attrs[OOM_RETRY_OF]} if OOM_RETRY_OF in trial.user_attrs else {}
        run_id = self.tracker.start_trial(
            self.parent_run_id, exp.study_name, trial.number,
            {**params.as_dict(), "precision": precision, "img_size": model.img_size,
             "batch_size": batch_size, "pretrained": model.pretrained, "channels_last": model.channels_last,
             "seed": seed, "torch_threads": self.training.threads(),  # launch.local.worker_threads
             "loader_workers": self.data.loader_workers,  # train.data.loader_workers
             "device": str(dls.device), **retry, **anchor_params(exp.space, params, self.anchors),
             **(checkpoint.params() if checkpoint else {})},
            tags={"arch": params.arch, confirm.KIND_TAG: confirm.kind_of(trial.user_attrs, trial.number)})
        trial.set_user_attr(RUN_ID_ATTR, run_id)
        for listener in self.trial_listeners:
            listener.trial_started(trial.number, params.as_dict())
        return TrialRun(trial, params, model, batch_size, dls, run_id, seed=seed)

    def _report(self, run: TrialRun, record: EpochRecord, judge: bool = True) -> None:
        """An epoch ended: record it, tell the listeners, and let Optuna's pruner judge it
        (not in a multi-objective study: Optuna neither takes its reports nor prunes it).
        `judge=False`: an epoch a resumed trial restored (the attempt before it was judged on it)."""
        trial = run.trial
        run.history.append(record)
        trial.set_user_attr(HISTORY_ATTR, [vars(r) for r in run.history])
        for listener in self.listeners:
            listener(trial.number, record)
        if len(self.exp.config.objectives) > 1:
            return
        trial.report(record.error_rate, step=record.epoch)
        if judge and not confirm.scheduled(trial) and trial.should_prune():  # a repeat or the baseline runs whole
            raise optuna.TrialPruned(f"pruned at epoch {record.epoch} with error_rate {record.error_rate:.4f}")

    def _close(self, run: TrialRun, state: str, reason: str = "", metrics: dict[str, float] | None = None) -> None:
        """End the trial's MLflow run in `state`, with its config and loss curve as artifacts."""
        if reason:
            run.trial.set_user_attr(REASON_ATTR, reason)
        run.trial.set_user_attr(RUN_ID_ATTR, self.tracker.resolve(run.run_id))  # made while MLflow was away: sent since?
        with tempfile.TemporaryDirectory() as tmp:
            artifacts = self._artifacts(Path(tmp), run)
            self.tracker.finish_trial(run.run_id, state, metrics or {}, {"reason": reason} if reason else {}, artifacts)

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
        carried = {k: trial.user_attrs[k] for k in confirm.SELECTION_ATTRS if k in trial.user_attrs}  # its config and seed
        trial.study.enqueue_trial(dict(trial.params), user_attrs={**carried, BATCH_ATTR: smaller, OOM_RETRY_OF: trial.number})
        return f"; re-queued at batch_size {smaller}"

    def _artifacts(self, folder: Path, run: TrialRun) -> list[Path]:
        from pet_sweep.report.trial_figures import loss_curve  # heavy: matplotlib

        config = folder / "trial_config.yaml"
        config.write_text(yaml.safe_dump(trial_config(self.exp, run.params, run.batch_size, run.seed), sort_keys=False))
        paths = [config]
        if run.history:
            title = f"trial {run.trial.number}: {run.params.arch}, error rate {run.history[-1].error_rate:.4f}"
            paths.append(loss_curve(run.history, folder / "loss_curve.png", title))
        return paths
