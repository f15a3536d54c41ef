"""Epoch checkpoints: a trial resumed from one runs only the epochs left, exactly as it would have."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import pytest
from optuna.trial import FixedTrial

from pet_sweep.config import load_experiment
from pet_sweep.space import suggest

FOUR_EPOCHS = {"arch": "resnet18", "base_lr": 1.0e-2, "lr_hi": 1.0e-2, "lr_mult": 10, "freeze_epochs": 1, "epochs": 3}


@pytest.mark.train
def test_a_resumed_fine_tune_runs_the_epochs_left_exactly_as_the_uninterrupted_one(
        write_experiments: Callable[..., Path], tmp_path: Path) -> None:
    from pet_sweep.train import checkpoint, recipe
    from pet_sweep.train.data import build_data

    exp = load_experiment(write_experiments(space=FOUR_EPOCHS, data={"limit": 200}))
    data, params = build_data(exp), suggest(exp.space, FixedTrial({}))
    latest = tmp_path / "trial-0.pt"
    saves: list[int] = []

    def keep(epochs: int, seconds: float) -> None:  # a copy of each checkpoint as it was then
        saves.append(epochs)
        shutil.copy(latest, tmp_path / f"after-{epochs}.pt")

    plan = checkpoint.CheckpointPlan(latest, trial=0, on_saved=keep)
    full = recipe.fine_tune(data.dls, params, exp.config.model, seed=0, checkpoint=plan)
    assert saves == [1, 2, 3]  # after every epoch but the last (the trial completes there)
    uninterrupted_lrs = checkpoint.load(latest, params.freeze_epochs).epoch_lrs  # of epochs 0-2
    assert len(uninterrupted_lrs) == 3
    # after the frozen phase (the unfrozen one starts afresh) and in the middle of the unfrozen one
    for done, phase, start in ((1, "unfrozen", 0), (2, "unfrozen", 1)):
        point = checkpoint.load(tmp_path / f"after-{done}.pt", params.freeze_epochs)
        assert (point.epochs, point.phase, point.start) == (done, phase, start)
        ran: list[int] = []
        retry = tmp_path / f"retry-{done}.pt"
        resumed_plan = checkpoint.CheckpointPlan(retry, trial=1, resume=point)
        # another seed: whatever the retry's process drew before, the checkpoint's RNG states rule
        resumed = recipe.fine_tune(data.dls, params, exp.config.model, seed=99, checkpoint=resumed_plan,
                                   listeners=[lambda r: ran.append(r.epoch)])
        assert ran == list(range(done, 4))  # only the epochs left, numbered on
        assert [r.epoch for r in resumed.history] == [0, 1, 2, 3]
        # the same schedule, batches and dropout: bit for bit on a CPU
        assert [(r.phase, r.train_loss, r.valid_loss, r.error_rate) for r in resumed.history] == \
               [(r.phase, r.train_loss, r.valid_loss, r.error_rate) for r in full.history]
        assert resumed.valid_preds == full.valid_preds
        # the retry's own last checkpoint (after epoch 2): the learning rates it ran at, first and last batch
        assert checkpoint.load(retry, params.freeze_epochs).epoch_lrs == uninterrupted_lrs
        assert resumed.error_rate == full.error_rate


@pytest.mark.train
def test_checkpoints_every_n_epochs(write_experiments: Callable[..., Path], tmp_path: Path) -> None:
    from pet_sweep.train import checkpoint, recipe
    from pet_sweep.train.data import build_data

    exp = load_experiment(write_experiments(space={**FOUR_EPOCHS, "epochs": 4}, data={"limit": 100}))
    data, params = build_data(exp), suggest(exp.space, FixedTrial({}))
    saves: list[int] = []
    plan = checkpoint.CheckpointPlan(tmp_path / "t.pt", every=2, on_saved=lambda n, s: saves.append(n))
    recipe.fine_tune(data.dls, params, exp.config.model, seed=0, checkpoint=plan)
    assert saves == [2, 4]  # of 5 epochs: not after the last
    saves.clear()
    plan = checkpoint.CheckpointPlan(tmp_path / "u.pt", min_seconds=3600, on_saved=lambda n, s: saves.append(n))
    recipe.fine_tune(data.dls, params, exp.config.model, seed=0, checkpoint=plan)
    assert saves == []  # none an hour after the trial started


def test_checkpoints_go_beside_the_storage_file_or_where_the_experiment_says(
        write_experiments: Callable[..., Path], tmp_path: Path) -> None:
    from pet_sweep.sweep.resume import checkpoint_dir

    exp = load_experiment(write_experiments())
    assert checkpoint_dir(exp) == tmp_path / "stores" / "checkpoints"  # beside stores/optuna.db
    exp = load_experiment(write_experiments(checkpoints="file://shared/ckpt"))
    assert checkpoint_dir(exp) == (tmp_path / "shared" / "ckpt").resolve()


def test_a_checkpoint_uri_no_worker_can_write_to_is_refused(write_experiments: Callable[..., Path]) -> None:
    from pet_sweep.errors import ConfigError

    with pytest.raises(ConfigError, match=r"checkpoints must be a folder.*s3://bucket/ckpt"):
        load_experiment(write_experiments(checkpoints="s3://bucket/ckpt"))
