"""The kept and registered models in MLflow (`sweep.keep`, `register`, `serve`): a trial run's
artifacts ``model/`` hold its learner as a pyfunc model, and the run's tag `KEPT_TAG` says whether
they are there.

A part of the one door to MLflow, as `tracking_spool` is: `tracking.kept_models` hands it the
store's client; no other module holds one. Tag values:

- ``true``: the artifacts ``model/`` are there, and counted in the bound of kept models;
- ``deleted``: superseded, the artifacts removed;
- ``registered``: superseded after a Model Registry version was made from them: left in place
  (the version's source), no longer counted.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

KEPT_TAG = "pet_sweep.kept_model"
MODEL_DIR = "model"  # the artifacts' folder, as `train --register` logs it
KEPT, DELETED, REGISTERED = "true", "deleted", "registered"
_BARS = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"  # mlflow.environment_variables, read at each bar


@contextmanager
def no_artifact_bars() -> Iterator[None]:
    """Within: no "Downloading artifacts" progress bars from MLflow (it draws one for each model
    it loads or copies, a local folder too); the variable as it was, after."""
    before = os.environ.get(_BARS)
    os.environ[_BARS] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(_BARS, None)
        else:
            os.environ[_BARS] = before


@dataclass(frozen=True)
class KeptRun:
    """A trial run whose model is kept."""

    number: int   # the Optuna trial
    run_id: str


class KeptModels:
    """The kept models of one MLflow experiment."""

    def __init__(self, client: Any, experiment_id: str) -> None:
        self._client, self.experiment_id = client, experiment_id

    def keep(self, run_id: str, folder: Path) -> None:
        """Upload a saved pyfunc model (`folder`) as the run's artifacts ``model/``, then tag it kept."""
        self._client.log_artifacts(run_id, str(folder), MODEL_DIR)
        self._client.set_tag(run_id, KEPT_TAG, KEPT)  # after the upload: a tagged model is a whole one

    def kept(self, study_name: str) -> list[KeptRun]:
        """The trial runs of the study whose model is kept, by trial number."""
        runs = self._client.search_runs(
            [self.experiment_id], filter_string=f"tags.`pet_sweep.study` = '{study_name}' and "
                                                f"tags.`pet_sweep.role` = 'trial' and tags.`{KEPT_TAG}` = '{KEPT}'")
        return sorted((KeptRun(int(r.data.tags.get("optuna.trial", -1)), r.info.run_id) for r in runs),
                      key=lambda k: k.number)

    def is_kept(self, run_id: str) -> bool:
        """Whether the run's model is there (kept, or kept and registered since)."""
        from mlflow.exceptions import MlflowException  # heavy: mlflow

        try:
            return self._client.get_run(run_id).data.tags.get(KEPT_TAG) in (KEPT, REGISTERED)
        except MlflowException:  # no such run in this store
            return False

    def drop(self, run_id: str) -> str:
        """A superseded kept model: deleted (the tag first, so no reader takes a half-deleted one), or
        left where a registered version is made from it. Returns the tag it now has."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository  # heavy: mlflow

        if self._client.search_model_versions(f"run_id = '{run_id}'", max_results=1):
            self._client.set_tag(run_id, KEPT_TAG, REGISTERED)
            return REGISTERED
        self._client.set_tag(run_id, KEPT_TAG, DELETED)
        uri = self._client.get_run(run_id).info.artifact_uri
        get_artifact_repository(uri, tracking_uri=self._client.tracking_uri).delete_artifacts(MODEL_DIR)
        return DELETED

    def size(self, run_id: str) -> int:
        """Bytes of the run's kept model, as the artifact store lists them."""
        def walk(path: str) -> int:
            return sum(walk(f.path) if f.is_dir else (f.file_size or 0)
                       for f in self._client.list_artifacts(run_id, path))
        return walk(MODEL_DIR)

    def register(self, run_id: str, name: str, tags: Mapping[str, str]) -> int:
        """A new version of `name` (created if new) made from the run's kept model, nothing uploaded again."""
        source = self._client.get_run(run_id).info.artifact_uri.rstrip("/") + "/" + MODEL_DIR
        return register_version(self._client, name, source, run_id, tags)


def register_version(client: Any, name: str, source: str, run_id: str, tags: Mapping[str, str]) -> int:
    """Create the registered model `name` if it is new, then a version of it from `source`; its number."""
    from mlflow.exceptions import MlflowException  # heavy: mlflow

    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    return int(client.create_model_version(name, source, run_id=run_id, tags=dict(tags)).version)


def model_file(client: Any, tracking_uri: str, name: str, version: str, file: str, folder: Path) -> Path | None:
    """One file of a registered model version ("latest": the newest), downloaded into `folder`;
    None where it has none (`serve` reads the input example and the labels so)."""
    from mlflow.artifacts import download_artifacts  # heavy: mlflow

    try:
        if version == "latest":
            version = str(max(int(v.version) for v in client.search_model_versions(f"name = '{name}'")))
        # the version's own artifact URI: a models:/ URI would be resolved in the default registry, not this store's
        source = client.get_model_version_download_uri(name, version).rstrip("/")
        with no_artifact_bars():
            found = Path(download_artifacts(artifact_uri=f"{source}/{file}", dst_path=str(folder),
                                            tracking_uri=tracking_uri))
        return found if found.is_file() else None
    except Exception:  # no such file (a model registered before it was written), or no such version
        return None
