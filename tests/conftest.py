"""Shared fixtures: tiny digits experiments in a temporary folder, CPU only."""

from __future__ import annotations

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


@pytest.fixture
def write_experiments(tmp_path: Path) -> Callable[..., Path]:
    """Write experiments.yaml (+ sweeps/tiny.yaml) into tmp_path and return its path.

    ``write_experiments(space={...}, tiny={...overrides...}, extra={name: experiment})``
    """

    def write(space: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
              **overrides: Any) -> Path:
        (tmp_path / "sweeps").mkdir(exist_ok=True)
        (tmp_path / "sweeps" / "tiny.yaml").write_text(yaml.safe_dump(space or TINY_SPACE))
        doc = {"default": "tiny", "experiments": {"tiny": tiny_experiment(**overrides), **(extra or {})}}
        path = tmp_path / "experiments.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path

    return write


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
def finished_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """experiments.yaml of a finished two-trial tiny study, trained once for the session.

    Tests that use it only read it (a replay may add MLflow runs, nothing else)."""
    from click.testing import CliRunner

    from pet_sweep.cli import cli

    folder = tmp_path_factory.mktemp("finished-study")
    (folder / "sweeps").mkdir()
    (folder / "sweeps" / "tiny.yaml").write_text(yaml.safe_dump(TINY_SPACE))
    doc = {"default": "tiny", "experiments": {"tiny": tiny_experiment()}}
    path = folder / "experiments.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    result = CliRunner().invoke(cli, ["run", "--config", str(path), "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return path
