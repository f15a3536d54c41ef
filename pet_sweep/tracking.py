"""MLflow at the edge: one experiment per pet-sweep experiment, one parent run per
study (the sweep), one nested child run ``trial-<n>`` per Optuna trial.

Everything goes through `MlflowClient` with explicit run ids, never the
fluent ``mlflow.start_run`` stack, so several workers in one process tree, or
a crash in the middle of a trial, cannot leave the wrong run active.

This module is the one door to MLflow: `Tracker` writes (sweeps, trials, the
finder's, pretraining's and replays' runs), `experiment_id` and `open_sweep_runs` read
(`tracking_read`), `kept_models` and the registry's functions keep and register models
(`tracking_kept`). No other module holds an `MlflowClient`: those parts get this one's. mlflow itself is imported inside the
functions that use it, so `pet-sweep --help`, `list` and `export` never load it.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from pet_sweep.errors import ConfigError, StudyError
from pet_sweep.tracking_kept import KeptModels, model_file, no_artifact_bars, register_version
from pet_sweep.tracking_read import RUN_STATUS, RunRecord, SweepRuns
from pet_sweep.tracking_spool import WHERE_TRACKING, Gate, apply, check_server, is_server, sync_spool, undelivered

# the URL helpers live in `urls` (the spool needs them too); callers import them from this door
from pet_sweep.urls import REDACTED, is_redacted, open_http, redact_url, redact_url_in, require_password, sqlite_path

__all__ = ["REDACTED", "is_redacted", "open_http", "redact_url", "redact_url_in", "require_password", "sqlite_path",
           "RUN_STATUS", "RunRecord", "SweepRuns", "no_artifact_bars"]

if TYPE_CHECKING:  # sweep.records imports this module (and optuna): for annotations only
    from pet_sweep.sweep.records import EpochRecord

PARENT_RUN_ATTR = "mlflow_parent_run_id"
# How long a new parent run waits for those other machines create at the same moment to be
# stored (well above one insert, even on a loaded database) before the earliest is kept.
SWEEP_SETTLE_S = 1.0
RUN_ID_ATTR = "mlflow_run_id"
# MLflow 3's UI opens an experiment of unknown kind on its GenAI (traces) overview;
# this tag makes it open on the runs table, where the sweep and its trials are.
EXPERIMENT_KIND_TAG = ("mlflow.experimentKind", "custom_model_development")
def artifact_root(tracking_uri: str) -> str | None:
    """Where a local store's artifacts go: beside its database, not in the shell's folder.

    MLflow's default for a SQL store is ``./mlruns`` of whatever directory the
    process started in, so plots and configs would scatter over the user's
    folders and `pet-sweep ui` started elsewhere could not show them.
    """
    db = sqlite_path(tracking_uri)
    return (db.parent / "mlartifacts").resolve().as_uri() if db is not None else None


def quiet_mlflow() -> None:
    # MLflow's alembic migrations log a dozen INFO lines the first time a store is used.
    for name in ("alembic", "mlflow.store.db.utils", "mlflow.tracking.fluent"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # On a tracking server MLflow prints "View run ... at: URL" and "View experiment at: URL"
    # each time a run ends: two lines per trial between pet-sweep's own. The header names
    # the server and `pet-sweep ui` the page; the variable set to false brings them back.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def _client(tracking_uri: str) -> Any:
    """The MlflowClient of a store (only this module holds one), MLflow's start-up lines silenced."""
    from mlflow import MlflowClient  # heavy: mlflow and SQLAlchemy, out of `--help`, `list`, `export`

    quiet_mlflow()
    return MlflowClient(tracking_uri=tracking_uri)


WORKER_PATIENCE_S = 300.0  # how long a supervised worker asks a busy server for the experiment


