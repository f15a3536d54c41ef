"""One trial: suggest its parameters, run the chapter-5 recipe under a child MLflow
run, report each epoch to Optuna (pruning) and return the error rate."""

from __future__ import annotations

import gc
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Protocol

import optuna
import yaml
from optuna.trial import FrozenTrial

from pet_sweep.config import Experiment
from pet_sweep.errors import TrainingDiverged, TrialFailed
from pet_sweep.params import TrialParams
from pet_sweep.space import Anchors, anchor_params, suggest
from pet_sweep.sweep.records import (
    BATCH_ATTR,
    HISTORY_ATTR,
    INTERRUPTED,
    OOM_RETRY_OF,
    PARAMS_ATTR,
    PRECISION_ATTR,
    PREDS_ATTR,
    REASON_ATTR,
    TARGETS_ATTR,
    EpochRecord,
    TrialOutcome,
    trial_config,
)
from pet_sweep.tracking import RUN_ID_ATTR, Tracker
from pet_sweep.train.pretrain import CHECKPOINT_ATTR, Checkpoint, starting_model


def history_from_attrs(trial: FrozenTrial) -> list[EpochRecord]:
    return [EpochRecord(**r) for r in trial.user_attrs.get(HISTORY_ATTR, [])]


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
        from pet_sweep.train import lrfind, recipe

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
        from pet_sweep.report.figures import loss_curve  # heavy: matplotlib

        config = folder / "trial_config.yaml"
        config.write_text(yaml.safe_dump(trial_config(self.exp, params, batch_size), sort_keys=False))
        paths = [config]
        if history:
            paths.append(loss_curve(history, folder / "loss_curve.png",
                                    f"trial {number}: {params.arch}, error rate {history[-1].error_rate:.4f}"))
        return paths
