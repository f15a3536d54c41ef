"""What a worker's trials train with: the one door from the sweep loop to `train/`.

A sweep worker takes six things from `train/`: the data it builds once, its trials'
starting points (checkpoints, LR-finder anchors), the precision that runs, each
trial's checkpoint plan, the LR finder of a trial, and the fine-tune itself. They are
the methods of `Training`, fastai's as `train/` does them, so that one object can stand
in for all of them.

A sweep always trains with `Training()`. The seam is for benchmarks: `bench.scale
--simulated` gives its workers a subclass that trains nothing and imports neither torch
nor fastai (`bench.simulated.StandIn`), so that hundreds of real sweep loops (the budget,
the claims, heartbeats, the MLflow runs, the stale-trial handler) run on one machine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import optuna

from pet_sweep.config import Experiment, ModelConfig
from pet_sweep.params import TrialParams
from pet_sweep.space import Anchors
from pet_sweep.sweep import resume
from pet_sweep.sweep.budget import WorkerRole
from pet_sweep.sweep.records import EpochListener
from pet_sweep.tracking import Tracker
from pet_sweep.train import pretrain

if TYPE_CHECKING:  # heavy: torch, fastai
    from pet_sweep.train.checkpoint import CheckpointPlan
    from pet_sweep.train.pretrain import Checkpoint
    from pet_sweep.train.recipe import FineTuneResult


class Training:
    """fastai's training, as `train/` does it (every method imports torch and fastai on demand)."""

    def open_data(self, exp: Experiment, role: WorkerRole) -> Any:
        """The worker's data (`train.data.DataBundle`: DataLoaders, splits, fingerprint), built once,
        with its share of the CPU's threads; an objective its device cannot measure is refused."""
        from pet_sweep.train.costs import check_measurable  # heavy: torch
        from pet_sweep.train.data import build_data  # heavy: fastai (on its call)

        if role.threads:
            import torch  # heavy: torch

            torch.set_num_threads(role.threads)
        data = build_data(exp)
        check_measurable(exp, data.dls.device)
        return data

    def starting_points(self, exp: Experiment, data: Any, study: optuna.Study, tracker: Tracker, parent: str,
                        echo: Callable[[str], None]) -> tuple[Mapping[str, Checkpoint], Anchors]:
        """The checkpoint of each architecture (a missing one is pretrained first) and, in an
        anchored space, the LR finder's suggestions, found once per (arch, phase) for the study."""
        from pet_sweep.train import lrfind  # heavy: torch, fastai

        checkpoints = pretrain.checkpoints_for(exp, echo=echo)
        anchors = lrfind.study_anchors(study, exp, data, tracker=tracker, parent_run_id=parent,
                                       echo=echo, checkpoints=checkpoints)
        return checkpoints, anchors

    def precision(self, requested: str, device: Any) -> str:
        from pet_sweep.train.recipe import precision_for  # heavy: torch

        return precision_for(requested, device)

    def checkpoint_plan(self, exp: Experiment, trial: optuna.Trial, freeze_epochs: int) -> CheckpointPlan:
        return resume.plan(exp, trial, freeze_epochs)

    def trial_finder(self, tracker: Tracker, run_id: str) -> Callable[[Any, TrialParams], None]:
        from pet_sweep.train import lrfind  # heavy: torch, fastai

        return lrfind.trial_finder(tracker, run_id)

    def fine_tune(self, dls: Any, params: TrialParams, model: ModelConfig, *, seed: int,
                  listeners: Sequence[EpochListener], checkpoint: CheckpointPlan | None,
                  cbs: Sequence[Any], lr_find: Callable[[Any, TrialParams], None] | None,
                  keep_learner: bool = False) -> FineTuneResult:
        from pet_sweep.train import recipe  # heavy: torch, fastai

        return recipe.fine_tune(dls, params, model, seed=seed, listeners=listeners, checkpoint=checkpoint,
                                cbs=cbs, lr_find=lr_find, keep_learner=keep_learner)

    def threads(self) -> int:
        """The threads torch trains this worker's trials on (the supervisor's split of the cores)."""
        import torch  # heavy: torch

        return torch.get_num_threads()

    def out_of_memory(self) -> type[BaseException]:
        """The error type of an accelerator running out of memory (the trial fails, the sweep goes on)."""
        import torch  # heavy: torch

        return torch.OutOfMemoryError
