"""The winner in production: the exported learner as an MLflow pyfunc model, a version of
it in the tracking store's Model Registry, and `mlflow models serve` on that version.

MLflow 3 has no fastai flavour, so `ImageClassifier` wraps `learn.export()`'s pickle in a
`PythonModel`. Its input is a table with one image per row: the column `image` holds the
encoded file (PNG, JPEG; bytes, base64 in a JSON request), or the column `path` a file
path on the serving machine. It answers each row with the `label` and its `probability`,
as `learn.predict` gives them. A request it cannot answer whole (no such column, a row
that is not an image) is refused whole: HTTP 400, the message naming the rows.

This module imports MLflow and pandas at its top: only `train --register` and `serve`
import it. It saves the model to a local folder; `tracking` (the one door to MLflow)
uploads and registers it.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import sys
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, Schema

from pet_sweep.errors import ConfigError
from pet_sweep.tracking import check_registry, download_model_file, no_artifact_bars, register_model
from pet_sweep.train.data import cache_dir

__all__ = ["ImageClassifier", "check_registry", "register", "save_pyfunc", "sample_image", "serve_command", "curl_line"]

IMAGE, PATH = "image", "path"
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("binary", IMAGE, required=False), ColSpec("string", PATH, required=False)]),
    outputs=Schema([ColSpec("string", "label"), ColSpec("double", "probability")]))
# what the serving environment needs (`serve` uses the local one: `--env-manager local`)
REQUIREMENTS = ["fastai", "torch", "torchvision", "pandas", "pillow"]
SAMPLE = "IMAGE.png"  # the request line's image where the registered version has no example
_SHOWN_ROWS = 3        # bad rows a refusal names one by one


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """A fastai learner behind MLflow's pyfunc interface: one image per row in, label and probability out."""

    def load_context(self, context: Any) -> None:
        with trusted_learner():
            from fastai.learner import load_learner  # heavy: fastai, when the model is loaded

            self.learn = load_learner(context.artifacts["learner"], cpu=True)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        pictures = read_images(model_input)  # every row checked before any is answered
        rows = []
        with self.learn.no_bar():
            for picture in pictures:
                label, index, probs = self.learn.predict(picture)
                rows.append({"label": str(label), "probability": float(probs[index])})
        return pd.DataFrame(rows, columns=["label", "probability"])


