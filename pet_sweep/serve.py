"""The winner in production: the exported learner as an MLflow pyfunc model, a version of
it in the tracking store's Model Registry, and `mlflow models serve` on that version.

MLflow 3 has no fastai flavour, so `ImageClassifier` wraps `learn.export()`'s pickle in a
`PythonModel`. Its input is a table with one image per row: the column `image` holds the
encoded file (PNG, JPEG; bytes, base64 in a JSON request), or the column `path` a file
path on the serving machine. It answers each row with the `label` and its `probability`,
as `learn.predict` gives them.

This module imports MLflow and pandas at its top: only `train --register` and `serve`
import it.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, Schema

from pet_sweep.errors import ConfigError
from pet_sweep.tracking import redact_url, redact_url_in

IMAGE, PATH = "image", "path"
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("binary", IMAGE, required=False), ColSpec("string", PATH, required=False)]),
    outputs=Schema([ColSpec("string", "label"), ColSpec("double", "probability")]))
# what the serving environment needs (`serve` uses the local one: `--env-manager local`)
REQUIREMENTS = ["fastai", "torch", "torchvision", "pandas", "pillow"]


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """A fastai learner behind MLflow's pyfunc interface: one image per row in, label and probability out."""

    def load_context(self, context: Any) -> None:
        from fastai.learner import load_learner  # heavy: fastai, when the model is loaded

        self.learn = load_learner(context.artifacts["learner"], cpu=True)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from fastai.vision.core import PILImage  # heavy: fastai

        rows = []
        for number, (_, row) in enumerate(model_input.iterrows()):
            image = row.get(IMAGE)
            source = image if isinstance(image, (bytes, bytearray)) else row.get(PATH)
            if not isinstance(source, (bytes, bytearray, str)):
                raise bad_input(f"row {number}: each row needs `{IMAGE}` (the image file's bytes) "
                                f"or `{PATH}` (a file path)")
            try:
                picture = PILImage.create(bytes(source) if not isinstance(source, str) else Path(source))
            except (OSError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
                what = f"`{PATH}` {source!r}" if isinstance(source, str) else f"`{IMAGE}` ({len(source)} bytes)"
                raise bad_input(f"row {number}: {what} is not an image PIL can read: {err}") from None
            label, index, probs = self.learn.predict(picture)
            rows.append({"label": str(label), "probability": float(probs[index])})
        return pd.DataFrame(rows, columns=["label", "probability"])


def bad_input(message: str) -> MlflowException:
    """A request the model cannot answer: MLflow's scoring server returns it as HTTP 400 with this message."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def check_registry(tracking_uri: str) -> None:
    """Refuse `--register` before any training where the store has no Model Registry that answers."""
    mlflow.set_tracking_uri(tracking_uri)
    where = mlflow.get_registry_uri()  # the tracking store's, unless MLFLOW_REGISTRY_URI names another
    try:
        mlflow.search_registered_models(max_results=1)
    except Exception as err:  # an unknown scheme, a server without the registry's endpoints, ...
        reason = redact_url_in((str(err).splitlines() or [type(err).__name__])[0][:300], where)
        raise ConfigError(f"--register: the Model Registry at {redact_url(where)} cannot be used ({reason}); "
                          f"nothing was trained or registered") from None


def register(learner: Any, name: str, *, tracking_uri: str, run_id: str, example: bytes,
             tags: dict[str, str]) -> int:
    """Log `learner` as a pyfunc model of the (still running) MLflow run `run_id` and register
    it as a new version of `name`; returns the version number."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "learner.pkl"
        learner.export(path)
        mlflow.set_tracking_uri(tracking_uri)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(name="model", python_model=ImageClassifier(),
                                           artifacts={"learner": str(path)}, signature=SIGNATURE,
                                           input_example=pd.DataFrame({IMAGE: [example]}),
                                           pip_requirements=REQUIREMENTS)
    version = mlflow.register_model(info.model_uri, name, tags=tags)
    return int(version.version)


def serve_command(name: str, version: str, host: str, port: int, tracking_uri: str) -> tuple[list[str], dict[str, str]]:
    """`mlflow models serve` on models:/NAME/VERSION with this environment's packages; the
    tracking URI goes in the environment, not on the command line `ps` shows."""
    if not name:
        raise ConfigError("serve needs the registered model's name")
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{name}/{version}",
           "--host", host, "--port", str(port), "--env-manager", "local", "--workers", "1"]
    # mlflow starts `uvicorn` by name: this interpreter's scripts first on PATH (a venv used without activating it)
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return cmd, {"MLFLOW_TRACKING_URI": tracking_uri, "PATH": path}


def curl_line(base: str) -> str:
    """A request to paste: one image, base64-encoded in MLflow's `dataframe_split` JSON."""
    return (f"curl -s {base}/invocations -H 'Content-Type: application/json' -d "
            f"\"{{\\\"dataframe_split\\\": {{\\\"columns\\\": [\\\"{IMAGE}\\\"], "
            f"\\\"data\\\": [[\\\"$(base64 -w0 IMAGE.png)\\\"]]}}}}\"")
