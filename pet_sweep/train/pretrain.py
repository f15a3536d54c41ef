"""`pet-sweep pretrain`: a body trained on one experiment's data, for another to fine-tune.

Offline there are no ImageNet weights, so a source experiment (digits 0-4) stands in
for ImageNet: pretraining trains the whole network from scratch on it (one cycle of
`pretrain.epochs` at `pretrain.lr`) and saves the full model's state dict in the
layout `model.weights` loads (torchvision's for a torchvision ResNet, the xresnet's
own for fastai's). A target experiment names the source with `model.pretrained_on`;
`vision_learner` cuts the body and puts a new head on it, so a body pretrained on
5 classes fine-tunes on 5 others.

A checkpoint lives in pet-sweep's cache (`data.cache_dir()/pretrained`), its name a
hash of the source data (its config and its train/valid item list), the
architecture, the image size, the seed and the pretraining recipe: asking twice
trains once. Each pretraining is an MLflow run (role ``pretrain``) of the source
experiment; a JSON file beside the checkpoint keeps that run's id and the file's
sha256, which every fine-tune trial records.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from pet_sweep.config import Experiment, ModelConfig, load_experiment
from pet_sweep.errors import ConfigError
from pet_sweep.space import ARCHITECTURES
from pet_sweep.sweep.records import EpochRecord
from pet_sweep.tracking import Tracker
from pet_sweep.train.data import build_data, cache_dir, local_path

PRETRAIN_ROLE = "pretrain"
CHECKPOINT_ATTR = "checkpoint"  # trial user attribute: the Checkpoint a trial started from
# data settings that change how items are loaded, not which items or labels: not in the key
_NOT_IN_KEY = {"cache", "num_workers", "bad_images"}


@dataclass(frozen=True)
class Checkpoint:
    """A state dict a fine-tune starts from, and where it came from."""

    arch: str
    path: str
    sha256: str
    source: str | None = None   # the experiment it was pretrained on (None: a `model.weights` file)
    run_id: str | None = None   # its pretrain MLflow run

    def params(self) -> dict[str, str]:
        """What a trial logs as MLflow params."""
        found = {"checkpoint_sha256": self.sha256, "pretrained_on": self.source, "pretrain_run_id": self.run_id}
        return {k: v for k, v in found.items() if v is not None}

    def model(self, model: ModelConfig) -> ModelConfig:
        """The model settings of a trial that starts from this checkpoint."""
        return model.model_copy(update={"weights": self.path, "pretrained_on": None})


def starting_model(model: ModelConfig, checkpoints: Mapping[str, Checkpoint], arch: str) -> ModelConfig:
    """The model settings a learner of `arch` is built with (its checkpoint's weights, if any)."""
    found = checkpoints.get(arch)
    return model if found is None else found.model(model)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pretrainable(exp: Experiment, archs: Sequence[str], where: str) -> list[str]:
    """The architectures to pretrain: `archs`, or every ResNet of the space; others are refused."""
    wanted = list(archs) or [a for a in exp.space.architectures if a in ARCHITECTURES]
    others = [a for a in wanted if a not in ARCHITECTURES]
    if others or not wanted:
        raise ConfigError(f"pretraining trains the ResNets {', '.join(ARCHITECTURES)}; got "
                          f"{', '.join(others or exp.space.architectures)}", experiment=exp.name, key=where)
    return wanted


def checkpoint_spec(exp: Experiment, arch: str, data: Any) -> dict[str, Any]:
    """Everything the checkpoint depends on; its hash names the file."""
    cfg = exp.config
    names = [[f"{data.label(p)}/{p.name}" for p in part] for part in (data.splits.train, data.splits.valid)]
    return {"data": {k: v for k, v in cfg.data.model_dump(mode="json").items() if k not in _NOT_IN_KEY},
            "items": {"train": names[0], "valid": names[1]}, "arch": arch, "img_size": cfg.model.img_size,
            "batch_size": cfg.model.batch_size, "seed": cfg.seed, "recipe": cfg.pretrain.model_dump()}


def checkpoint_path(exp: Experiment, arch: str, data: Any) -> Path:
    key = hashlib.sha256(json.dumps(checkpoint_spec(exp, arch, data), sort_keys=True).encode()).hexdigest()
    return cache_dir() / "pretrained" / f"{arch}-{exp.config.model.img_size}px-seed{exp.config.seed}-{key[:16]}.pth"


def cached(path: Path) -> Checkpoint | None:
    """The checkpoint at `path` if it is there and is the file its record describes."""
    record = path.with_suffix(".json")
    if not (path.is_file() and record.is_file()):
        return None
    known = Checkpoint(**json.loads(record.read_text(encoding="utf-8")))
    return known if file_sha256(path) == known.sha256 else None


def pretrain(exp: Experiment, archs: Sequence[str] = (), *, echo: Callable[[str], None] = print,
             why: str = "") -> list[Checkpoint]:
    """Pretrain each architecture on `exp`'s data, or reuse its cached checkpoint."""
    archs = pretrainable(exp, archs, "--arch")
    data = build_data(exp)
    tracker = None
    done = []
    for arch in archs:
        path = checkpoint_path(exp, arch, data)
        found = cached(path)
        if found is None:
            echo(f"pretrain     {arch} on {exp.name}: no checkpoint yet, training it from scratch "
                 f"({exp.config.pretrain.epochs} epochs, {len(data.splits.train)} items){why}")
            tracker = tracker or Tracker(exp.tracking_uri, exp.tracking_experiment)
            found = _train(exp, arch, data, path, tracker, echo)
        else:
            echo(f"pretrained   {arch} on {exp.name}: reusing {path}")
        done.append(found)
    return done


def checkpoints_for(exp: Experiment, *, echo: Callable[[str], None] = print) -> dict[str, Checkpoint]:
    """The checkpoint each architecture of `exp`'s space starts from (none when it has neither
    `model.weights` nor `model.pretrained_on`). A missing `pretrained_on` checkpoint is
    pretrained first, and said so."""
    model = exp.config.model
    if model.weights is not None:
        path = local_path(model.weights)
        if not path.is_file():
            raise ConfigError(f"checkpoint not found: {path}", file=exp.where, experiment=exp.name,
                              key="model.weights")
        digest = file_sha256(path)
        return {arch: Checkpoint(arch, str(path), digest) for arch in exp.space.architectures}
    if model.pretrained_on is None:
        return {}
    source = load_experiment(exp.config_path, model.pretrained_on)
    archs = pretrainable(exp, exp.space.architectures, "model.pretrained_on")
    return {c.arch: c for c in pretrain(source, archs, echo=echo, why=f", before the sweep of {exp.name}")}


def find_checkpoint(weights: str, sha256: str | None, pretrained_on: str | None, *, file: str,
                    echo: Callable[[str], None] = print) -> Path:
    """The file `model.weights` names (`weights`), on this machine; where it is not there (or is
    another file), the one in pet-sweep's cache with the recorded `sha256`. Missing, it is a
    ConfigError saying what to run or copy, and which key to set."""
    path = local_path(weights)
    if path.is_file() and (sha256 is None or file_sha256(path) == sha256):
        return path
    found = _by_sha256(sha256) if sha256 else None
    if found is not None:
        echo(f"checkpoint   {found} (found by its sha256 {sha256[:16]} in pet-sweep's cache; "
             f"model.weights names {path})")
        return found
    if path.is_file():  # the same name, another file: a checkpoint pretrained again is not bit for bit the same
        echo(f"checkpoint   {path} is not the file the trial started from (its sha256 is not {sha256[:16]}): "
             "the replay may not reproduce the trial")
        return path
    shelf = cache_dir() / "pretrained"
    how = (f"run `pet-sweep pretrain {pretrained_on}` (with the sweep's experiments.yaml) to train it again, or "
           if pretrained_on else "")
    raise ConfigError(f"checkpoint not found: {path}" + (f" (nor any file with its sha256 {sha256[:16]} in {shelf})"
                                                        if sha256 else "")
                      + f"; {how}copy the file from the sweep's machine to {path}, or set `model.weights` to "
                        "where it is", file=file, key="model.weights")


def _by_sha256(sha256: str) -> Path | None:
    """A checkpoint in pet-sweep's cache with this content: its record says so and the file agrees
    (a file copied in without its record is hashed)."""
    shelf = cache_dir() / "pretrained"
    files = sorted(shelf.glob("*.pth")) if shelf.is_dir() else []
    # those whose record names the hash first: hashing every large file is the last resort
    for path in sorted(files, key=lambda p: _recorded_sha256(p) != sha256):
        if file_sha256(path) == sha256:
            return path
    return None


def _recorded_sha256(path: Path) -> str | None:
    try:
        return json.loads(path.with_suffix(".json").read_text(encoding="utf-8")).get("sha256")
    except (OSError, ValueError, AttributeError):
        return None


def _train(exp: Experiment, arch: str, data: Any, path: Path, tracker: Any,
           echo: Callable[[str], None]) -> Checkpoint:
    """One cycle from scratch on all the layers; the full model saved, one finished MLflow run."""
    from pet_sweep.train import recipe  # heavy: torch and fastai (`export` imports this module for Checkpoint)
    from pet_sweep.train.callbacks import EpochHistory, StopOnDivergence

    cfg = exp.config
    started = time.perf_counter()
    run_id = tracker.start_run(f"pretrain-{arch}", {"pet_sweep.role": PRETRAIN_ROLE, "arch": arch})
    tracker.log_params(run_id, {
        "arch": arch, "epochs": cfg.pretrain.epochs, "lr": cfg.pretrain.lr, "img_size": cfg.model.img_size,
        "batch_size": cfg.model.batch_size, "seed": cfg.seed, "data": cfg.data.source,
        "classes": ",".join(cfg.data.classes or []) or "all", "n_train": len(data.splits.train),
        "n_valid": len(data.splits.valid), "checkpoint": str(path)})

    def show(record: EpochRecord) -> None:
        echo(f"pretrain     {arch} epoch {record.epoch + 1}/{cfg.pretrain.epochs}  "
             f"error_rate {record.error_rate:.4f}  ({record.seconds:.1f}s)")

    recipe.reseed(data.dls, cfg.seed)
    workdir = tempfile.TemporaryDirectory(prefix="pet-sweep-")
    learn = recipe.create_learner(data.dls, arch, cfg.model.model_copy(update={"pretrained": False, "weights": None}),
                                  Path(workdir.name))
    status = "FAILED"
    try:
        _normalize_as_finetune(data.dls, arch)
        recipe.apply_precision(learn, cfg.model)
        history = EpochHistory([tracker.epoch_logger(run_id), show])
        learn.add_cbs([history, StopOnDivergence(history)])
        with learn.no_bar(), learn.no_logging():
            learn.fit_one_cycle(cfg.pretrain.epochs, cfg.pretrain.lr)
        found = _save(full_state_dict(learn.model[0], arch), path, arch, exp.name, run_id)
        tracker.update_sweep(run_id, {"error_rate": history.records[-1].error_rate,
                                      "duration_s": time.perf_counter() - started},
                             {"checkpoint_sha256": found.sha256})
        status = "FINISHED"
        return found
    finally:
        tracker.end_run(run_id, status)
        recipe.release(learn)
        workdir.cleanup()


def _normalize_as_finetune(dls: Any, arch: str) -> None:
    """Normalise inputs as the fine-tune will: `vision_learner` adds the architecture's
    (ImageNet) statistics when it loads weights, but not when it trains from scratch."""
    from fastai.data.transforms import Normalize  # heavy: fastai
    from fastai.vision.learner import model_meta

    from pet_sweep.train.recipe import resolve_arch

    stats = model_meta.get(resolve_arch(arch), {}).get("stats")
    if stats is not None and not any(isinstance(t, Normalize) for t in dls.after_batch.fs):
        dls.add_tfms([Normalize.from_stats(*stats)], "after_batch")


def full_state_dict(body: Any, arch: str) -> dict[str, Any]:
    """The state dict of the whole architecture with `body` (the learner's model[0]) in place:
    what `model.weights` loads. The layers after the body (pooling, a 1000-way `fc`) stay
    as initialised; `vision_learner` cuts them off again."""
    from pet_sweep.train.recipe import bare_model, resolve_arch  # heavy: torch and fastai

    full = bare_model(resolve_arch(arch))
    for target, trained in zip(full.children(), body.children()):  # create_body keeps the first children
        if type(target) is not type(trained):
            raise TypeError(f"{arch}: the body's {type(trained).__name__} does not match {type(target).__name__}")
        target.load_state_dict(trained.state_dict())
    return full.state_dict()


def _save(state: dict[str, Any], path: Path, arch: str, source: str, run_id: str) -> Checkpoint:
    """Write the checkpoint and its record; a crash leaves no file that `cached` would accept."""
    import torch  # heavy: out of `export`, which imports this module for Checkpoint

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    found = Checkpoint(arch, str(path), file_sha256(tmp), source, run_id)
    path.with_suffix(".json").write_text(json.dumps(asdict(found), indent=1), encoding="utf-8")
    os.replace(tmp, path)
    return found