def read_images(model_input: pd.DataFrame) -> list[Any]:
    """The image of each row, or the request refused whole, naming its bad rows."""
    from fastai.vision.core import PILImage  # heavy: fastai

    if IMAGE not in model_input.columns and PATH not in model_input.columns:
        # MLflow drops the columns its signature does not name: the request's own are gone by now
        raise RequestRefused(f"the request has no `{IMAGE}` column (the image file's bytes, base64 in JSON) "
                             f"and no `{PATH}` column (a file path on the serving machine); send one of them")
    pictures, bad = [], []
    for number, (_, row) in enumerate(model_input.iterrows()):
        image = row.get(IMAGE)
        source = image if isinstance(image, (bytes, bytearray)) else row.get(PATH)
        if not isinstance(source, (bytes, bytearray, str)):
            bad.append(f"row {number}: it has neither `{IMAGE}` (the image file's bytes) nor `{PATH}` (a file path)")
            continue
        try:
            pictures.append(PILImage.create(bytes(source) if not isinstance(source, str) else Path(source)))
        except (OSError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
            what = f"`{PATH}` {source!r}" if isinstance(source, str) else f"`{IMAGE}` ({len(source)} bytes)"
            bad.append(f"row {number}: {what} is not an image PIL can read: {err}")
    if bad:
        more = f"; and {len(bad) - _SHOWN_ROWS} more bad row(s)" if len(bad) > _SHOWN_ROWS else ""
        raise RequestRefused("; ".join(bad[:_SHOWN_ROWS]) + more +
                             f". The whole request was refused: no row of the {len(model_input)} was answered")
    return pictures


class RequestRefused(MlflowException):
    """A request the model cannot answer: MLflow's scoring server returns it as HTTP 400.

    The server rewrites the message it sends as ``Failed to predict data '<the whole input
    table>'. Error: <message>`` (`mlflow.pyfunc.scoring_server.invocations` assigns
    `message`): hundreds of characters of raw bytes before the sentence the client needs.
    So `message` keeps the first value it is given, pet-sweep's sentence
    (tests/test_serve.py pins what a client reads)."""

    def __init__(self, sentence: str) -> None:
        self._sentence = sentence
        super().__init__(sentence, error_code=INVALID_PARAMETER_VALUE)

    @property  # type: ignore[override]
    def message(self) -> str:
        return self._sentence

    @message.setter
    def message(self, value: str) -> None:
        pass  # MLflow's prefixed rewrite: the client reads pet-sweep's sentence alone


@contextmanager
def trusted_learner() -> Iterator[None]:
    """Silence, for the calls that load the learner pet-sweep itself exported, fastai's warning
    that `load_learner` unpickles (the file is ours, trained a moment ago or registered by us)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*load_learner` uses Python's insecure pickle")
        yield


def register(learner: Any, name: str, *, tracking_uri: str, run_id: str, example: bytes,
             tags: dict[str, str]) -> int:
    """Save `learner` as a pyfunc model, log it to the (still running) MLflow run `run_id` and
    register it as a new version of `name`; returns the version number."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_pyfunc(learner, Path(tmp), example)
        return register_model(tracking_uri, run_id, folder, name, tags)


class _CloudpickleNotice(logging.Filter):
    """MLflow's logged notices while pet-sweep saves its model: that a `python_model` object is
    serialised with CloudPickle, and that the input example is being validated (once per kept model)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "CloudPickle" not in message and not message.startswith("Validating input example")


@contextmanager
def _no_cloudpickle_notice() -> Iterator[None]:
    """Drop those notices (MLflow logs them, not `warnings`) while pet-sweep saves its own model,
    and only then: any other MLflow message still shows."""
    logger, notice = logging.getLogger("mlflow.pyfunc"), _CloudpickleNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


def save_pyfunc(learner: Any, tmp: Path, example: bytes) -> Path:
    """`learner` saved as a pyfunc model in the folder `tmp`/model (the learner's pickle in `tmp`)."""
    path = tmp / "learner.pkl"
    learner.export(path)
    folder = tmp / "model"
    with trusted_learner(), no_artifact_bars(), warnings.catch_warnings(), _no_cloudpickle_notice():
        # MLflow warns that a PythonModel defined in a module is pickled by reference: it is,
        # and the serving environment is this one (`serve` runs `--env-manager local`)
        warnings.filterwarnings("ignore", message=".*cloudpickle.*")
        mlflow.pyfunc.save_model(str(folder), python_model=ImageClassifier(), artifacts={"learner": str(path)},
                                 signature=SIGNATURE, input_example=pd.DataFrame({IMAGE: [example]}),
                                 pip_requirements=REQUIREMENTS)
    return folder


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


def sample_image(name: str, version: str, tracking_uri: str) -> Path | None:
    """The registered version's input example (an image of the held-out split, saved by
    `register`) as a file in pet-sweep's cache, for the request line to send; None where the
    version has none."""
    folder = cache_dir() / "serve" / f"{name}-{version}"
    folder.mkdir(parents=True, exist_ok=True)
    found = download_model_file(tracking_uri, name, version, "serving_input_example.json", folder)
    try:
        encoded = json.loads(found.read_text(encoding="utf-8"))["dataframe_split"]["data"][0][0]
        image = base64.b64decode(encoded, validate=True)
    except (AttributeError, OSError, ValueError, KeyError, IndexError, TypeError):  # none, or not pet-sweep's
        return None
    suffix = ".jpg" if image[:2] == b"\xff\xd8" else ".png" if image[:4] == b"\x89PNG" else ".img"
    path = folder / f"sample{suffix}"
    path.write_bytes(image)
    return path


def curl_line(base: str, image: str = SAMPLE) -> str:
    """A request to paste: one image, base64-encoded in MLflow's `dataframe_split` JSON."""
    return (f"curl -s {base}/invocations -H 'Content-Type: application/json' -d "
            f"\"{{\\\"dataframe_split\\\": {{\\\"columns\\\": [\\\"{IMAGE}\\\"], "
            f"\\\"data\\\": [[\\\"$(base64 -w0 {image})\\\"]]}}}}\"")
