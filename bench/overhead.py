"""Orchestration overhead: the same fixed configurations trained (a) by pet-sweep
(Optuna storage, MLflow logging, enqueued trials, no pruning, same seed) and (b) by a
bare fastai script, side by side in one process, interleaved, several repetitions.

(b) is what a user would write by hand: a DataBlock over the PNG files, then the recipe
per configuration. (a) also builds its DataLoaders once, but keeps every image in memory
as the resized tensor the model sees. (c) is the bare script on (a)'s DataLoaders, so
a/c is the cost of the orchestration alone: the target (<= 1.03) is judged on the median
a/c of at least 5 interleaved repetitions, and "met" is printed only when that median
meets it (bench.profile shows where the orchestration's time goes). Both stores already
exist (as on every run after the first); the one-time cost of creating a fresh MLflow +
Optuna store is printed separately.

Part of (a)'s orchestration is measuring each trial's costs (`train.costs`: predict_ms,
params_m, ...), which runs inside `recipe.fine_tune` and so is counted as training by
bench.profile; it is printed as its own line, from each trial's `cost_measure_seconds`.
`--costs` measures only that, once, on one trial of xresnet18 and one of xresnet34.

`--checkpoints` times epoch checkpoints (`train.checkpoint`): the same enqueued configs run
by pet-sweep with none, with one after every epoch, and with `faults.checkpoint_max_share`'s
default alone (no `checkpoint_min_seconds`, whose default of 30 s saves none on digits), interleaved; it prints the median ratios, the seconds per
save (each trial's `checkpoint_seconds`) and the size of a checkpoint file. `--keep-winner` times
keeping the winner's model (`sweep.keep`) the same way, off against on, with the seconds its calls
took and the kept models' count and size in MLflow after each sweep.

    python -m bench.overhead [--reps 5] [--img-size 32]
    python -m bench.overhead --costs [--img-size 32]
    python -m bench.overhead --checkpoints [--reps 3] [--img-size 32]
    python -m bench.overhead --keep-winner [--reps 3] [--img-size 32]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable

import torch

from bench.common import default_digits, hand_written_dls, header, median, temp_dir, write_experiment

TARGET = 1.03

CONFIGS = [
    {"arch": "resnet18", "base_lr": 1e-2, "lr_hi": 5e-3, "lr_mult": 10.0, "freeze_epochs": 1, "epochs": 2},
    {"arch": "xresnet18", "base_lr": 5e-3, "lr_hi": 1e-2, "lr_mult": 3.0, "freeze_epochs": 0, "epochs": 3},
    {"arch": "resnet18", "base_lr": 3e-3, "lr_hi": 1e-2, "lr_mult": 20.0, "freeze_epochs": 1, "epochs": 3},
]
SPACE = {"arch": {"choices": ["resnet18", "xresnet18"]}, "base_lr": {"low": 1e-3, "high": 3e-2, "log": True},
         "lr_hi": {"low": 1e-3, "high": 3e-2, "log": True}, "lr_mult": {"low": 1, "high": 30, "log": True},
         "freeze_epochs": {"low": 0, "high": 1}, "epochs": {"low": 1, "high": 8}}


COST_ARCHS = ("xresnet18", "xresnet34")  # `--costs`: a shallower and a deeper net, bench.overhead's CONFIGS[1] else


def with_pet_sweep(path: Path, study_name: str) -> float:
    from pet_sweep.config import load_experiment
    from pet_sweep.sweep.loop import run_sweep
    from pet_sweep.sweep.storage import open_study

    exp = load_experiment(path).with_overrides(study_name=study_name, n_trials=len(CONFIGS))
    study = open_study(exp)  # enqueueing is the user's setup, not the sweep's
    for params in CONFIGS:
        study.enqueue_trial(params)
    started = time.perf_counter()
    run_sweep(exp, echo=lambda line: None)
    return time.perf_counter() - started


def measurement_seconds(path: Path, study_names: list[str]) -> list[tuple[str, float, float]]:
    """(arch, seconds spent measuring its costs, seconds of the whole trial) of each completed trial
    of those studies; a study that is not there (a faked sweep) gives none."""
    from optuna.trial import TrialState

    from pet_sweep.config import load_experiment
    from pet_sweep.errors import StudyError
    from pet_sweep.sweep.records import COST_SECONDS_ATTR, PARAMS_ATTR
    from pet_sweep.sweep.storage import open_study

    rows = []
    for name in study_names:
        try:
            study = open_study(load_experiment(path).with_overrides(study_name=name), create=False)
        except StudyError:
            continue
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if COST_SECONDS_ATTR in t.user_attrs and t.duration is not None:
                rows.append((t.user_attrs[PARAMS_ATTR]["arch"], float(t.user_attrs[COST_SECONDS_ATTR]),
                             t.duration.total_seconds()))
    return rows


def cost_measurement(folder: Path, experiment: dict[str, Any], epochs: int) -> None:
    """`--costs`: one trial of each of COST_ARCHS; what measuring its costs took, and its share of the trial."""
    from pet_sweep.config import load_experiment
    from pet_sweep.sweep.loop import run_sweep
    from pet_sweep.sweep.storage import open_study

    space = {**SPACE, "arch": {"choices": list(COST_ARCHS)}}
    path = write_experiment(folder, {**experiment, "budget": {"n_trials": len(COST_ARCHS)}}, space)  # no timeout
    exp = load_experiment(path).with_overrides(study_name="costs")
    study = open_study(exp)
    for arch in COST_ARCHS:
        study.enqueue_trial({**CONFIGS[1], "arch": arch, "epochs": epochs})
    run_sweep(exp, echo=lambda line: None)
    print("arch | measuring costs s | trial s | share of the trial")
    for arch, measuring, trial in measurement_seconds(path, ["costs"]):
        print(f"{arch} | {measuring:.2f} | {trial:.1f} | {100 * measuring / trial:.1f} %")


CHECKPOINT_ARMS = {"none": {"faults": {"checkpoint_every": 0}},
                   "every epoch": {"faults": {"checkpoint_min_seconds": 0, "checkpoint_max_share": 1.0}},
                   "share rule": {"faults": {"checkpoint_min_seconds": 0}}}  # faults.checkpoint_max_share's default alone
KEEP_ARMS = {"keep off": {"keep_winner": False}, "keep on": {"keep_winner": True}}


def compare_arms(folder: Path, experiment: dict[str, Any], reps: int, arms: dict[str, dict[str, Any]],
                 spent: Callable[[Path, str], float]) -> dict[str, Path]:
    """CONFIGS run by pet-sweep once per arm (`experiment` with the arm's settings) and repetition,
    each arm first in turn; prints each run's seconds, its ratio to the first arm, and the medians.
    `spent(path, study)`: the seconds of that run the arm's own work took. The arms' experiments files."""
    paths = {arm: write_experiment(folder / arm.replace(" ", "-"), {**experiment, **settings}, SPACE)
             for arm, settings in arms.items()}
    names = list(paths)
    times: dict[str, list[float]] = {arm: [] for arm in names}
    used: dict[str, float] = {arm: 0.0 for arm in names}
    with_pet_sweep(paths[names[0]], "warm-up")  # untimed: the data cache, imports
    print("rep | " + " | ".join(f"{arm} s" for arm in names) + " | "
          + " | ".join(f"{arm}/{names[0]}" for arm in names[1:]))
    for rep in range(reps):
        for arm in names[rep % len(names):] + names[:rep % len(names)]:
            times[arm].append(with_pet_sweep(paths[arm], f"arm-{rep}"))
            used[arm] += spent(paths[arm], f"arm-{rep}")
        row = [times[arm][-1] for arm in names]
        print(f"{rep} | " + " | ".join(f"{v:.1f}" for v in row) + " | "
              + " | ".join(f"{v / row[0]:.3f}" for v in row[1:]), flush=True)
    for arm in names[1:]:
        ratio = median([a / b for a, b in zip(times[arm], times[names[0]])])
        print(f"median {arm}/{names[0]} {ratio:.3f} over {reps} repetitions; its own work took {used[arm]:.1f}s in all")
    return paths


def checkpoint_cost(folder: Path, experiment: dict[str, Any], reps: int) -> None:
    """`--checkpoints`: CONFIGS run with no checkpoints, one after every epoch, and the share rule alone."""
    from optuna.trial import TrialState

    from pet_sweep.config import load_experiment
    from pet_sweep.sweep.resume import CHECKPOINT_SECONDS_ATTR, checkpoint_path
    from pet_sweep.sweep.storage import open_study
    from pet_sweep.train import checkpoint

    def saves(path: Path, name: str) -> float:  # the trials' checkpoint saves, as each recorded them
        study = open_study(load_experiment(path).with_overrides(study_name=name), create=False)
        return sum(t.user_attrs.get(CHECKPOINT_SECONDS_ATTR, 0.0)
                   for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))

    paths = compare_arms(folder, experiment, reps, CHECKPOINT_ARMS, saves)
    # one checkpoint of each arch alone: its file's size and what writing it takes
    from optuna.trial import FixedTrial

    from pet_sweep.space import suggest
    from pet_sweep.train import recipe
    from pet_sweep.train.data import build_data

    exp = load_experiment(paths["every epoch"])
    data = build_data(exp)
    for number, cfg in enumerate(CONFIGS[:2]):
        seconds: list[float] = []
        target = checkpoint_path(exp, 1000 + number)
        plan = checkpoint.CheckpointPlan(target, trial=1000 + number, max_share=1.0,
                                         on_saved=lambda n, s, seconds=seconds: seconds.append(s))
        params = suggest(exp.space, FixedTrial({**cfg, "freeze_epochs": 0, "epochs": 2}))
        recipe.fine_tune(data.dls, params, exp.config.model, seed=0, checkpoint=plan)
        print(f"{cfg['arch']}: checkpoint file {target.stat().st_size / 2**20:.0f} MiB, one save {seconds[0]:.2f}s")


def keep_cost(folder: Path, experiment: dict[str, Any], reps: int) -> None:
    """`--keep-winner`: CONFIGS run with `keep_winner` off and on; what keeping took (each
    `KeepWinner` call: save, upload, the superseded deleted) and what stays kept."""
    from pet_sweep.config import load_experiment
    from pet_sweep.sweep import keep
    from pet_sweep.tracking import experiment_id, kept_models

    calls: list[float] = []
    original = keep.KeepWinner.__call__

    def timed(self: Any, study: Any, trial: Any) -> None:
        started = time.perf_counter()
        try:
            original(self, study, trial)
        finally:
            calls.append(time.perf_counter() - started)

    def spent(path: Path, name: str) -> float:
        seconds = sum(calls)
        calls.clear()
        return seconds

    keep.KeepWinner.__call__ = timed
    try:
        paths = compare_arms(folder, experiment, reps, KEEP_ARMS, spent)
    finally:
        keep.KeepWinner.__call__ = original
    exp = load_experiment(paths["keep on"])
    kept = kept_models(exp.tracking_uri, experiment_id(exp.tracking_uri, exp.tracking_experiment))
    for rep in range(reps):
        models = kept.kept(f"arm-{rep}")
        size = sum(kept.size(m.run_id) for m in models)
        print(f"arm-{rep}: {len(CONFIGS)} trials, {len(models)} kept (at most {keep.BOUND}), "
              f"{size / 2**20:.1f} MiB in MLflow's artifacts")


def bare_fastai(img_size: int, batch_size: int, seed: int, dls: Any = None) -> float:
    """The recipe written by hand with fastai, on the same files and split.

    With `dls` (pet-sweep's own DataLoaders) only the orchestration differs from (a).
    """
    from fastai.callback.progress import ProgressCallback  # noqa: F401 (adds no_bar)
    from fastai.callback.schedule import fit_one_cycle  # noqa: F401
    from fastai.metrics import error_rate
    from fastai.torch_core import set_seed
    from fastai.vision.learner import vision_learner
    from fastai.vision.models.xresnet import xresnet18
    from torchvision.models import resnet18

    started = time.perf_counter()
    if dls is None:
        dls = hand_written_dls(img_size, batch_size)
    archs = {"resnet18": resnet18, "xresnet18": xresnet18}
    for cfg in CONFIGS:
        set_seed(seed, reproducible=True)
        learn = vision_learner(dls, archs[cfg["arch"]], pretrained=False, metrics=error_rate)
        with learn.no_bar(), learn.no_logging():
            if cfg["freeze_epochs"]:
                learn.freeze()
                learn.fit_one_cycle(cfg["freeze_epochs"], cfg["base_lr"])
            learn.unfreeze()
            learn.fit_one_cycle(cfg["epochs"], lr_max=slice(cfg["lr_hi"] / cfg["lr_mult"], cfg["lr_hi"]))
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions (the target needs >= 5)")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--limit", type=int, default=None, help="smoke runs only: digits images of (a) and (c); (b) always reads all, so a/b then means nothing")
    parser.add_argument("--costs", action="store_true", help="only time the cost measurement of one trial per "
                                                             f"architecture ({', '.join(COST_ARCHS)})")
    parser.add_argument("--epochs", type=int, default=CONFIGS[1]["epochs"], help="with --costs: epochs of each trial")
    parser.add_argument("--checkpoints", action="store_true", help="only time epoch checkpoints: none, after every "
                                                                   "epoch, and the share rule")
    parser.add_argument("--keep-winner", action="store_true", help="only time keeping the winner's model: off, on")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    from pet_sweep.sweep.storage import quiet_optuna
    from pet_sweep.tracking import Tracker

    quiet_optuna()
    base = default_digits()
    experiment = {**base, "model": {**base["model"], "img_size": args.img_size}, "pruner": {"name": "none"},
                  "data": {**base["data"], "limit": args.limit}}
    folder = temp_dir("overhead")
    if args.costs:
        print(header(f"overhead: measuring a trial's costs, digits {args.img_size}px ({args.limit or 'all'} images), "
                     f"{args.epochs} epoch(s) a trial"))
        cost_measurement(folder, experiment, args.epochs)
        return
    if args.checkpoints:
        epochs = sum(c["freeze_epochs"] + c["epochs"] for c in CONFIGS)
        print(header(f"overhead: epoch checkpoints, {len(CONFIGS)} enqueued configs ({epochs} epochs), digits "
                     f"{args.img_size}px ({args.limit or 'all'} images), {args.reps} interleaved repetitions"))
        checkpoint_cost(folder, experiment, args.reps)
        return
    if args.keep_winner:
        print(header(f"overhead: keeping the winner's model, {len(CONFIGS)} enqueued configs, digits "
                     f"{args.img_size}px ({args.limit or 'all'} images), {args.reps} interleaved repetitions"))
        keep_cost(folder, experiment, args.reps)
        return
    path = write_experiment(folder, experiment, SPACE)
    from pet_sweep.config import load_experiment
    from pet_sweep.sweep.storage import open_study

    exp = load_experiment(path)
    started = time.perf_counter()
    Tracker(exp.tracking_uri, exp.tracking_experiment)
    open_study(exp.with_overrides(study_name="warm-up"))
    cold = time.perf_counter() - started
    from pet_sweep.train.data import build_data

    shared = build_data(exp).dls  # (c): pet-sweep's DataLoaders, trained by the bare script
    bare_fastai(args.img_size, base["model"]["batch_size"], base["seed"])  # warm caches, imports
    epochs = sum(c["freeze_epochs"] + c["epochs"] for c in CONFIGS)
    print(header(f"overhead: {len(CONFIGS)} enqueued configs ({epochs} epochs), digits {args.img_size}px "
                 f"({args.limit or 'all'} images), {args.reps} interleaved repetitions"))
    print(f"# one-time store creation (MLflow + Optuna sqlite, first run only): {cold:.1f}s")
    times: dict[str, list[float]] = {"a": [], "b": [], "c": []}
    print("rep | (a) pet-sweep s | (b) bare fastai s | (c) bare, pet-sweep's DataLoaders s | a/b | a/c")
    for rep in range(args.reps):
        a = with_pet_sweep(path, f"overhead-{rep}")
        b = bare_fastai(args.img_size, base["model"]["batch_size"], base["seed"])
        c = bare_fastai(args.img_size, base["model"]["batch_size"], base["seed"], dls=shared)
        for key, value in zip("abc", (a, b, c)):
            times[key].append(value)
        print(f"{rep} | {a:.1f} | {b:.1f} | {c:.1f} | {a / b:.3f} | {a / c:.3f}", flush=True)
    measured = measurement_seconds(path, [f"overhead-{rep}" for rep in range(args.reps)])
    if measured:
        print(f"of (a): measuring each trial's costs took median {median([m for _, m, _ in measured]):.2f}s, "
              f"{100 * median([m / t for _, m, t in measured]):.1f} % of a trial")
    a_b = median([a / b for a, b in zip(times["a"], times["b"])])
    a_c = median([a / c for a, c in zip(times["a"], times["c"])])
    print(f"median: pet-sweep {median(times['a']):.1f}s, bare {median(times['b']):.1f}s, "
          f"bare on pet-sweep's DataLoaders {median(times['c']):.1f}s")
    print(f"ratio a/b {a_b:.3f} (against the hand-written DataBlock; not the target)")
    enough = args.reps >= 5
    verdict = ("met" if a_c <= TARGET else "not met") if enough else f"not judged ({args.reps} < 5 repetitions)"
    print(f"ratio a/c {a_c:.3f}, median of {args.reps} (the orchestration alone; target <= {TARGET}): {verdict}")


if __name__ == "__main__":
    main()