class Tracker:
    """Writes a sweep and its trials to one MLflow tracking store."""

    def __init__(self, tracking_uri: str, experiment_name: str, spool: Path | None = None,
                 max_outage: float | None = None, check: bool = True) -> None:
        """`spool`: on an ``http(s)://`` server, where writes wait while it is away (`tracking_spool`);
        without one every write goes to the server, and fails with it. `check`: refuse a server that
        does not answer /health in seconds (`check_server`); a supervised worker's supervisor did."""
        from mlflow.exceptions import MlflowException  # heavy: mlflow

        if check:
            check_server(tracking_uri)
        db = sqlite_path(tracking_uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = tracking_uri
        self._client = _client(tracking_uri)
        try:
            existing = self._experiment(experiment_name, patient=not check)
        except MlflowException as err:  # refused login, a server that is not MLflow, an unknown scheme
            first = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
            raise StudyError(f"cannot use the MLflow tracking store {redact_url(tracking_uri)}: "
                             f"{redact_url_in(first, tracking_uri)} ({WHERE_TRACKING})") from None
        if existing is None:
            try:
                self.experiment_id = self._client.create_experiment(
                    experiment_name, artifact_location=artifact_root(tracking_uri))
            except MlflowException:  # another worker created it first
                self.experiment_id = self._client.get_experiment_by_name(experiment_name).experiment_id
        else:
            self.experiment_id = existing.experiment_id
        if existing is None or EXPERIMENT_KIND_TAG[0] not in existing.tags:
            self._client.set_experiment_tag(self.experiment_id, *EXPERIMENT_KIND_TAG)
        self.experiment_name = experiment_name
        self._gate: Gate | None = None
        if spool is not None and is_server(tracking_uri):
            sync_spool(spool, self._client)  # what a run that ended with the server away left
            self._gate = Gate(self._client, tracking_uri, spool, max_outage)

    def _experiment(self, name: str, patient: bool) -> Any:
        """The MLflow experiment `name`, or None. `patient` (a supervised worker, whose supervisor made
        sure the server is there): a request the server does not answer (`undelivered`: busy with the
        other workers starting) is asked again for up to WORKER_PATIENCE_S, rather than ending the
        worker (6 of 128 simulated workers died so, on IncompleteRead)."""
        deadline = time.monotonic() + WORKER_PATIENCE_S
        while True:
            try:
                return self._client.get_experiment_by_name(name)
            except Exception as err:  # noqa: BLE001 - MlflowException, requests' errors: sorted by undelivered
                if not (patient and undelivered(err) and time.monotonic() < deadline):
                    raise
            time.sleep(random.uniform(1.0, 5.0))  # spread out: not 128 workers asking again at once

    def _write(self, op: dict[str, Any]) -> str | None:
        """Every write goes here: to the server, or to the spool while it is away."""
        return self._gate.write(op) if self._gate is not None else apply(self._client, op, {})

    def down_for(self) -> float:
        """Seconds the tracking server has been away (0 while it answers)."""
        return self._gate.down_for() if self._gate is not None else 0.0

    def resolve(self, run_id: str) -> str:
        """The server's id of a run this tracker created while the server was away, once it is sent."""
        return self._gate.resolve(run_id) if self._gate is not None else run_id

    def close(self) -> None:
        """The end of the sweep's writes: a last replay if the server is back; what stays spooled is said."""
        if self._gate is not None:
            self._gate.close()

    # -- the sweep (parent run) ------------------------------------------------

    def sweep_run(self, study_name: str, settings: Mapping[str, Any], run_id: str | None = None) -> str:
        """Reuse the study's parent run (resume, other workers) or create it.

        Machines that open a new study at the same moment each create one. So a creator
        waits `SWEEP_SETTLE_S` for the others' runs to be stored, then every one of them
        keeps the same run, the earliest open `sweep-<study>` (start time, then run id),
        and deletes its own if it lost, before any trial logs to it.
        """
        try:
            return self._sweep_run(study_name, settings, run_id)
        except Exception as err:  # noqa: BLE001 - MlflowException, requests' errors: before any training
            first = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
            raise StudyError(f"cannot open the sweep's parent run on the MLflow tracking store "
                             f"{redact_url(self.tracking_uri)}: {redact_url_in(first, self.tracking_uri)}; "
                             "no trial was started") from None

    def _sweep_run(self, study_name: str, settings: Mapping[str, Any], run_id: str | None) -> str:
        from mlflow.entities import RunStatus  # heavy: mlflow

        if run_id:
            try:
                run = self._client.get_run(run_id)
            except Exception:  # the id comes from another store (overridden --tracking-uri)
                run = None
            if run is not None and run.info.experiment_id == self.experiment_id:
                if run.info.status != "RUNNING":
                    self._client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
                return run_id
        mine = self._client.create_run(
            self.experiment_id, run_name=f"sweep-{study_name}",
            tags={"pet_sweep.role": "sweep", "pet_sweep.study": study_name}).info.run_id
        time.sleep(SWEEP_SETTLE_S)
        runs = self._client.search_runs(
            [self.experiment_id], filter_string=f"tags.`pet_sweep.study` = '{study_name}' and "
                                                "tags.`pet_sweep.role` = 'sweep' and attributes.status = 'RUNNING'")
        winner = min(runs, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id if runs else mine
        if winner != mine:
            self._client.delete_run(mine)
            return winner
        self.log_params(mine, settings)
        return mine

    def update_sweep(self, run_id: str, metrics: Mapping[str, float], tags: Mapping[str, str] = ()) -> None:
        now = int(time.time() * 1000)
        self._write({"op": "log_batch", "run": run_id,
                     "metrics": [(k, float(v), now, 0) for k, v in metrics.items() if _finite(v)],
                     "tags": [(k, str(v)) for k, v in dict(tags).items()]})

    def finish_sweep(self, run_id: str, status: str = "FINISHED") -> None:
        self.end_run(run_id, status)

    # -- other runs: the LR finder's, pretraining's, replays' -------------------

    def start_run(self, run_name: str, tags: Mapping[str, str]) -> str:
        """A new run in this experiment (tags such as ``mlflow.parentRunId`` nest it); its id."""
        return str(self._write({"op": "create_run", "experiment_id": self.experiment_id, "run_name": run_name,
                                "tags": dict(tags), "time": int(time.time() * 1000)}))

    def has_run(self, run_id: str | None) -> bool:
        """Whether this store holds the run (an id read from a config may come from another store)."""
        return bool(run_id) and _run_or_none(self._client, str(run_id)) is not None

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self._write({"op": "log_batch", "run": run_id, "tags": [(key, value[:5000])]})  # MLflow's limit on a tag

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self._write({"op": "terminate", "run": run_id, "status": status, "time": int(time.time() * 1000)})

    def fail_run(self, run_id: str, reason: str) -> None:
        """Close a run that failed, saying why in its ``reason`` tag."""
        self.set_tag(run_id, "reason", reason)
        self.end_run(run_id, "FAILED")

    # -- trials (child runs) ---------------------------------------------------

    def start_trial(self, parent_run_id: str, study_name: str, number: int,
                    params: Mapping[str, Any], tags: Mapping[str, str] = ()) -> str:
        run_id = self.start_run(f"trial-{number}", {
            "mlflow.parentRunId": parent_run_id, "pet_sweep.role": "trial", "pet_sweep.study": study_name,
            "optuna.trial": str(number), "optuna.state": "RUNNING", **dict(tags)})
        self.log_params(run_id, params)
        return run_id

    def epoch_logger(self, run_id: str) -> "EpochLogger":
        return EpochLogger(self, run_id)

    def finish_trial(self, run_id: str, state: str, metrics: Mapping[str, float] = (),
                     tags: Mapping[str, str] = (), artifacts: Iterable[Path] = ()) -> None:
        """Final metrics, tags and artifacts, then close the run with the status of `state`."""
        self.finish_run(run_id, RUN_STATUS.get(state, "FAILED"), metrics, {"optuna.state": state, **dict(tags)},
                        artifacts)

    def finish_run(self, run_id: str, status: str, metrics: Mapping[str, float] = (),
                   tags: Mapping[str, str] = (), artifacts: Iterable[Path] = ()) -> None:
        """Final metrics, tags and artifacts of any run, then close it with MLflow's `status`."""
        self.update_sweep(run_id, dict(metrics), tags)
        self.log_artifacts(run_id, artifacts)
        self.end_run(run_id, status)

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        self._write({"op": "log_batch", "run": run_id, "params": [(k, _param_text(v)) for k, v in params.items()]})

    def log_artifacts(self, run_id: str, paths: Iterable[Path], artifact_path: str | None = None) -> None:
        for path in paths:
            self._write({"op": "artifact", "run": run_id, "path": str(path), "artifact_path": artifact_path})

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int) -> None:
        """Metrics at `step` (an epoch: the global epoch counter of both phases); non-finite ones are left out."""
        now = int(time.time() * 1000)
        self._write({"op": "log_batch", "run": run_id,
                     "metrics": [(k, float(v), now, step) for k, v in metrics.items() if _finite(v)]})

    def close_stale_runs(self, study_name: str, running_trials: set[int], state_of: Mapping[int, str]) -> int:
        """Close trial runs left RUNNING by a dead worker, using Optuna's final state
        (none while the server is away: the next command closes them)."""
        if self.down_for():
            return 0
        runs = self._client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`pet_sweep.study` = '{study_name}' and tags.`pet_sweep.role` = 'trial'"
                          " and attributes.status = 'RUNNING'")
        closed = 0
        for run in runs:
            number = int(run.data.tags.get("optuna.trial", -1))
            if number in running_trials:
                continue
            state = state_of.get(number, "FAIL")
            self.set_tag(run.info.run_id, "optuna.state", state)
            self.end_run(run.info.run_id, RUN_STATUS.get(state, "FAILED"))
            closed += 1
        return closed


