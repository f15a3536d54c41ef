"""experiments.yaml validation: good files load, each kind of mistake names file, experiment and key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pet_sweep.config import load_experiment, resolve_url
from pet_sweep.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_experiments_all_load() -> None:
    for name in ("digits", "pets", "my-images"):
        exp = load_experiment(ROOT / "experiments.yaml", name)
        assert exp.name == name and exp.study_name == name
    default = load_experiment(ROOT / "experiments.yaml")
    assert default.name == "digits"
    assert default.config.data.test_pct > 0  # the report's final check needs a held-out split
    pets = load_experiment(ROOT / "experiments.yaml", "pets")
    assert pets.config.model.precision == "fp16" and pets.config.model.img_size == 224
    assert set(pets.space.params["arch"].choices) == {"resnet18", "resnet34", "resnet50"}


def test_relative_sqlite_urls_resolve_against_the_file(write_experiments) -> None:
    path = write_experiments()
    exp = load_experiment(path)
    assert exp.storage_url == f"sqlite:///{path.parent / 'stores' / 'optuna.db'}"
    assert resolve_url("sqlite:////abs/x.db", Path("/elsewhere")) == "sqlite:////abs/x.db"
    assert resolve_url("postgresql://u:p@h/db", Path("/x")) == "postgresql://u:p@h/db"


def test_overrides_apply(write_experiments) -> None:
    exp = load_experiment(write_experiments()).with_overrides(
        n_trials=7, storage="sqlite:////tmp/o.db", tracking_uri="sqlite:////tmp/m.db", study_name="s2")
    assert exp.config.budget.n_trials == 7
    assert exp.storage_url == "sqlite:////tmp/o.db" and exp.tracking_uri == "sqlite:////tmp/m.db"
    assert exp.study_name == "s2"


def _error(path: Path, name: str | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_experiment(path, name)
    return info.value


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "experiments.yaml"
    path.write_text("experiments:\n  a: [1, 2\n")
    err = _error(path)
    assert str(path) in str(err) and "malformed YAML" in str(err) and "line" in str(err)


def test_missing_file(tmp_path: Path) -> None:
    err = _error(tmp_path / "nope.yaml")
    assert "file not found" in str(err) and "nope.yaml" in str(err)


def test_unknown_key_lists_valid_keys(write_experiments) -> None:
    path = write_experiments(model={"img_size": 16, "batch_size": 32, "pretrained": False, "bacth": 3})
    err = _error(path)
    assert err.experiment == "tiny" and err.key == "model.bacth"
    assert "unknown key 'bacth'" in str(err) and "batch_size" in str(err) and str(path) in str(err)


def test_wrong_type_names_key_and_value(write_experiments) -> None:
    err = _error(write_experiments(model={"batch_size": "many"}))
    assert err.key == "model.batch_size" and "'many'" in str(err)


def test_unknown_experiment_lists_valid_ones(write_experiments) -> None:
    err = _error(write_experiments(), "nope")
    assert "unknown experiment 'nope'" in str(err) and "tiny" in str(err)


def test_valid_plus_test_must_leave_training_data(write_experiments) -> None:
    err = _error(write_experiments(data={"valid_pct": 0.6, "test_pct": 0.5}))
    assert err.key == "data" and "valid_pct + test_pct" in str(err)


def test_folder_needs_a_path(write_experiments) -> None:
    err = _error(write_experiments(data={"source": "folder"}))
    assert "needs `path`" in str(err)


@pytest.mark.parametrize("space, key, words", [
    ({"arch": "resnet18", "base_lr": 0.01, "lr_hi": 0.01, "lr_lo": 0.1, "freeze_epochs": 1, "epochs": 1},
     "lr_lo", "lr_lo <= lr_hi"),
    ({"arch": "resnet18", "base_lr": {"low": 0.1, "high": 0.01}, "lr_hi": 0.01, "lr_mult": 10,
      "freeze_epochs": 1, "epochs": 1}, "base_lr", "low <= high"),
    ({"arch": "resnet18", "base_lr": {"low": 0, "high": 0.01, "log": True}, "lr_hi": 0.01, "lr_mult": 10,
      "freeze_epochs": 1, "epochs": 1}, "base_lr.low", "> 0"),
    ({"arch": "resnet17", "base_lr": 0.01, "lr_hi": 0.01, "lr_mult": 10, "freeze_epochs": 1, "epochs": 1},
     "arch", "unknown architecture 'resnet17'"),
    ({"arch": {"choices": ["resnet18", "vgg99"]}, "base_lr": 0.01, "lr_hi": 0.01, "lr_mult": 10,
      "freeze_epochs": 1, "epochs": 1}, "arch.choices[1]", "resnet34"),
    ({"arch": "resnet18", "base_lr": 0.01, "lr_hi": 0.01, "lr_mult": 10, "freeze_epochs": -1, "epochs": 1},
     "freeze_epochs", ">= 0"),
    ({"arch": "resnet18", "base_lr": 0.01, "lr_hi": 0.01, "lr_mult": 10, "freeze_epochs": 1, "epochs": 1,
      "momentum": 0.9}, "momentum", "unknown parameter"),
    ({"arch": "resnet18", "base_lr": 0.01, "lr_hi": 0.01, "freeze_epochs": 1, "epochs": 1},
     "lr_lo", "exactly one of"),
    ({"arch": "resnet18", "base_lr": {"low": 0.001, "hi": 0.1}, "lr_hi": 0.01, "lr_mult": 10,
      "freeze_epochs": 1, "epochs": 1}, "base_lr", "high"),
])
def test_bad_search_space(write_experiments, space: dict, key: str, words: str) -> None:
    path = write_experiments(space=space)
    err = _error(path)
    assert err.experiment == "tiny"
    assert err.key is not None and err.key.startswith(key), err.key
    assert words in str(err), str(err)
    assert "tiny.yaml" in str(err)  # the space file is named, not experiments.yaml


def test_yaml_exponent_without_dot_is_accepted(write_experiments, tmp_path: Path) -> None:
    path = write_experiments()
    (tmp_path / "sweeps" / "tiny.yaml").write_text(
        "arch: resnet18\nbase_lr: 1e-3\nlr_hi: {low: 1e-4, high: 1e-2, log: true}\nlr_mult: 10\n"
        "freeze_epochs: 0\nepochs: 2\n")
    space = load_experiment(path).space
    assert space.params["base_lr"] == pytest.approx(1e-3)
    assert space.bounds("lr_hi") == (pytest.approx(1e-4), pytest.approx(1e-2))


def test_inline_sweep(write_experiments) -> None:
    path = write_experiments(sweep={"arch": "resnet18", "base_lr": 0.01, "lr_hi": 0.01, "lr_lo": 0.001,
                                    "freeze_epochs": 0, "epochs": 1})
    exp = load_experiment(path)
    assert exp.space.params["lr_lo"] == pytest.approx(0.001)
    bad = write_experiments(sweep={"arch": "resnet18"})
    err = _error(bad)
    assert err.key is not None and err.key.startswith("sweep.")


def test_default_must_exist(tmp_path: Path, write_experiments) -> None:
    path = write_experiments()
    doc = yaml.safe_load(path.read_text())
    doc["default"] = "ghost"
    path.write_text(yaml.safe_dump(doc))
    err = _error(path)
    assert err.key == "default" and "ghost" in str(err)
