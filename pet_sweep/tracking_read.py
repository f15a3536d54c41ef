"""The readers' side of the door to MLflow (`report`, `ui`): a sweep's runs, found from its parent run.

A part of the one door, as `tracking_kept` and `tracking_spool` are: `tracking.open_sweep_runs`
hands `SweepRuns` the store's client; no other module holds one. Readers never create a store,
an experiment or a run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

# MLflow run statuses for Optuna trial states: a pruned trial was stopped on
# purpose (KILLED), a failed one FAILED; no trial run is ever left RUNNING.
RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


@dataclass(frozen=True)
class RunRecord:
    """What a reader needs of one MLflow run."""

    run_id: str
    metrics: Mapping[str, float]
    tags: Mapping[str, str]


class SweepRuns:
    """A sweep's runs in an MLflow store, found from its parent run: read them, attach files to it.

    `open_sweep_runs` builds one; it is None where the store lacks the parent run.
    """

    def __init__(self, client: Any, experiment_id: str, parent_run_id: str) -> None:
        self._client, self.experiment_id, self.parent_run_id = client, experiment_id, parent_run_id

    def finished_runs(self, study_name: str, role: str) -> list[RunRecord]:
        """Finished runs of the study with tag ``pet_sweep.role`` = `role`, oldest first."""
        runs = self._client.search_runs(
            [self.experiment_id], order_by=["attributes.start_time ASC"],
            filter_string=f"tags.`pet_sweep.role` = '{role}' and tags.`pet_sweep.study` = '{study_name}'"
                          " and attributes.status = 'FINISHED'")
        return [RunRecord(run.info.run_id, dict(run.data.metrics), dict(run.data.tags)) for run in runs]

    def incomplete_trials(self, study_name: str, states: Mapping[int, str]) -> list[int]:
        """The trials (number -> Optuna state) whose MLflow run is missing, or not closed as Optuna
        closed the trial (a sweep that ended while the server was away, its writes still spooled)."""
        runs = {}
        for run in self._client.search_runs(
                [self.experiment_id], filter_string=f"tags.`pet_sweep.role` = 'trial' and "
                                                    f"tags.`pet_sweep.study` = '{study_name}'"):
            runs[int(run.data.tags.get("optuna.trial", -1))] = run
        out = []
        for number, state in sorted(states.items()):
            run = runs.get(number)
            if state in RUN_STATUS and (run is None or run.info.status != RUN_STATUS[state]
                                        or run.data.tags.get("optuna.state") != state):
                out.append(number)
        return out

    def attach(self, folder: Path, artifact_path: str) -> None:
        """Every file under `folder` as artifacts of the parent run, under `artifact_path`."""
        self._client.log_artifacts(self.parent_run_id, str(folder), artifact_path=artifact_path)
