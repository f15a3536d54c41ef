"""tracking.py, the one door to MLflow: the Tracker's runs, the readers, and no other door."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pet_sweep.tracking import Tracker, experiment_id, open_sweep_runs

PACKAGE = Path(__file__).resolve().parent.parent / "pet_sweep"


def test_tracker_keeps_artifacts_beside_the_store_and_opens_on_runs(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    from pet_sweep.tracking import Tracker

    monkeypatch.chdir(tmp_path)  # MLflow's default would be ./mlruns here
    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    tracker = Tracker(uri, "pet-sweep/x")
    found = MlflowClient(uri).get_experiment(tracker.experiment_id)
    assert found.artifact_location == (tmp_path / "runs" / "mlartifacts").as_uri()
    assert found.tags["mlflow.experimentKind"] == "custom_model_development"
    from mlflow.environment_variables import MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT

    assert MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT.get()  # no "View run ... at: URL" lines between trial lines
    assert not (tmp_path / "mlruns").exists()


def test_tracker_runs_open_close_and_fail(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "pet-sweep/x")
    parent = tracker.start_run("sweep-x", {"pet_sweep.role": "sweep"})
    child = tracker.start_run("lr-find-resnet18", {"mlflow.parentRunId": parent})
    assert tracker.has_run(parent) and not tracker.has_run("0" * 32) and not tracker.has_run(None)
    tracker.end_run(child)
    tracker.fail_run(parent, "ValueError: " + "x" * 6000)
    client = MlflowClient(uri)
    assert client.get_run(child).info.status == "FINISHED"
    assert client.get_run(child).data.tags["mlflow.parentRunId"] == parent
    failed = client.get_run(parent)
    assert failed.info.status == "FAILED" and failed.data.tags["reason"].startswith("ValueError: x")
    assert len(failed.data.tags["reason"]) == 5000  # MLflow's limit on a tag value


def test_readers_find_the_experiment_and_the_sweep_runs(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "pet-sweep/x")
    assert experiment_id(uri, "pet-sweep/x") == tracker.experiment_id
    assert experiment_id(uri, "pet-sweep/none") is None
    parent = tracker.start_run("sweep-s", {"pet_sweep.role": "sweep", "pet_sweep.study": "s"})
    assert open_sweep_runs(uri, "0" * 32) is None  # a store that lacks the sweep
    runs = open_sweep_runs(uri, parent)
    assert runs is not None and (runs.experiment_id, runs.parent_run_id) == (tracker.experiment_id, parent)
    replay = tracker.start_run("replay-s", {"pet_sweep.role": "replay", "pet_sweep.study": "s"})
    tracker.finish_trial(replay, "COMPLETE", {"test_error_rate": 0.25}, {"pet_sweep.held_out": "true"})
    tracker.start_run("replay-running", {"pet_sweep.role": "replay", "pet_sweep.study": "s"})  # not finished
    [found] = runs.finished_runs("s", "replay")
    assert found.run_id == replay and found.metrics["test_error_rate"] == 0.25
    assert found.tags["pet_sweep.held_out"] == "true"
    folder = tmp_path / "report"
    folder.mkdir()
    (folder / "report.md").write_text("# report\n")
    runs.attach(folder, "report")
    from mlflow import MlflowClient

    assert [a.path for a in MlflowClient(uri).list_artifacts(parent, "report")] == ["report/report.md"]


def _mlflow_doors(path: Path) -> list[str]:
    """Where a module imports mlflow's client or reaches into a `.client` attribute."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module == "mlflow" and any(
                a.name == "MlflowClient" for a in node.names):
            found.append(f"{path.name}:{node.lineno} imports MlflowClient")
        if isinstance(node, ast.Attribute) and node.attr == "client":
            found.append(f"{path.name}:{node.lineno} uses .client")
    return found


def test_tracking_is_the_one_door_to_mlflow() -> None:
    doors = [door for path in sorted(PACKAGE.rglob("*.py")) if path.name != "tracking.py"
             for door in _mlflow_doors(path)]
    assert doors == []


def test_importing_tracking_loads_no_mlflow() -> None:
    import subprocess
    import sys

    code = "import sys, pet_sweep.tracking; print('mlflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent)
    assert out.stdout.strip() == "False"
