"""Data sets: digits materialised once, seeded splits, a pets-shaped folder, user folders."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pet_sweep.config import load_experiment
from pet_sweep.errors import DataError
from pet_sweep.train.data import Splits, build_data, digits_folder, loader_workers, split_fingerprint, split_items


def test_digits_written_once_with_label_names(tmp_path: Path) -> None:
    folder = digits_folder(tmp_path)
    files = sorted(folder.glob("*.png"))
    assert len(files) == 1797
    labels = {f.name.split("_")[0] for f in files}
    assert labels == {str(d) for d in range(10)}
    stamp = files[0].stat().st_mtime_ns
    assert digits_folder(tmp_path) == folder and files[0].stat().st_mtime_ns == stamp  # not rewritten
    assert Image.open(files[0]).size == (8, 8)


def _count_digits(root: str) -> int:
    return len(list(digits_folder(Path(root)).glob("*.png")))


def test_digits_written_by_several_processes_at_once(tmp_path: Path) -> None:
    """Workers or benchmarks started together on a fresh machine all write the data set: each
    sees the whole of it (a process once read 355 files while another replaced the folder)."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(4) as pool:
        counts = pool.map(_count_digits, [str(tmp_path)] * 4)
    assert counts == [1797] * 4
    assert [p.name for p in tmp_path.iterdir()] == ["digits"]  # no temporary folder left


