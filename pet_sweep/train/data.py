"""DataLoaders for the three data sets: digits (embedded), pets (Oxford-IIIT Pet), folder.

Knows nothing of Optuna or MLflow. A process builds its DataLoaders once and every
trial of that process reuses them. With ``cache`` on (the default for digits) no
file is decoded twice: without augmentation each image is kept as the tensor the
model sees (decoded, resized, uint8), so an epoch only looks items up; with
augmentation the decoded images are kept and the random transforms still run.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from pydantic import BaseModel, ConfigDict

from pet_sweep.config import DataConfig, Experiment, ModelConfig
from pet_sweep.errors import ConfigError, DataError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
DIGITS_PATTERN = r"^(\d+)_\d+\.png$"
PETS_PATTERN = r"^(.+)_\d+.jpg$"  # fastbook's regex for Oxford-IIIT Pet file names


def cache_dir() -> Path:
    """Where pet-sweep keeps materialised data ($PET_SWEEP_CACHE, else ~/.cache/pet-sweep)."""
    return Path(os.environ.get("PET_SWEEP_CACHE") or Path.home() / ".cache" / "pet-sweep")


CACHE_PREFIX = "$PET_SWEEP_CACHE/"  # a path in a file that travels: inside whichever machine's cache reads it


def portable_path(path: str | Path) -> str:
    """`path` as a file that travels writes it: under the cache, relative to `CACHE_PREFIX`
    (no home folder spelled out); elsewhere, as it is."""
    try:
        inside = Path(path).expanduser().resolve().relative_to(cache_dir().expanduser().resolve())
    except ValueError:
        return str(path)
    return CACHE_PREFIX + inside.as_posix()


def local_path(text: str) -> Path:
    """The file a path written by `portable_path` (or by hand, with `~`) is on this machine."""
    if text.startswith(CACHE_PREFIX):
        return cache_dir() / text[len(CACHE_PREFIX):]
    return Path(text).expanduser()


def digits_folder(root: Path | None = None) -> Path:
    """scikit-learn's 1,797 8x8 digits as ``<label>_<n>.png`` files, written once.

    Written into a temporary folder and renamed into place, so a crash never leaves a
    half-written data set behind. Several processes may write it at once (workers, or
    benchmarks started together on a fresh machine): the first rename wins, and a complete
    folder is never removed, since another process may be reading it.
    """
    target = (root or cache_dir()) / "digits"
    if _complete_digits(target):
        return target
    from PIL import Image  # heavy: the data set is written once, then read from disk
    from sklearn.datasets import load_digits

    digits = load_digits()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".digits-", dir=target.parent))
    for n, (image, label) in enumerate(zip(digits.images, digits.target)):
        pixels = np.clip(image * (255.0 / 16.0), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(tmp / f"{label}_{n}.png")
    try:
        os.rename(tmp, target)  # atomic; refused when a folder with files is already there
    except OSError:
        if _complete_digits(target):  # another process got there first: use its folder
            shutil.rmtree(tmp)
            return target
        # an incomplete folder (not one pet-sweep renamed into place): set it aside, then rename
        stale = tmp.with_name(tmp.name + "-stale")  # unique, as mkdtemp's name is
        os.rename(target, stale)
        os.rename(tmp, target)
        shutil.rmtree(stale)
    return target


def _complete_digits(folder: Path) -> bool:
    return folder.is_dir() and len(list(folder.glob("*.png"))) == 1797


@dataclass(frozen=True)
class Splits:
    """A fixed, seeded partition of the items. `test` is never seen by any trial."""

    train: tuple[Path, ...]
    valid: tuple[Path, ...]
    test: tuple[Path, ...]


def split_items(items: list[Path], valid_pct: float, test_pct: float, seed: int) -> Splits:
    """Seeded split that depends only on the file names, not on listing order."""
    ordered = sorted(items, key=lambda p: p.name)
    order = np.random.default_rng(seed).permutation(len(ordered))
    n_test = int(round(len(ordered) * test_pct))
    n_valid = int(round(len(ordered) * valid_pct))
    pick = [ordered[i] for i in order]
    test, valid, train = pick[:n_test], pick[n_test:n_test + n_valid], pick[n_test + n_valid:]
    return Splits(tuple(train), tuple(valid), tuple(test))


class SplitPart(BaseModel):
    """One part of a split: how many items, and the SHA-256 of their sorted names, one a line."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n: int
    sha256: str


