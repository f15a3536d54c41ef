"""The Python API (`import pet_sweep`): an experiment built in code, run, reported, exported."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest

from tests.conftest import TINY_SPACE, tiny_experiment


class EpochCounter:
    """An epoch listener a test can read back (in this process)."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []

    def __call__(self, number: int, record: Any) -> None:
        self.seen.append((number, record.epoch))


def test_import_pet_sweep_is_light_and_declares_its_api() -> None:
    code = ("import sys, pet_sweep; print(sorted(pet_sweep.__all__)); "
            "print([m for m in ('torch', 'fastai', 'mlflow', 'optuna') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["['Experiment', 'export', 'report', 'run']", "[]"]


def test_from_dict_needs_no_file_and_resolves_relative_paths_against_its_base(tmp_path: Path) -> None:
    import pet_sweep
    from pet_sweep.errors import ConfigError

    exp = pet_sweep.Experiment.from_dict({**tiny_experiment(), "sweep": dict(TINY_SPACE)}, "tiny", base_dir=tmp_path)
    assert exp.config_path is None and exp.name == "tiny"
    assert exp.storage_url == f"sqlite:///{tmp_path.resolve() / 'stores' / 'optuna.db'}"
    assert not list(tmp_path.iterdir())  # nothing written
    with pytest.raises(ConfigError, match=r"<from_dict>: experiment 'tiny': key 'budget.n_trials'"):
        pet_sweep.Experiment.from_dict({**tiny_experiment(budget={"n_trials": 0}), "sweep": dict(TINY_SPACE)}, "tiny")


def test_workers_receive_the_experiment_built_in_python_not_a_path(tmp_path: Path) -> None:
    import pet_sweep
    from pet_sweep.errors import ConfigError
    from pet_sweep.launch.local import EXPERIMENT_ENV, pack_experiment, unpack_experiment, worker_command
    from pet_sweep.sweep.budget import WorkerRole

    exp = pet_sweep.Experiment.from_dict({**tiny_experiment(), "sweep": dict(TINY_SPACE)}, "tiny", base_dir=tmp_path)
    exp = exp.with_overrides(n_trials=5)
    back, callbacks = unpack_experiment(pack_experiment(exp, (EpochCounter(),)))
    assert back == exp and back.config.budget.n_trials == 5 and isinstance(callbacks[0], EpochCounter)
    assert worker_command(exp, WorkerRole("abc", 0, 2, "run1", 1))[3:] == ["worker", WorkerRole(
        "abc", 0, 2, "run1", 1).encode(), "tiny"]  # no --config: the experiment is in $EXPERIMENT_ENV
    assert EXPERIMENT_ENV == "PET_SWEEP_WORKER_EXPERIMENT"
    with pytest.raises(ConfigError, match="must pickle"):
        pack_experiment(exp, (lambda number, record: None,))


@pytest.mark.train
@pytest.mark.slow
def test_a_notebook_cell_builds_runs_with_two_workers_and_reads_the_report(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pet_sweep

    monkeypatch.chdir(tmp_path)  # relative stores land in the notebook's folder
    exp = pet_sweep.Experiment.from_dict({**tiny_experiment(budget={"n_trials": 2}), "sweep": dict(TINY_SPACE)},
                                         "tiny")
    lines: list[str] = []
    result, study = pet_sweep.run(exp, workers=2, echo=lines.append)
    # no experiments or sweep file anywhere (MLflow's artifacts are the trials' own records)
    assert not [p for p in tmp_path.rglob("*.yaml") if "mlartifacts" not in p.parts]
    assert result.finished == 2 and len(study.trials) == 2
    # the supervisor's lines, each prefixed by its worker (on a loaded machine one worker can take both trials)
    prefixes = {line[:3] for line in lines if re.match(r"w\d\|", line)}
    assert prefixes and prefixes <= {"w0|", "w1|"}, lines
    analysis = pet_sweep.report(exp)
    assert analysis.study_name == "tiny" and len(analysis.trials) == 2 and analysis.counts.get("COMPLETE") == 2
    assert analysis.best.number in {t.number for t in study.trials}
    doc = pet_sweep.export(exp, pick="best")
    assert doc["source"]["picked_by"] == "best" and doc["source"]["trial"] == analysis.best.number


@pytest.mark.train
def test_run_in_process_hands_the_callbacks_to_every_trial(tmp_path: Path) -> None:
    from fastai.callback.core import Callback

    import pet_sweep

    class CountFits(Callback):
        def __init__(self) -> None:
            self.fits = 0

        def before_fit(self) -> None:
            self.fits += 1

    listener, fits = EpochCounter(), CountFits()
    exp = pet_sweep.Experiment.from_dict({**tiny_experiment(budget={"n_trials": 1}), "sweep": dict(TINY_SPACE)},
                                         "tiny", base_dir=tmp_path)
    optuna.logging.set_verbosity(optuna.logging.INFO)  # a notebook's default
    seen_levels: list[int] = []
    listener_levels = lambda number, record: seen_levels.append(optuna.logging.get_verbosity())  # noqa: E731
    result, study = pet_sweep.run(exp, callbacks=[listener, fits, listener_levels], echo=lambda line: None)
    assert result.finished == 1
    # Optuna's per-trial INFO lines are off while it runs (pet-sweep's echo says each trial once), then back
    assert set(seen_levels) == {optuna.logging.WARNING}
    assert optuna.logging.get_verbosity() == optuna.logging.INFO
    assert listener.seen == [(0, 0), (0, 1)]  # one frozen + one unfrozen epoch, numbered globally
    assert fits.fits == 2  # both phases


def test_no_submodule_hides_a_function_of_the_api() -> None:
    """Importing `pet_sweep.X` sets the package's attribute X: a module named like `run`, `report` or
    `export` would replace that function for every caller after it was first imported."""
    import pkgutil

    import pet_sweep

    # `report` is the one on purpose: a callable package (report/__init__.py)
    assert {m.name for m in pkgutil.iter_modules(pet_sweep.__path__)} & set(pet_sweep.__all__) == {"report"}
    assert all(callable(getattr(pet_sweep, name)) for name in pet_sweep.__all__)
