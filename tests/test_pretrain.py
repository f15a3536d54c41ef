"""Offline transfer: `pet-sweep pretrain`, `model.pretrained_on`, and data selection (classes, per_class)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable

import optuna
import pytest
import torch
import yaml
from click.testing import CliRunner
from mlflow import MlflowClient

from pet_sweep.cli import cli
from pet_sweep.config import load_experiment
from pet_sweep.errors import ConfigError
from pet_sweep.train.data import build_data, local_path, portable_path
from pet_sweep.train.pretrain import CHECKPOINT_ATTR, file_sha256, find_checkpoint

SOURCE_CLASSES = ["0", "1", "2", "3", "4"]
TARGET_CLASSES = [5, 6, 7, 8, 9]  # numbers, as a user writes them in YAML


def _source(**data: Any) -> dict[str, Any]:
    """A tiny digits-source: 0-4, two archs, one pretraining epoch."""
    return {
        "data": {"source": "digits", "valid_pct": 0.2, "limit": 150, "split_seed": 1,
                 "classes": SOURCE_CLASSES, **data},
        "model": {"img_size": 16, "batch_size": 32, "pretrained": False},
        "sweep": {"arch": {"choices": ["resnet18", "xresnet18"]}, "base_lr": 1e-2, "lr_hi": 1e-2,
                  "lr_mult": 10, "freeze_epochs": 1, "epochs": 1},
        "pretrain": {"epochs": 1, "lr": 1e-2},
        "storage": "sqlite:///stores/optuna.db",
        "tracking": {"uri": "sqlite:///stores/mlflow.db"},
    }


def _target(**data: Any) -> dict[str, Any]:
    """digits 5-9, few training items per class, most of the rest held out; fine-tunes the source."""
    return {"data": {"source": "digits", "valid_pct": 0.2, "test_pct": 0.5, "split_seed": 1,
                     "limit": 200, "classes": TARGET_CLASSES, "per_class": 6, **data},
            "model": {"img_size": 16, "batch_size": 8, "pretrained_on": "source"}}


def _transfer(write: Callable[..., Path], archs: list[str], seed: int) -> Path:
    """Source and target in one file; `seed` keeps each test's checkpoints apart (the cache is shared)."""
    return write(extra={"source": {**_source(), "seed": seed}},
                 space={"arch": {"choices": archs}, "base_lr": 1e-2, "lr_hi": 1e-2, "lr_mult": 10,
                        "freeze_epochs": 1, "epochs": 1},
                 budget={"n_trials": 2}, **_target())


@pytest.fixture
def transfer(write_experiments: Callable[..., Path]) -> Path:
    return _transfer(write_experiments, ["resnet18", "xresnet18"], seed=11)