class SplitFingerprint(BaseModel):
    """What identifies a split, recorded in the study when a sweep starts and in best.yaml.

    Items are named by their path relative to the data folder, so the fingerprint
    survives moving the folder. The test items' names are kept too (sorted, one a line,
    zlib, base64: a few kB for Pets' ~740 test images), so that a change can be counted.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    train: SplitPart
    valid: SplitPart
    test: SplitPart
    test_items: str

    def test_names(self) -> set[str]:
        text = zlib.decompress(base64.b64decode(self.test_items)).decode("utf-8")
        return set(text.split("\n")) if text else set()

    def test_change(self, now: SplitFingerprint) -> tuple[int, int]:
        """(added, removed): test items in `now` and not in this one, and the reverse."""
        then_names, now_names = self.test_names(), now.test_names()
        return len(now_names - then_names), len(then_names - now_names)

    def changes(self, now: SplitFingerprint) -> list[str]:
        """What differs between this (recorded) split and `now`, one phrase per part."""
        out = []
        for part in ("train", "valid", "test"):
            a, b = getattr(self, part), getattr(now, part)
            if a == b:
                continue
            phrase = f"{part} split {a.n} -> {b.n} items"
            if part == "test":
                added, removed = self.test_change(now)
                phrase += f" ({added} added, {removed} removed)"
            out.append(phrase + ("" if a.n != b.n or part == "test" else ", other items"))
        return out


def split_fingerprint(splits: Splits, root: Path) -> SplitFingerprint:
    """The fingerprint of `splits`, whose items live under `root`; independent of item order."""

    def names(items: tuple[Path, ...]) -> list[str]:
        return sorted(p.relative_to(root).as_posix() if p.is_relative_to(root) else p.name for p in items)

    def part(items: tuple[Path, ...]) -> SplitPart:
        return SplitPart(n=len(items), sha256=hashlib.sha256("\n".join(names(items)).encode("utf-8")).hexdigest())

    packed = base64.b64encode(zlib.compress("\n".join(names(splits.test)).encode("utf-8"), 9)).decode("ascii")
    return SplitFingerprint(train=part(splits.train), valid=part(splits.valid), test=part(splits.test),
                            test_items=packed)


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def find_bad_images(paths: list[Path]) -> list[Path]:
    """Files that PIL cannot open and decode."""
    from PIL import Image  # heavy: only a folder's check needs it

    bad = []
    for path in paths:
        try:
            with Image.open(path) as img:
                img.load()
        except Exception:  # PIL raises many types for a corrupt file; all mean "unreadable"
            bad.append(path)
    return bad


def _source(data: DataConfig, exp: Experiment) -> tuple[Path, Callable[[Path], str], list[Path]]:
    """The image folder, the labelling function and the item list of a data config."""
    if data.source == "digits":
        folder = digits_folder()
        pattern: str | None = DIGITS_PATTERN
    elif data.source == "pets":
        given = exp.data_path()
        if given is None:
            from fastai.data.external import URLs, untar_data  # needs the network the first time

            given = untar_data(URLs.PETS)
        folder = given / "images" if (given / "images").is_dir() else given
        pattern = data.pattern or PETS_PATTERN
    else:
        folder = exp.data_path()
        pattern = data.pattern if data.label == "regex" else None
    if folder is None or not folder.is_dir():
        raise DataError(f"{exp.where}: experiment '{exp.name}': key 'data.path': "
                        f"folder not found: {folder}")
    items = image_files(folder)
    if pattern is None:
        def label(path: Path) -> str:
            return path.parent.name
    else:
        regex = re.compile(pattern)  # shown as written in messages, not as a repr with doubled backslashes

        def label(path: Path) -> str:
            match = regex.search(path.name)
            if match is None:
                raise DataError(f"file name {path.name!r} does not match the label pattern '{pattern}'")
            return match.group(1)

        unmatched = [p for p in items if regex.search(p.name) is None]
        if unmatched:
            raise DataError(f"{exp.where}: experiment '{exp.name}': key 'data.pattern': "
                            f"{len(unmatched)} file(s) do not match '{pattern}', first: {unmatched[0]}")
    if not items:
        raise DataError(f"{exp.where}: experiment '{exp.name}': no images found in {folder}")
    return folder, label, select_classes(items, label, data, exp)


def select_classes(items: list[Path], label: Callable[[Path], str], data: DataConfig,
                   exp: Experiment) -> list[Path]:
    """The items of `data.classes` (all items when it is not set); a label the data lacks is refused."""
    if data.classes is None:
        return items
    labels = sorted({label(p) for p in items})
    unknown = [c for c in data.classes if c not in labels]
    if unknown:
        raise ConfigError(f"unknown label(s) {', '.join(map(repr, unknown))}; valid labels: {', '.join(labels)}",
                          file=exp.where, experiment=exp.name, key="data.classes")
    wanted = set(data.classes)
    return [p for p in items if label(p) in wanted]


def trim_per_class(splits: Splits, label: Callable[[Path], str], per_class: int | None, seed: int) -> Splits:
    """At most `per_class` training items of each class (a seeded pick); valid and test stay as split.

    Called after `split_items`, so the held-out and validation items are the same
    whatever `per_class` is: a few-shot target is judged on as many items as a full one.
    """
    if per_class is None:
        return splits
    order = np.random.default_rng(seed).permutation(len(splits.train))
    kept: set[Path] = set()
    taken: dict[str, int] = {}
    for i in order:
        item = splits.train[i]
        name = label(item)
        if taken.get(name, 0) < per_class:
            taken[name] = taken.get(name, 0) + 1
            kept.add(item)
    return Splits(tuple(p for p in splits.train if p in kept), splits.valid, splits.test)


def check_images(items: list[Path], data: DataConfig, where: str) -> list[Path]:
    """Find unreadable images before any training; refuse or skip them as configured."""
    bad = find_bad_images(items)
    if not bad:
        return items
    first = ", ".join(str(p) for p in bad[:3])
    if data.bad_images == "refuse":
        raise DataError(f"{where}: {len(bad)} unreadable image(s), first: {first}; fix or remove them,"
                        " or set `data.bad_images: skip`")
    print(f"pet-sweep: skipping {len(bad)} unreadable image(s), first: {first}")
    bad_set = set(bad)
    return [p for p in items if p not in bad_set]


def check_data(exp: Experiment) -> int:
    """Check the data set without building DataLoaders (what a supervisor does before
    starting workers); return the number of usable images."""
    data = exp.config.data
    _, _, items = _source(data, exp)
    if data.source != "digits":
        items = check_images(items, data, f"{exp.where}: experiment '{exp.name}'")
    return len(items)


@dataclass(frozen=True)
class DataBundle:
    """What a worker builds once and every trial reuses."""

    dls: Any  # fastai DataLoaders
    splits: Splits
    vocab: tuple[str, ...]
    label: Callable[[Path], str]
    fingerprint: SplitFingerprint  # of `splits`: which items each part holds
    n_found: int = 0               # images found (of the chosen classes), before `data.limit`
    loader_workers: int = 0        # DataLoader processes (`loader_workers`)

    @property
    def n_valid(self) -> int:
        return len(self.splits.valid)

    def describe(self, data: DataConfig) -> str:
        """What was found and how it was split, counted from the splits themselves (one line)."""
        s = self.splits
        text = f"{self.n_found} images, {len(self.vocab)} classes ({data.source})"
        if data.limit and data.limit < self.n_found:
            text += f"; limit {data.limit}"
        text += f"; train {len(s.train)}, valid {len(s.valid)}, test {len(s.test)}"
        if data.per_class is not None:
            text += f" (per_class {data.per_class}: at most {data.per_class} training images of each class)"
        return text


def loader_workers(given: int | None, cache: bool) -> int:
    """DataLoader processes of one worker: `data.num_workers` where given; none for cached items
    (a lookup, cheaper than handing a batch between processes); else this worker's share of the
    cores (its torch threads, which the supervisor sets to cores // workers), at most 8. Each
    worker taking every core would start workers x cores loader processes, the oversubscription
    that "Threads per worker" in docs/benchmarks.md measured at 4-18x slower."""
    if given is not None:
        return given
    if cache:
        return 0
    import torch  # heavy: torch

    return min(8, max(1, torch.get_num_threads()))


def build_data(exp: Experiment, model: ModelConfig | None = None, device: Any = None) -> DataBundle:
    """Build the experiment's DataLoaders (train + valid); the test split is kept aside."""
    # heavy: fastai, imported here so `report` can read a split's fingerprint without it
    from fastai.data.block import CategoryBlock, DataBlock, TransformBlock
    from fastai.data.transforms import IndexSplitter, IntToFloatTensor
    from fastai.vision.augment import Resize, aug_transforms
    from fastai.vision.data import ImageBlock

    data, model = exp.config.data, model or exp.config.model
    folder, label, items = _source(data, exp)
    n_found = len(items)
    if data.limit:
        items = sorted(items, key=lambda p: p.name)
        items = [items[i] for i in np.random.default_rng(data.split_seed).permutation(len(items))[:data.limit]]
    if data.source != "digits":
        items = check_images(items, data, f"{exp.where}: experiment '{exp.name}'")
    splits = split_items(items, data.valid_pct, data.test_pct, data.split_seed)
    splits = trim_per_class(splits, label, data.per_class, data.split_seed)
    if len(splits.train) < model.batch_size:
        # fastai drops the last partial training batch: fewer items than a batch means no training at all
        raise DataError(f"{exp.where}: experiment '{exp.name}': key 'model.batch_size': "
                        f"{model.batch_size} is larger than the training split ({len(splits.train)} items)")
    cache = data.cache if data.cache is not None else data.source == "digits"
    num_workers = loader_workers(data.num_workers, cache)

    train_valid = list(splits.train) + list(splits.valid)
    x_block, item_tfms, batch_tfms = ImageBlock, [Resize(model.img_size)], None
    item_size = (data.item_size or int(model.img_size * 460 / 224)) if data.augment else model.img_size
    if data.augment:
        item_tfms = [Resize(item_size)]
        batch_tfms = aug_transforms(size=model.img_size, min_scale=0.75, do_flip=data.flip)
    if cache:
        # each image kept once per process, presized (uint8 at item_size), for every trial; the
        # random transforms, if any, run per batch on the device
        from pet_sweep.train.tensor_cache import TensorCache

        cached = TensorCache(item_size, keep=train_valid)
        x_block, item_tfms = TransformBlock(type_tfms=cached, batch_tfms=IntToFloatTensor), None
    valid_idx = list(range(len(splits.train), len(train_valid)))
    block = DataBlock(
        blocks=(x_block, CategoryBlock),
        get_y=label,
        splitter=IndexSplitter(valid_idx),
        item_tfms=item_tfms,
        batch_tfms=batch_tfms,
    )
    dls = block.dataloaders(train_valid, bs=model.batch_size, num_workers=num_workers, device=device)
    vocab = tuple(str(v) for v in dls.vocab)
    missing = sorted({label(p) for p in splits.valid} - set(vocab))
    if missing:
        raise DataError(f"{exp.where}: experiment '{exp.name}': classes {missing} appear only in the "
                        "validation split; use more data or a different split_seed")
    return DataBundle(dls=dls, splits=splits, vocab=vocab, label=label, fingerprint=split_fingerprint(splits, folder),
                      n_found=n_found, loader_workers=num_workers)