def send_spooled(tracking_uri: str, spool: Path) -> tuple[int, int]:
    """Send the writes a sweep kept in `spool` while the server was away (`pet-sweep sync`, `report`):
    (writes sent, spool files still written by a running sweep). StudyError if the server refuses one."""
    if not is_server(tracking_uri) or not spool.is_dir():
        return 0, 0
    check_server(tracking_uri)
    try:
        return sync_spool(spool, _client(tracking_uri))
    except Exception as err:  # noqa: BLE001 - MlflowException, requests' errors: said, the rest stays
        first = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
        raise StudyError(f"the MLflow server {redact_url(tracking_uri)} refused a write kept in {spool}: "
                         f"{redact_url_in(first, tracking_uri)}; it and the writes after it stay there") from None


# -- the Model Registry (`train --register`, `serve`) --------------------------------------------


def check_registry(tracking_uri: str) -> None:
    """Refuse `--register` before any training where the store has no Model Registry that answers."""
    from mlflow.environment_variables import MLFLOW_REGISTRY_URI  # heavy: mlflow

    where = MLFLOW_REGISTRY_URI.get() or tracking_uri  # the tracking store's, unless the variable names another
    try:
        _client(tracking_uri).search_registered_models(max_results=1)
    except Exception as err:  # an unknown scheme, a server without the registry's endpoints, ...
        reason = redact_url_in((str(err).splitlines() or [type(err).__name__])[0][:300], where)
        raise ConfigError(f"--register: the Model Registry at {redact_url(where)} cannot be used ({reason}); "
                          f"nothing was trained or registered") from None