def _invoke(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _runs(path: Path, experiment: str, role: str) -> list[Any]:
    client = MlflowClient(f"sqlite:///{path.parent / 'stores' / 'mlflow.db'}")
    found = client.get_experiment_by_name(f"pet-sweep/{experiment}")
    return [] if found is None else client.search_runs(
        [found.experiment_id], filter_string=f"tags.`pet_sweep.role` = '{role}'")


@pytest.mark.train
def test_pretrain_writes_checkpoints_that_model_weights_loads_and_reuses_them(transfer: Path) -> None:
    from pet_sweep.train.recipe import create_learner

    first = _invoke("pretrain", "source", "--config", str(transfer))
    assert first.exit_code == 0, first.output
    assert first.output.count("training it from scratch") == 2
    runs = _runs(transfer, "source", "pretrain")
    assert sorted(r.data.tags["arch"] for r in runs) == ["resnet18", "xresnet18"]
    paths = {r.data.tags["arch"]: Path(r.data.params["checkpoint"]) for r in runs}
    assert all(r.info.status == "FINISHED" and r.data.tags["checkpoint_sha256"] == file_sha256(paths[r.data.tags["arch"]])
               for r in runs)

    again = _invoke("pretrain", "source", "--config", str(transfer))
    assert again.exit_code == 0 and "training it" not in again.output and again.output.count("reusing") == 2
    assert len(_runs(transfer, "source", "pretrain")) == 2  # no new run: nothing trained

    # the body pretrained on 0-4 loads under a new head for 5-9 (both a torchvision and a fastai ResNet)
    target = load_experiment(transfer, "tiny")
    data = build_data(target)
    assert data.vocab == ("5", "6", "7", "8", "9")
    for arch, path in paths.items():
        state = torch.load(path, weights_only=True)
        model = target.config.model.model_copy(update={"weights": str(path), "pretrained_on": None})
        learn = create_learner(data.dls, arch, model, transfer.parent)
        body = learn.model[0]
        first_conv = next(m for m in body.modules() if isinstance(m, torch.nn.Conv2d))
        saved = state["conv1.weight" if arch == "resnet18" else "0.0.weight"]
        assert torch.equal(first_conv.weight, saved)
        assert learn.model[-1][-1].out_features == 5


@pytest.mark.train
def test_transfer_sweep_pretrains_first_and_records_the_checkpoint_on_every_trial(
        write_experiments: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    transfer = _transfer(write_experiments, ["xresnet18"], seed=12)
    result = _invoke("run", "--config", str(transfer))
    assert result.exit_code == 0, result.output
    assert "no checkpoint yet, training it from scratch" in result.output  # a missing checkpoint is said
    pretrained = {r.data.tags["arch"]: r for r in _runs(transfer, "source", "pretrain")}
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{transfer.parent / 'stores' / 'optuna.db'}")
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 2
    runs = {r.data.tags["optuna.trial"]: r for r in _runs(transfer, "tiny", "trial")}
    for trial in trials:
        checkpoint = trial.user_attrs[CHECKPOINT_ATTR]
        source_run = pretrained[trial.params["arch"]]
        assert checkpoint["sha256"] == file_sha256(Path(checkpoint["path"])) == \
            source_run.data.tags["checkpoint_sha256"]
        assert checkpoint["run_id"] == source_run.info.run_id and checkpoint["source"] == "source"
        params = runs[str(trial.number)].data.params
        assert params["checkpoint_sha256"] == checkpoint["sha256"]
        assert params["pretrain_run_id"] == source_run.info.run_id and params["pretrained_on"] == "source"

    # the exported config starts from the same file, with no source experiment to resolve
    best = transfer.parent / "best.yaml"
    assert _invoke("export", "--config", str(transfer), "-o", str(best)).exit_code == 0
    doc = yaml.safe_load(best.read_text())
    model, recorded = doc["model"], trials[0].user_attrs[CHECKPOINT_ATTR]
    # portable: the cache's place is left to the machine that reads it, no home folder written out
    assert model["weights"] == "$PET_SWEEP_CACHE/pretrained/" + Path(recorded["path"]).name, model
    assert "pretrained_on" not in model and os.environ["PET_SWEEP_CACHE"] not in best.read_text()
    assert doc["source"]["checkpoint"] == {"sha256": recorded["sha256"], "pretrained_on": "source",
                                           "run_id": recorded["run_id"]}
    # another machine, whose cache lacks it: `train` says what to run, before any training
    elsewhere = tmp_path / "elsewhere-cache"
    monkeypatch.setenv("PET_SWEEP_CACHE", str(elsewhere))
    missing = CliRunner().invoke(cli, ["train", str(best)])
    assert missing.exit_code == 2, missing.output
    assert "`pet-sweep pretrain source`" in missing.output and "`model.weights`" in missing.output
    assert str(elsewhere / "pretrained" / Path(recorded["path"]).name) in missing.output
    # the file copied there under another name: found by its recorded sha256, and the replay runs
    (elsewhere / "pretrained").mkdir(parents=True)
    (elsewhere / "pretrained" / "copied.pth").write_bytes(Path(recorded["path"]).read_bytes())
    replayed = _invoke("train", str(best))
    assert replayed.exit_code == 0, replayed.output
    assert f"{elsewhere / 'pretrained' / 'copied.pth'} (found by its sha256" in replayed.output
    monkeypatch.undo()
    # the LR finder probes the pretrained body too (no ImageNet download), reusing the checkpoint
    found = _invoke("lr-find", "--config", str(transfer), "--num-it", "30", "--out", str(transfer.parent / "lr"))
    assert found.exit_code == 0, found.output
    assert "reusing" in found.output and "lr-find-xresnet18" in found.output


def test_held_out_items_are_disjoint_and_per_class_trims_only_training(transfer: Path) -> None:
    source, target = (build_data(load_experiment(transfer, name)) for name in ("source", "tiny"))
    names = {part: {p.name for p in getattr(target.splits, part)} for part in ("train", "valid", "test")}
    source_names = {p.name for part in (source.splits.train, source.splits.valid, source.splits.test) for p in part}
    assert names["test"] and not names["test"] & (names["train"] | names["valid"] | source_names)
    assert not source_names & (names["train"] | names["valid"])
    assert {n.split("_")[0] for n in source_names} == set(SOURCE_CLASSES)
    per_label: dict[str, int] = {}
    for name in names["train"]:
        per_label[name.split("_")[0]] = per_label.get(name.split("_")[0], 0) + 1
    assert per_label == {str(c): 6 for c in TARGET_CLASSES}
    # the held-out and validation items are what they are without per_class: taken before the trim
    untrimmed = load_experiment(transfer, "tiny")
    cfg = untrimmed.config.model_copy(update={"data": untrimmed.config.data.model_copy(update={"per_class": None})})
    full = build_data(type(untrimmed)(untrimmed.name, cfg, untrimmed.space, untrimmed.config_path)).splits
    assert full.test == target.splits.test and full.valid == target.splits.valid
    assert set(target.splits.train) < set(full.train)


@pytest.mark.parametrize("command,overrides,extra,key,shown", [
    ("run", {"data": {"classes": [5, 42]}}, {}, "data.classes", "valid labels: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9"),
    ("pretrain", {}, {"source": {**_source(classes=["0", "seven"])}}, "data.classes", "'seven'"),
    ("run", {"data": {"per_class": 0}}, {}, "data.per_class", "greater than or equal to 1"),
    ("run", {"model": {"pretrained_on": "nowhere"}}, {}, "model.pretrained_on",
     "unknown experiment 'nowhere'; valid choices: source"),
    ("run", {"model": {"pretrained_on": "tiny"}}, {}, "model.pretrained_on", "valid choices: source"),
    ("run", {"model": {"pretrained_on": "source", "weights": "x.pth"}}, {}, "model", "not both"),
])
def test_bad_transfer_input_exits_2_naming_the_key(write_experiments: Callable[..., Path], command: str,
                                                   overrides: dict[str, Any], extra: dict[str, Any], key: str,
                                                   shown: str) -> None:
    target = _target()
    for section, values in overrides.items():
        target[section] = {**target[section], **values}
    path = write_experiments(extra={"source": _source(), **extra}, **target)
    result = CliRunner().invoke(cli, [command, "source" if command == "pretrain" else "tiny", "--config", str(path)])
    assert result.exit_code == 2, result.output
    assert f"key '{key}" in result.output and shown in result.output
    assert not (path.parent / "stores").exists()  # refused before any store was made


def test_a_checkpoint_is_found_by_its_sha256_in_whichever_cache_reads_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    here, there = tmp_path / "here", tmp_path / "there"
    monkeypatch.setenv("PET_SWEEP_CACHE", str(here))
    (here / "pretrained").mkdir(parents=True)
    saved = here / "pretrained" / "xresnet18-a.pth"
    saved.write_bytes(b"a state dict")
    sha = hashlib.sha256(b"a state dict").hexdigest()
    written = portable_path(saved)
    assert written == "$PET_SWEEP_CACHE/pretrained/xresnet18-a.pth" and portable_path("/elsewhere/w.pth") == \
        "/elsewhere/w.pth"
    lines: list[str] = []
    assert find_checkpoint(written, sha, "digits-source", file="best.yaml", echo=lines.append) == saved
    assert not lines
    # another machine's cache: the same text names its file; under another name, the hash finds it
    monkeypatch.setenv("PET_SWEEP_CACHE", str(there))
    assert local_path(written) == there / "pretrained" / "xresnet18-a.pth"
    (there / "pretrained").mkdir(parents=True)
    (there / "pretrained" / "other.pth").write_bytes(b"another state dict")
    (there / "pretrained" / "renamed.pth").write_bytes(b"a state dict")
    assert find_checkpoint(written, sha, "digits-source", file="best.yaml", echo=lines.append) == \
        there / "pretrained" / "renamed.pth"
    assert "found by its sha256" in lines[0]
    # nowhere: what to run, what to copy where, which key to set
    (there / "pretrained" / "renamed.pth").unlink()
    with pytest.raises(ConfigError) as missing:
        find_checkpoint(written, sha, "digits-source", file="best.yaml")
    text = str(missing.value)
    assert f"checkpoint not found: {there / 'pretrained' / 'xresnet18-a.pth'}" in text
    assert "run `pet-sweep pretrain digits-source`" in text and "`model.weights`" in text and "best.yaml" in text
