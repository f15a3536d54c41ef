"""Helpers shared by the scale-out and fault tests: run pet-sweep as a user does, read the stores back."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

# Small enough for seconds per trial on a shared 2-core machine; heartbeats fast so a
# killed worker's trial is noticed in seconds, with a grace period of 10 heartbeats so
# that a live worker delayed on a loaded machine (a busy database, a starved thread) is not.
FAST_FAULTS = {"heartbeat_interval": 2, "grace_period": 20, "max_retry": 2}
FAST_DATA = {"limit": 120, "valid_pct": 0.25, "test_pct": 0.0}
RANDOM_SPACE = {"arch": "resnet18", "base_lr": {"low": 1.0e-3, "high": 1.0e-2, "log": True},
                "lr_hi": 1.0e-2, "lr_mult": 10, "freeze_epochs": 0, "epochs": 1}
PROJECT = Path(__file__).resolve().parents[1]


def pet_sweep(*args: str, env: dict[str, str] | None = None, **popen: Any) -> subprocess.Popen:
    """`python -m pet_sweep ...` in a child process, this checkout first on the path."""
    full_env = {**os.environ, "PYTHONPATH": f"{PROJECT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "pet_sweep", *args], env=full_env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def printed_command(text: str) -> list[str]:
    """The arguments of a command a `pet_sweep` child suggested, after its program: the child was
    started as `python -m pet_sweep`, and so says each command it suggests (`invocation.command`)."""
    words = shlex.split(text)
    on_path = shutil.which("python")
    python = "python" if on_path and os.path.abspath(on_path) == os.path.abspath(sys.executable) else sys.executable
    assert words[:3] == [python, "-m", "pet_sweep"], text
    return words[3:]


def load(storage: str, name: str) -> optuna.Study:
    """The study, read through a storage that keeps no idle connection: the tests poll with it,
    and a pooled storage per poll would hold a PostgreSQL connection each until garbage-collected
    (past the server's 100 on a slow machine)."""
    from sqlalchemy.pool import NullPool

    rdb = optuna.storages.RDBStorage(storage, engine_kwargs={"poolclass": NullPool})
    return optuna.load_study(study_name=name, storage=rdb)


def wait_for(check: Callable[[], Any], timeout: float, what: str, proc: subprocess.Popen | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"pet-sweep exited ({proc.returncode}) before {what}:\n{out}\n{err}")
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def running_trial_with_epoch(storage: str, name: str) -> FrozenTrial | None:
    """A trial that is RUNNING and has finished at least its first epoch (so more remain)."""
    import sqlalchemy.exc

    try:
        trials = load(storage, name).get_trials(states=(TrialState.RUNNING,))
    # the study (or its file, or its tables) is not there yet
    except (KeyError, sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError):
        return None
    return next((t for t in trials if t.user_attrs.get("history") and "worker" in t.user_attrs), None)


def mlflow_runs(tracking_uri: str, experiment: str) -> list[Any]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id])


def trial_runs(tracking_uri: str, experiment: str, study: str) -> dict[int, Any]:
    return {int(r.data.tags["optuna.trial"]): r for r in mlflow_runs(tracking_uri, experiment)
            if r.data.tags.get("pet_sweep.role") == "trial" and r.data.tags.get("pet_sweep.study") == study}


def assert_nothing_running(storage: str, name: str, tracking_uri: str, experiment: str) -> None:
    running = load(storage, name).get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    assert not running, f"trials left running/waiting: {[t.number for t in running]}"
    left = [r.info.run_name for r in mlflow_runs(tracking_uri, experiment)
            if r.info.status == "RUNNING" and r.data.tags.get("pet_sweep.study") == name]
    assert not left, f"MLflow runs left RUNNING: {left}"


def two_workers_finish_the_budget(write_experiments: Callable[..., Path], storage: str) -> None:
    """Two CPU workers run exactly n_trials trials between them, with distinct numbers."""
    name = f"w{uuid.uuid4().hex[:10]}"  # one study per test: a shared server keeps old ones
    from pet_sweep.config import load_experiment
    from pet_sweep.sweep.records import INVOCATION_ATTR

    config = write_experiments(space=RANDOM_SPACE, data=FAST_DATA, faults=FAST_FAULTS, study_name=name)
    exp = load_experiment(config)
    proc = pet_sweep("run", "--config", str(config), "--workers", "2", "--n-trials", "3", "--storage", storage)
    out, err = proc.communicate(timeout=1800)
    assert proc.returncode == 0, out + err
    trials = load(storage, name).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3, out + err
    assert sorted(t.number for t in trials) == [0, 1, 2]
    assert len({t.user_attrs[INVOCATION_ATTR] for t in trials}) == 1
    assert len({t.user_attrs["worker"] for t in trials}) == 2, "both workers should have run trials"
    assert {line.split("|")[0] for line in out.splitlines() if "COMPLETE" in line} == {"w0", "w1"}
    runs = trial_runs(exp.tracking_uri, exp.tracking_experiment, name)
    assert sorted(runs) == [0, 1, 2] and {r.info.status for r in runs.values()} == {"FINISHED"}
    assert_nothing_running(storage, name, exp.tracking_uri, exp.tracking_experiment)
    # a password in the storage URL never reaches the output (the workers get it via the
    # environment), MLflow params or the study's attributes
    assert "s3cret" not in out + err
    parent = next(r for r in mlflow_runs(exp.tracking_uri, exp.tracking_experiment)
                  if r.data.tags.get("pet_sweep.role") == "sweep" and r.data.tags.get("pet_sweep.study") == name)
    assert parent.data.params["storage"].startswith(storage.split("://")[0])
    assert parent.info.status == "FINISHED"
    for run in [parent, *runs.values()]:
        assert "s3cret" not in repr(run.data.params) + repr(run.data.tags)
    assert "s3cret" not in repr(load(storage, name).user_attrs)


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
