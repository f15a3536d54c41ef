"""The data path: pet-sweep's digits DataLoaders (each image kept as the resized tensor the
model sees) against the hand-written fastai DataBlock (decode and Resize per item, every
epoch), on the same split: seconds per training batch, interleaved, and whether the two
give the same validation batches.

    python -m bench.data_path [--epochs 5] [--img-size 32]
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import default_digits, digits_space, experiment_in, hand_written_dls, machine, median, temp_dir


def seconds_per_batch(dls) -> float:  # noqa: ANN001 - fastai DataLoaders
    started, n = time.perf_counter(), 0
    for _batch in dls.train:
        n += 1
    return (time.perf_counter() - started) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--img-size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(2)
    from pet_sweep.train.data import build_data

    base = default_digits()
    experiment = {**base, "model": {**base["model"], "img_size": args.img_size}}
    exp = experiment_in(temp_dir("data-path"), experiment, digits_space())
    ours = build_data(exp).dls
    theirs = hand_written_dls(args.img_size, exp.config.model.batch_size)
    same = all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(ours.valid, theirs.valid))
    print(f"# data path: digits {args.img_size}px, batch {exp.config.model.batch_size}, {machine()}")
    print(f"validation batches identical: {same}")
    print("epoch | pet-sweep s/batch | hand-written s/batch | ratio")
    ratios = []
    for epoch in range(args.epochs):  # epoch 0 also fills pet-sweep's cache
        a, b = seconds_per_batch(ours), seconds_per_batch(theirs)
        ratios.append(a / b)
        print(f"{epoch} | {a:.4f} | {b:.4f} | {a / b:.3f}", flush=True)
    print(f"median ratio after the first epoch: {median(ratios[1:]):.3f}")


if __name__ == "__main__":
    main()