def test_digits_a_complete_folder_is_kept_and_an_incomplete_one_replaced(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pet_sweep.train import data

    folder = digits_folder(tmp_path)
    inode = folder.stat().st_ino
    # another process renamed its folder into place while this one was writing its own
    checks = iter([False])
    real = data._complete_digits
    monkeypatch.setattr(data, "_complete_digits", lambda f: next(checks, None) or real(f))
    assert digits_folder(tmp_path) == folder and folder.stat().st_ino == inode  # kept: a reader may be in it
    assert [p.name for p in tmp_path.iterdir()] == ["digits"]

    for extra in sorted(folder.glob("*.png"))[3:]:  # a folder pet-sweep did not write whole
        extra.unlink()
    assert len(list(digits_folder(tmp_path).glob("*.png"))) == 1797
    assert [p.name for p in tmp_path.iterdir()] == ["digits"]


def test_split_is_seeded_disjoint_and_order_free() -> None:
    items = [Path(f"{i % 10}_{i}.png") for i in range(1000)]
    a = split_items(items, 0.2, 0.1, seed=7)
    b = split_items(list(reversed(items)), 0.2, 0.1, seed=7)
    assert a == b
    assert (len(a.train), len(a.valid), len(a.test)) == (700, 200, 100)
    assert not (set(a.train) & set(a.valid)) and not (set(a.test) & set(a.train + a.valid))
    assert split_items(items, 0.2, 0.1, seed=8).valid != a.valid


def test_digits_dataloaders_keep_test_aside(write_experiments) -> None:
    exp = load_experiment(write_experiments())
    data = build_data(exp)
    assert data.vocab == tuple(str(d) for d in range(10))
    assert (len(data.splits.train), len(data.splits.valid), len(data.splits.test)) == (210, 60, 30)
    assert len(data.dls.valid_ds) == 60 and len(data.dls.train_ds) == 210
    xb, yb = data.dls.one_batch()
    assert tuple(xb.shape[1:]) == (3, 16, 16)
    valid_names = {p.name for p in data.splits.valid}
    assert not valid_names & {p.name for p in data.splits.test}


def test_the_data_line_counts_what_was_found_and_each_split(write_experiments) -> None:
    """The line `run` prints before its first trial: images found, classes, the three splits."""
    data = build_data(load_experiment(write_experiments()))
    assert data.describe(load_experiment(write_experiments()).config.data) == (
        "1797 images, 10 classes (digits); limit 300; train 210, valid 60, test 30")
    exp = load_experiment(write_experiments(data={"limit": None, "per_class": 3, "classes": ["1", "7"]}))
    few = build_data(exp, exp.config.model.model_copy(update={"batch_size": 4}))
    n_found = len([p for p in digits_folder().glob("*.png") if p.name.split("_")[0] in ("1", "7")])
    n_valid, n_test = round(n_found * 0.2), round(n_found * 0.1)
    assert few.describe(exp.config.data) == (
        f"{n_found} images, 2 classes (digits); train 6, valid {n_valid}, test {n_test} "
        "(per_class 3: at most 3 training images of each class)")


def test_cached_digits_are_decoded_and_resized_once_as_fastai_would(write_experiments, monkeypatch) -> None:
    from fastai.data.transforms import ToTensor
    from fastai.vision.augment import Resize
    from fastai.vision.core import PILImage

    create = PILImage.create.__func__
    opened: list[Path] = []

    def counting_create(cls, fn, **kwargs):
        opened.append(Path(fn))
        return create(cls, fn, **kwargs)

    monkeypatch.setattr(PILImage, "create", classmethod(counting_create))
    exp = load_experiment(write_experiments())
    data = build_data(exp)
    (cache,) = [f for f in data.dls.train_ds.tls[0].tfms.fs if type(f).__name__ == "TensorCache"]
    pickled = len(pickle.dumps(cache))  # what an exported learner.pkl holds of it
    for _ in range(2):  # two epochs of both loaders
        for loader in (data.dls.train, data.dls.valid):
            for _batch in loader:
                pass
    items = set(data.splits.train) | set(data.splits.valid)
    # the training loader drops its last partial batch, so a few training items may be unseen yet
    assert len(opened) == len(set(opened)) and items - set(data.splits.train) <= set(opened) <= items
    assert len(opened) >= len(items) - exp.config.model.batch_size
    assert [type(t).__name__ for t in data.dls.train.after_item.fs] == ["ToTensor"]  # no Resize per item
    # what the model sees is what fastai's per-item Resize gives a training item
    sample = sorted(data.splits.train)[:3]
    cached = data.dls.train_ds.tls[0].tfms
    per_item = [ToTensor()(Resize(16)(create(PILImage, p), split_idx=0)) for p in sample]
    for path, expected in zip(sample, per_item):
        assert cached(path).dtype == expected.dtype and bool((cached(path) == expected).all())
    xb, _ = data.dls.one_batch()
    assert xb.dtype.is_floating_point and 0.0 <= float(xb.min()) and float(xb.max()) <= 1.0
    # the cache now holds ~270 tensors of 3x16x16 bytes; a pickled copy leaves them behind
    assert len(cache) >= len(items) - exp.config.model.batch_size
    assert len(pickle.dumps(cache)) == pickled
    kept = len(cache)
    cache(sorted(data.splits.test)[0])  # a file outside the data set is not kept
    assert len(cache) == kept


def test_split_fingerprint_is_order_free_and_sees_a_moved_item() -> None:
    root = Path("/data/pets")
    items = [root / "images" / f"breed{i % 37}_{i}.jpg" for i in range(7390)]
    splits = split_items(items, 0.2, 0.1, seed=42)
    fp = split_fingerprint(splits, root)
    shuffled = Splits(*(tuple(reversed(part)) for part in (splits.train, splits.valid, splits.test)))
    assert split_fingerprint(shuffled, root) == fp  # the order of the items does not matter
    assert (fp.train.n, fp.valid.n, fp.test.n) == (5173, 1478, 739)
    # named relative to the data folder: moving the folder keeps the fingerprint
    moved = Splits(*(tuple(Path("/elsewhere") / p.relative_to(root) for p in part)
                     for part in (splits.train, splits.valid, splits.test)))
    assert split_fingerprint(moved, Path("/elsewhere")) == fp
    assert fp.test_names() == {f"images/{p.name}" for p in splits.test}
    assert len(fp.model_dump_json()) < 10_000  # compact enough for a study attribute and best.yaml

    # one item moves from the validation split to the test split
    item = splits.valid[0]
    other = Splits(splits.train, splits.valid[1:], splits.test + (item,))
    changed = split_fingerprint(other, root)
    assert changed.train == fp.train and changed.valid != fp.valid and changed.test != fp.test
    assert fp.test_change(changed) == (1, 0) and changed.test_change(fp) == (0, 1)
    assert fp.changes(changed) == ["valid split 1478 -> 1477 items", "test split 739 -> 740 items (1 added, 0 removed)"]
    # same counts, other items: still a change
    swapped = Splits(splits.train, splits.valid[1:] + splits.test[:1], splits.test[1:] + (item,))
    assert fp.changes(split_fingerprint(swapped, root)) == [
        "valid split 1478 -> 1478 items, other items", "test split 739 -> 739 items (1 added, 1 removed)"]


def _pets_folder(root: Path, breeds: dict[str, int]) -> Path:
    images = root / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for breed, n in breeds.items():
        for i in range(1, n + 1):
            pixels = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(images / f"{breed}_{i}.jpg")
    return root


def test_pets_shaped_folder_labels_by_fastbook_regex(write_experiments, tmp_path: Path) -> None:
    _pets_folder(tmp_path / "pets", {"Abyssinian": 8, "great_pyrenees": 8, "Bengal": 8})
    path = write_experiments(data={"source": "pets", "path": "pets", "test_pct": 0.0, "limit": None,
                                   "augment": True, "item_size": 24}, model={"batch_size": 8})
    data = build_data(load_experiment(path))
    assert set(data.vocab) == {"Abyssinian", "great_pyrenees", "Bengal"}
    xb, _ = data.dls.one_batch()
    assert tuple(xb.shape[1:]) == (3, 16, 16)


def test_folder_with_parent_labels(write_experiments, tmp_path: Path) -> None:
    for cls in ("cats", "dogs"):
        (tmp_path / "mine" / cls).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (12, 12), (i * 20, 0, 0)).save(tmp_path / "mine" / cls / f"{i}.png")
    path = write_experiments(data={"source": "folder", "path": "mine", "label": "parent", "test_pct": 0.0,
                                   "limit": None}, model={"batch_size": 8})
    data = build_data(load_experiment(path))
    assert data.vocab == ("cats", "dogs")


