"""The presized-image cache of augmented data (`data.cache` with `data.augment`): the same items as
fastai's uncached pipeline, each file decoded once per process, however many trials run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pet_sweep.config import load_experiment
from pet_sweep.train.data import build_data

# Pets' shape (500x375) at a tenth; 18 training items, 6 validation items: 3 full batches of 6
PETS_LIKE = {"source": "pets", "path": "pets", "valid_pct": 0.25, "test_pct": 0.0, "limit": None,
             "augment": True, "item_size": 24, "num_workers": 0}


def _jpegs(root: Path) -> None:
    images = root / "pets" / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for breed in ("Abyssinian", "Bengal", "great_pyrenees"):
        for i in range(1, 9):
            Image.fromarray(rng.integers(0, 255, (38, 50, 3), dtype=np.uint8)).save(images / f"{breed}_{i}.jpg")


def test_cached_augmented_items_are_the_uncached_presized_items(write_experiments, tmp_path: Path) -> None:
    _jpegs(tmp_path)
    loaders = {}
    for cache in (False, True):
        exp = load_experiment(write_experiments(data={**PETS_LIKE, "cache": cache}, model={"batch_size": 6}))
        loaders[cache] = build_data(exp).dls
    plain, cached = loaders[False], loaders[True]
    assert cached.vocab == plain.vocab
    assert [type(t).__name__ for t in cached.valid.after_item.fs] == ["ToTensor"]  # no decode, no Resize per item
    assert "Resize" in [type(t).__name__ for t in plain.valid.after_item.fs]
    for dl in (plain.valid, cached.valid):
        dl.before_iter()  # where fastai hands the split (1: validation) to the item transforms
    for i in range(len(plain.valid_ds)):  # the validation items: fastai's Resize(24), centre crop
        x0, y0 = plain.valid.after_item(plain.valid_ds[i])
        x1, y1 = cached.valid.after_item(cached.valid_ds[i])
        assert tuple(x1.shape) == (3, 24, 24) and x1.dtype == x0.dtype and bool((x1 == x0).all())
        assert int(y1) == int(y0)
    assert [int(cached.train_ds[i][1]) for i in range(18)] == [int(plain.train_ds[i][1]) for i in range(18)]
    # the batch augmentation (to img_size 16) runs on the batch, as in the uncached pipeline
    xb, _ = cached.one_batch()
    assert tuple(xb.shape) == (6, 3, 16, 16) and xb.dtype.is_floating_point


class DecodesPerTrial:
    """A trial listener that notes how many files were decoded when each trial started."""

    def __init__(self, opened: list[Path]) -> None:
        self.opened, self.at_start = opened, []

    def trial_started(self, number: int, params: dict[str, Any]) -> None:
        self.at_start.append(len(self.opened))

    def trial_finished(self, outcome: Any, best: Any) -> None:
        pass


@pytest.mark.train
def test_a_second_trial_in_the_process_decodes_no_file_again(write_experiments, tmp_path: Path, monkeypatch) -> None:
    from fastai.vision.core import PILImage

    from pet_sweep.sweep.loop import run_sweep

    create = PILImage.create.__func__
    opened: list[Path] = []

    def counting_create(cls, fn, **kwargs):
        if isinstance(fn, Path):
            opened.append(fn)
        return create(cls, fn, **kwargs)

    monkeypatch.setattr(PILImage, "create", classmethod(counting_create))
    _jpegs(tmp_path)
    exp = load_experiment(write_experiments(data={**PETS_LIKE, "cache": True}, model={"batch_size": 6},
                                            budget={"n_trials": 2}))
    listener = DecodesPerTrial(opened)
    result = run_sweep(exp, echo=lambda line: None, trial_listeners=(listener,))
    assert result.finished == 2
    assert len(opened) == 24 and len(set(opened)) == 24  # every training and validation file, once
    assert listener.at_start[1] == len(opened)  # the second trial decoded nothing
