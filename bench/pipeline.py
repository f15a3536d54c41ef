"""The Pets input pipeline in images per second per core: fastai's DataBlock as pet-sweep builds it
(decode, Resize 460 per item, aug_transforms to 224 per batch), and with the presized images cached.

    python -m bench.pipeline [--images 256] [--batch 32] [--repeats 3]

No network: the images are generated, Pets' size (500x375 JPEGs, quality 90) with texture
(random sinusoids and noise, 4 classes). One thread (`torch.set_num_threads(1)`, no DataLoader
workers), timed in CPU seconds of the process, so each figure is per core
(and less moved by other jobs on a shared machine than wall time). Per setting (uncached, cached), interleaved, median of the
repeats:
- item stage: what the CPU does per image before a batch reaches the device (uncached: decode,
  Resize 460, to tensor; cached: a look-up), plus collation into a batch;
- with batch aug on this CPU: the same plus `aug_transforms` run here (on a GPU machine they run
  on the GPU).
The cached pipeline is timed after its first epoch filled the cache (what every later epoch
and every later trial of the worker costs); its first epoch costs about what the uncached one does.
`images_per_second(...)` is the function bench.gpu_check calls.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import experiment_in, header, median, temp_dir
from bench.scale import CONFIG  # any fixed space: only the data is built

PETS_SIZE = (500, 375)
PATTERN = r"^(.+)_\d+\.jpg$"


def make_jpegs(folder: Path, n: int, size: tuple[int, int] = PETS_SIZE, classes: int = 4, seed: int = 0) -> Path:
    """`n` textured JPEGs named `c<k>_<i>.jpg` in `folder` (made once; a complete folder is reused)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.jpg"))) == n:
        return folder
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(n):
        pixels = np.zeros((h, w, 3), np.float32)
        for channel in range(3):
            for _ in range(3):  # a few waves of random direction and frequency per channel
                fx, fy, phase = rng.uniform(0.005, 0.08, 2).tolist() + [rng.uniform(0, 6.3)]
                pixels[..., channel] += np.sin(xx * fx + yy * fy + phase)
        pixels = (pixels / 6 + 0.5) * 255 + rng.normal(0, 12, pixels.shape)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        image.save(folder / f"c{i % classes}_{i}.jpg", quality=90)
    return folder


def pets_shaped(folder: Path, images: Path, *, cached: bool, batch: int, item_size: int = 460,
                img_size: int = 224) -> Any:
    """The DataLoaders pet-sweep builds for the `pets` experiment, on `images` (no DataLoader workers)."""
    from pet_sweep.train.data import build_data

    data = {"source": "folder", "path": str(images), "label": "regex", "pattern": PATTERN, "valid_pct": 0.2,
            "augment": True, "item_size": item_size, "cache": cached, "num_workers": 0}
    exp = experiment_in(folder, {"data": data, "model": {"img_size": img_size, "batch_size": batch,
                                                         "pretrained": False}}, CONFIG)
    return build_data(exp).dls


def _epoch(dl: Any, with_batch_tfms: bool) -> tuple[int, float]:
    """(images, CPU seconds of this process) of one pass over `dl`: the item stage and collation,
    and the batch transforms when asked. CPU time, not wall time: on a shared machine the wall
    clock counts the others' jobs too, and with one thread CPU seconds are core-seconds."""
    dl.before_iter()  # the split reaches the item transforms here, as when fastai iterates
    started, n = time.process_time(), 0
    for index in range(len(dl)):
        items = [dl.do_item(i) for i in range(index * dl.bs, min((index + 1) * dl.bs, dl.n))]
        batch = dl.do_batch(items)
        if with_batch_tfms:
            dl.after_batch(batch)
        n += len(items)
    return n, time.process_time() - started


def images_per_second(images: Path | None = None, *, n_images: int = 256, batch: int = 32, repeats: int = 3,
                      item_size: int = 460, img_size: int = 224) -> dict[str, float]:
    """Images per second on one core of the Pets pipeline, uncached and cached, item stage alone
    and with the batch augmentation on this CPU (medians of `repeats` interleaved epochs; the
    cached one after a first epoch that fills it). Keys: `uncached_items`, `uncached_with_aug`,
    `cached_items`, `cached_with_aug`; `cache_fill` is the cached pipeline's first epoch."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        folder = temp_dir("pipeline")
        images = images or make_jpegs(folder / "images", n_images)
        loaders = {name: pets_shaped(folder / name, images, cached=name == "cached", batch=batch,
                                     item_size=item_size, img_size=img_size).train
                   for name in ("uncached", "cached")}
        n, seconds = _epoch(loaders["cached"], False)
        out: dict[str, list[float]] = {"cache_fill": [n / seconds]}
        for _ in range(repeats):
            for name, dl in loaders.items():
                for aug in (False, True):
                    n, seconds = _epoch(dl, aug)
                    out.setdefault(f"{name}_{'with_aug' if aug else 'items'}", []).append(n / seconds)
        return {key: median(values) for key, values in out.items()}
    finally:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(header(f"bench.pipeline: {args.images} generated 500x375 JPEGs, train split, batch {args.batch}, "
                 f"1 thread, median of {args.repeats} interleaved epochs"), flush=True)
    rates = images_per_second(n_images=args.images, batch=args.batch, repeats=args.repeats)
    for key, rate in rates.items():
        print(f"{key:<20}{rate:>9.1f} images/s per core")
    print(f"cached / uncached, item stage: {rates['cached_items'] / rates['uncached_items']:.1f}x")


if __name__ == "__main__":
    main()