def test_missing_folder_names_key(write_experiments) -> None:
    path = write_experiments(data={"source": "folder", "path": "nowhere", "label": "parent"})
    with pytest.raises(DataError, match="data.path.*folder not found"):
        build_data(load_experiment(path))


def test_regex_that_does_not_match(write_experiments, tmp_path: Path) -> None:
    _pets_folder(tmp_path / "pets", {"Abyssinian": 4})
    (tmp_path / "pets" / "images" / "README.png").write_bytes((tmp_path / "pets" / "images" / "Abyssinian_1.jpg").read_bytes())
    path = write_experiments(data={"source": "folder", "path": "pets", "label": "regex",
                                   "pattern": r"^(.+)_\d+\.jpg$", "limit": None})
    with pytest.raises(DataError, match=r"data.pattern.*1 file\(s\) do not match.*README.png") as info:
        build_data(load_experiment(path))
    assert r"'^(.+)_\d+\.jpg$'" in str(info.value)  # as written in the file, not a repr's doubled backslashes


def test_batch_larger_than_training_split(write_experiments) -> None:
    path = write_experiments(model={"batch_size": 512})
    with pytest.raises(DataError, match="model.batch_size.*512 is larger than the training split"):
        build_data(load_experiment(path))


@pytest.mark.parametrize(("given", "cache", "threads", "expected"), [
    (None, False, 3, 3),    # the worker's share of the cores (its torch threads)
    (None, False, 32, 8),   # at most 8
    (None, True, 4, 0),     # cached items are a lookup: no loader process
    (5, False, 2, 5),       # data.num_workers wins
    (2, True, 2, 2),
])
def test_loader_workers_follow_the_worker_share_of_the_cores(monkeypatch: pytest.MonkeyPatch, given: int | None,
                                                             cache: bool, threads: int, expected: int) -> None:
    import torch

    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    assert loader_workers(given, cache) == expected