def register_model(tracking_uri: str, run_id: str, folder: Path, name: str, tags: Mapping[str, str]) -> int:
    """Upload a saved MLflow model (`folder`) as the artifacts ``model/`` of run `run_id` and
    register them as a new version of `name` (created if new); the version's number."""
    client = _client(tracking_uri)
    with no_artifact_bars():
        client.log_artifacts(run_id, str(folder), "model")
    source = client.get_run(run_id).info.artifact_uri.rstrip("/") + "/model"
    return register_version(client, name, source, run_id, tags)


def kept_models(tracking_uri: str, experiment_id: str) -> KeptModels:
    """The kept trial models of an experiment (`sweep.keep`, `pet-sweep register`)."""
    return KeptModels(_client(tracking_uri), experiment_id)


def download_model_file(tracking_uri: str, name: str, version: str, file: str, folder: Path) -> Path | None:
    """One file of a registered model version, downloaded into `folder`; None where it has none."""
    return model_file(_client(tracking_uri), tracking_uri, name, version, file, folder)


# -- readers (`report`, `ui`): they never create a store, an experiment or a run ----------------


def experiment_id(tracking_uri: str, experiment_name: str) -> str | None:
    """The id of the MLflow experiment of that name in the store, None when it has none."""
    found = _client(tracking_uri).get_experiment_by_name(experiment_name)
    return None if found is None else str(found.experiment_id)


def open_sweep_runs(tracking_uri: str, parent_run_id: str) -> SweepRuns | None:
    """The sweep whose parent run is `parent_run_id`; None where the store lacks that run."""
    client = _client(tracking_uri)
    run = _run_or_none(client, parent_run_id)
    return None if run is None else SweepRuns(client, run.info.experiment_id, parent_run_id)


def _run_or_none(client: Any, run_id: str) -> Any:
    from mlflow.exceptions import MlflowException  # heavy: mlflow

    try:
        return client.get_run(run_id)
    except MlflowException:  # no such run in this store
        return None


class EpochLogger:
    """Epoch listener: log train/valid loss and error rate at step = global epoch."""

    def __init__(self, tracker: Tracker, run_id: str) -> None:
        self._tracker, self.run_id = tracker, run_id

    def __call__(self, record: EpochRecord) -> None:
        self._tracker.log_metrics(self.run_id, {
            "train_loss": record.train_loss, "valid_loss": record.valid_loss,
            "error_rate": record.error_rate, "epoch_seconds": record.seconds}, record.epoch)


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _param_text(value: Any) -> str:
    text = redact_url(value) if isinstance(value, str) else str(value)
    return text[:6000]
