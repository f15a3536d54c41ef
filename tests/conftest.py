"""Shared fixtures: tiny digits experiments in a temporary folder, CPU only."""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

os.environ.setdefault("MPLBACKEND", "Agg")

# A tiny, fast experiment: 300 digits at 16 px, one frozen + one unfrozen epoch.
TINY_SPACE: dict[str, Any] = {
    "arch": "resnet18",
    "base_lr": 1.0e-2,
    "lr_hi": 1.0e-2,
    "lr_mult": 10,
    "freeze_epochs": 1,
    "epochs": 1,
}


def trains(fixture: Callable[..., Any]) -> Callable[..., Any]:
    """Under `@pytest.fixture`: the fixture trains (once for its scope), so every test that uses it
    must be marked `train`, not only the first, which pays for it."""
    fixture.trains = True  # type: ignore[attr-defined]
    return fixture


def tiny_experiment(**overrides: Any) -> dict[str, Any]:
    exp: dict[str, Any] = {
        "data": {"source": "digits", "valid_pct": 0.2, "test_pct": 0.1, "limit": 300, "split_seed": 1},
        "model": {"img_size": 16, "batch_size": 32, "pretrained": False},
        "sweep": "sweeps/tiny.yaml",
        "budget": {"n_trials": 2},
        "sampler": {"name": "random", "seed": 0},
        "storage": "sqlite:///stores/optuna.db",
        "tracking": {"uri": "sqlite:///stores/mlflow.db"},
        "seed": 0,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(exp.get(key), dict):
            exp[key] = {**exp[key], **value}
        else:
            exp[key] = value
    return exp


@pytest.fixture(scope="session", autouse=True)
def _shared_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """One materialised digits folder for the whole session; torch on few threads."""
    os.environ["PET_SWEEP_CACHE"] = str(tmp_path_factory.mktemp("pet-sweep-cache"))
    # A temporary folder of this test process's own (short, for Ray's socket paths): pet-sweep's
    # lock files live in it, and `list` in another pytest-xdist worker would otherwise clean a
    # lock file the test in this one is about to look for.
    os.environ["TMPDIR"] = tempfile.mkdtemp(prefix="ps-")
    tempfile.tempdir = None  # gettempdir() reads TMPDIR again
    try:
        import torch

        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    except ImportError:
        pass


def write_experiments_file(folder: Path, space: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
                           **overrides: Any) -> Path:
    """Write experiments.yaml (default `tiny`, with `overrides`) and sweeps/tiny.yaml (`space`, default
    TINY_SPACE) into `folder`; `extra`: more experiments by name. Returns the experiments file."""
    (folder / "sweeps").mkdir(exist_ok=True)
    (folder / "sweeps" / "tiny.yaml").write_text(yaml.safe_dump(space or TINY_SPACE))
    doc = {"default": "tiny", "experiments": {"tiny": tiny_experiment(**overrides), **(extra or {})}}
    path = folder / "experiments.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture
def write_experiments(tmp_path: Path) -> Callable[..., Path]:
    """`write_experiments_file` into tmp_path: ``write_experiments(space={...}, extra={name: experiment},
    **overrides of tiny)``."""
    return functools.partial(write_experiments_file, tmp_path)


@pytest.fixture(autouse=True)
def _close_database_connections(request: pytest.FixtureRequest) -> Any:
    """After a test on a database server, close the connections its stores left in this process.

    Optuna's RDBStorage keeps a connection pool per storage until it is garbage-collected;
    over a whole session the PostgreSQL tests would hold more connections than the server's
    100 allows ("too many clients already").
    """
    yield
    if not any(request.node.get_closest_marker(name) for name in ("postgres", "mysql")):
        return
    import gc

    import sqlalchemy

    gc.collect()
    for obj in gc.get_objects():
        if isinstance(obj, sqlalchemy.engine.Engine):
            obj.dispose()


@pytest.fixture(scope="session")
@trains
def finished_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """experiments.yaml of a finished two-trial tiny study, trained once for the session.

    Tests that use it only read it (a replay may add MLflow runs, nothing else)."""
    from click.testing import CliRunner

    from pet_sweep.cli import cli

    path = write_experiments_file(tmp_path_factory.mktemp("finished-study"))
    result = CliRunner().invoke(cli, ["run", "--config", str(path), "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return path


# The `train` marker, kept true: a test that trains a model (fastai's `Learner.fit` runs in this
# process, in the test or its fixtures) or uses a fixture that trains for the session must be marked
# `train` or `slow`, so that `pytest -m "not slow and not train"` stays the inner loop of minutes.
# Training in a subprocess (`python -m pet_sweep`) is not seen here: those tests are marked by hand.
_fits = {"count": 0}


def _training_fixtures(item: pytest.Item) -> list[str]:
    defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})  # pytest's, stable since 3.x
    return [name for name, found in defs.items() if any(getattr(d.func, "trains", False) for d in found)]


def _count_fits() -> None:
    from fastai.learner import Learner  # heavy: imported once per test process, at its first test

    if getattr(Learner.fit, "_counted", False):
        return
    original = Learner.fit

    def fit(self: Any, *args: Any, **kwargs: Any) -> Any:
        _fits["count"] += 1
        return original(self, *args, **kwargs)

    fit._counted = True  # type: ignore[attr-defined]
    Learner.fit = fit


def _marked(item: pytest.Item) -> bool:
    return any(item.get_closest_marker(name) for name in ("train", "slow"))


def pytest_runtest_setup(item: pytest.Item) -> None:
    _count_fits()
    _fits["count"] = 0


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Any:
    result = yield  # the fixtures torn down first: a failure here leaks nothing
    fixtures = _training_fixtures(item)
    if not _marked(item) and (_fits["count"] or fixtures):
        why = (f"fastai's Learner.fit ran {_fits['count']} time(s)" if _fits["count"]
               else f"it uses the fixture {fixtures[0]}, which trains")
        pytest.fail(f"{item.nodeid} trains a model ({why}) but is not marked: add @pytest.mark.train "
                    "(or slow), so that `-m \"not slow and not train\"` leaves it out", pytrace=False)
    return result
