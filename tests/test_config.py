"""experiments.yaml validation: good files load, each kind of mistake names file, experiment and key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pet_sweep.config import load_experiment, resolve_url
from pet_sweep.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_experiments_all_load() -> None:
    for name in ("digits", "digits-anchored", "digits-source", "digits-transfer", "pets", "my-images"):
        exp = load_experiment(ROOT / "experiments.yaml", name)
        assert exp.name == name and exp.study_name == name
    default = load_experiment(ROOT / "experiments.yaml")
    # the README's first command: chapter 5's transfer learning, offline
    assert default.name == "digits-transfer" and default.config.model.pretrained_on == "digits-source"
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
    # an experiment named on the command line needs no default: the bad one is not fatal then
    name = next(iter(doc["experiments"]))
    assert load_experiment(path, name).name == name


GOOD_SWEEP = "arch: resnet18\nbase_lr: 0.01\nlr_hi: 0.01\nlr_mult: 10\nfreeze_epochs: 0\nepochs: 1\n"
GOOD_EXPERIMENT = "  tiny:\n    data: {source: digits}\n    sweep: sweeps/tiny.yaml\n"


@pytest.mark.parametrize("experiments, sweep, words, key", [
    # a key given twice, at any depth: PyYAML alone would keep the last one silently
    ("experiments:\n" + GOOD_EXPERIMENT + GOOD_EXPERIMENT.replace("tiny:", "other:") + GOOD_EXPERIMENT,
     GOOD_SWEEP, "duplicate key 'tiny' at line 8 (first at line 2)", "experiments.tiny"),
    ("default: tiny\ndefault: tiny\nexperiments:\n" + GOOD_EXPERIMENT, GOOD_SWEEP,
     "duplicate key 'default' at line 2 (first at line 1)", "default"),
    ("experiments:\n  tiny:\n    data:\n      source: digits\n      limit: 100\n      limit: 200\n"
     "    sweep: sweeps/tiny.yaml\n", GOOD_SWEEP, "duplicate key 'limit' at line 6 (first at line 5)",
     "experiments.tiny.data.limit"),
    ("experiments:\n  tiny:\n    data: {source: digits, source: pets}\n    sweep: sweeps/tiny.yaml\n", GOOD_SWEEP,
     "duplicate key 'source' at line 3", "experiments.tiny.data.source"),
    ("experiments:\n" + GOOD_EXPERIMENT, GOOD_SWEEP + "epochs: 3\n",
     "duplicate key 'epochs' at line 7 (first at line 6)", "epochs"),
    ("experiments:\n" + GOOD_EXPERIMENT,
     GOOD_SWEEP.replace("base_lr: 0.01", "base_lr: {low: 0.001, low: 0.002, high: 0.1}"),
     "duplicate key 'low' at line 2", "base_lr.low"),
    ("experiments:\n  tiny:\n    data: {source: digits}\n    sweep:\n      arch: resnet18\n      arch: resnet34\n",
     GOOD_SWEEP, "duplicate key 'arch' at line 6", "experiments.tiny.sweep.arch"),
    # other shapes that are not an experiments file or a search space
    ("- tiny\n- other\n", GOOD_SWEEP, "must be a mapping with `experiments:`", None),
    ("", GOOD_SWEEP, "must be a mapping with `experiments:`", None),
    ("experiments:\n", GOOD_SWEEP, "valid dictionary, but got None", "experiments"),
    ("experiments: []\n", GOOD_SWEEP, "valid dictionary, but got []", "experiments"),
    ("experiments: {}\n", GOOD_SWEEP, "at least 1 item", "experiments"),
    ("experiments:\n  tiny:\n", GOOD_SWEEP, "experiment 'tiny': Input should be a valid dictionary", None),
    ("experiments:\n  tiny: [data, sweep]\n", GOOD_SWEEP, "experiment 'tiny': Input should be a valid dictionary",
     None),
    ("experiments:\n" + GOOD_EXPERIMENT, "", "a search space must be a mapping", None),
    ("experiments:\n" + GOOD_EXPERIMENT, "- arch\n- base_lr\n", "a search space must be a mapping", None),
    ("experiments:\n" + GOOD_EXPERIMENT, "arch: [resnet18\n", "malformed YAML at line", None),
    ("experiments:\n" + GOOD_EXPERIMENT + "---\nexperiments: {}\n", GOOD_SWEEP, "malformed YAML", None),
])
def test_bad_file_shapes_name_the_file_line_and_key(tmp_path: Path, experiments: str, sweep: str, words: str,
                                                   key: str | None) -> None:
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "tiny.yaml").write_text(sweep)
    path = tmp_path / "experiments.yaml"
    path.write_text(experiments)
    err = _error(path)
    assert words in str(err), str(err)
    assert (err.key or "").endswith(key or ""), err.key
    in_sweep = experiments.startswith("experiments:\n" + GOOD_EXPERIMENT) and sweep != GOOD_SWEEP
    assert (str(tmp_path / "sweeps" / "tiny.yaml") if in_sweep else str(path)) in str(err)


def test_a_duplicate_key_creates_nothing(write_experiments) -> None:
    from click.testing import CliRunner

    from pet_sweep.cli import cli
    from tests.conftest import tiny_experiment

    path = write_experiments()  # `experiments:` comes last: append a second `tiny` under it
    again = yaml.safe_dump({"tiny": tiny_experiment(budget={"n_trials": 5})}, sort_keys=False)
    path.write_text(path.read_text() + "".join("  " + line for line in again.splitlines(True)))
    for command in ("run", "report", "export", "list"):
        result = CliRunner().invoke(cli, [command, "--config", str(path)])
        assert result.exit_code == 2, result.output
        assert f"{path}: key 'experiments.tiny': duplicate key 'tiny' at line" in result.output, result.output
    assert sorted(p.name for p in path.parent.iterdir()) == ["experiments.yaml", "sweeps"]


def test_an_exported_config_with_a_duplicate_key_is_refused(tmp_path: Path) -> None:
    from pet_sweep.replay import load_replay

    path = tmp_path / "best.yaml"
    path.write_text("format: pet-sweep/replay-1\nname: x\ndata: {source: digits}\nmodel: {img_size: 16}\n"
                    "params: {arch: resnet18, base_lr: 0.01, lr_hi: 0.01, lr_lo: 0.001, freeze_epochs: 0,\n"
                    "         epochs: 1, epochs: 2}\n")
    with pytest.raises(ConfigError, match="duplicate key 'epochs' at line 6 .first at line 6.") as info:
        load_replay(path)
    assert info.value.key == "params.epochs" and info.value.file == str(path)


# -- a newcomer's first steps: errors that say what to do ------------------------------------------


def test_a_copied_experiments_file_names_the_sweep_key_and_the_rule(write_experiments, tmp_path: Path) -> None:
    original = write_experiments()
    copy = tmp_path / "elsewhere" / "experiments.yaml"
    copy.parent.mkdir()
    copy.write_text(original.read_text())  # copied without its sweeps/ folder
    err = _error(copy)
    assert (err.file, err.experiment, err.key) == (str(copy), "tiny", "sweep")
    assert f"{copy}: experiment 'tiny': key 'sweep': search space file not found: " \
           f"{copy.parent / 'sweeps' / 'tiny.yaml'}" in str(err)
    assert f"relative to the folder of the experiments file, {copy.parent}, not to the current folder" in str(err)


def test_a_missing_experiments_file_suggests_config_and_the_nearest_one_above(
        write_experiments, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from pet_sweep.cli import cli

    path = write_experiments()
    below = tmp_path / "runs" / "today"
    below.mkdir(parents=True)
    monkeypatch.chdir(below)
    result = CliRunner().invoke(cli, ["list"])
    assert result.exit_code == 2
    assert (f"Error: {below / 'experiments.yaml'}: file not found; give the experiments file with --config PATH "
            f"(the nearest above this folder: --config {path})") in result.output, result.output
    path.unlink()  # none anywhere above: --config alone
    err = _error(Path("experiments.yaml"))
    assert str(err).endswith(f"file not found; give the experiments file with --config PATH (none in {below} or "
                             "the folders above it)"), str(err)
    err = _error(tmp_path / "nope.yaml")  # a path given with --config: no search
    assert str(err) == f"{tmp_path / 'nope.yaml'}: file not found; give the experiments file with --config PATH"


def test_overrides_are_validated_by_the_file_models(write_experiments) -> None:
    exp = load_experiment(write_experiments())
    assert exp.with_overrides(n_trials=0).config.budget.n_trials == 0  # only the queued retries
    with pytest.raises(ConfigError, match=r"^--n-trials must be >= 0, but got -1$"):
        exp.with_overrides(n_trials=-1)
    with pytest.raises(ConfigError, match=r"^--timeout must be > 0 seconds, but got 0$"):
        exp.with_overrides(timeout=0.0)
    pruned = load_experiment(write_experiments(pruner={"name": "wilcoxon", "p_threshold": 0.2}))
    assert pruned.with_overrides(storage="sqlite:////tmp/o.db").config.pruner == pruned.config.pruner
    err = _error(write_experiments(budget={"n_trials": 0}))  # 0 is for the command line, not the file
    assert err.key == "budget.n_trials" and "greater than or equal to 1, but got 0" in str(err)


def test_launch_names_the_engine_and_refuses_ray_settings_for_local_workers(write_experiments) -> None:
    exp = load_experiment(write_experiments(launch={"engine": "ray", "address": "auto", "gpus_per_worker": 0.5,
                                                    "cpus_per_worker": 2}))
    launch = exp.config.launch
    assert (launch.engine, launch.address, launch.gpus_per_worker, launch.cpus_per_worker) == ("ray", "auto", 0.5, 2)
    assert load_experiment(write_experiments()).config.launch.engine == "local"
    err = _error(write_experiments(launch={"address": "auto"}))
    assert "launch" in str(err) and "address: settings of engine 'ray', but the engine is 'local'" in str(err)
    err = _error(write_experiments(launch={"engine": "slurm"}))
    assert "launch.engine" in str(err) and "slurm" in str(err)
