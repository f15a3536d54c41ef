"""From the best config to a served model: `train --register NAME`, the pyfunc model it
registers, and `pet-sweep serve NAME` (a real `mlflow models serve`) answering a request."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

from pet_sweep.cli import cli
from tests._sweeps import closed_port as free_port  # a port nothing listens on, for the server
from tests.conftest import trains

NAME = "tiny-best"


@pytest.fixture(scope="module")
@trains
def registered(finished_study: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The finished study's best trial, exported, re-trained and registered as NAME version 1."""
    best = tmp_path_factory.mktemp("serve") / "best.yaml"
    runner = CliRunner()
    done = runner.invoke(cli, ["export", "--config", str(finished_study), "-o", str(best)], catch_exceptions=False)
    assert done.exit_code == 0, done.output
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        done = runner.invoke(cli, ["train", str(best), "--register", NAME], catch_exceptions=False)
    assert done.exit_code == 0, done.output
    assert f"registered   {NAME} version 1: pet-sweep serve {NAME} --version 1" in done.output
    # one line per step: no artifact bars, no warnings about the pickles pet-sweep itself wrote
    assert "Downloading artifacts" not in done.output and "Successfully registered" not in done.output
    noise = [str(w.message) for w in caught if re.search("pickle", str(w.message))]
    assert not noise, noise
    from pet_sweep.config import load_experiment

    return best, load_experiment(finished_study).tracking_uri


def held_out_digits(best: Path, n: int = 10) -> list[Path]:
    from pet_sweep.replay import load_replay
    from pet_sweep.train.data import build_data

    _, exp = load_replay(best)
    return list(build_data(exp).splits.test[:n])


@pytest.mark.slow
def test_the_registered_model_predicts_as_learn_predict(registered: tuple[Path, str]) -> None:
    import mlflow
    import pandas as pd
    from fastai.vision.core import PILImage
    from mlflow import MlflowClient

    best, uri = registered
    mlflow.set_tracking_uri(uri)
    version = MlflowClient().get_model_version(NAME, "1")
    tags = version.tags
    assert tags["held_out"] == "true" and float(tags["test_error_rate"]) >= 0 and "arch=" in tags["params"]
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    assert [c.name for c in model.metadata.signature.inputs.inputs] == ["image", "path"]
    digits = held_out_digits(best)
    out = model.predict(pd.DataFrame({"image": [p.read_bytes() for p in digits]}))
    learn = model.unwrap_python_model().learn
    for digit, (_, row) in zip(digits, out.iterrows()):
        label, index, probs = learn.predict(PILImage.create(digit))
        assert row["label"] == str(label) and row["probability"] == pytest.approx(float(probs[index]), abs=1e-6)
    by_path = model.predict(pd.DataFrame({"path": [str(digits[0])]}))  # a file on the serving machine
    assert by_path.iloc[0]["label"] == out.iloc[0]["label"]


@pytest.mark.slow
def test_serve_answers_the_printed_request(registered: tuple[Path, str], tmp_path: Path) -> None:
    best, uri = registered
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pet_sweep", "serve", NAME, "--version", "1", "--port", str(port),
                             "--tracking-uri", uri], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 240
        while not any(line.startswith("curl ") for line in lines) and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            lines.append(line.rstrip("\n"))
        curl = next((line for line in lines if line.startswith("curl ")), None)
        assert curl is not None, "\n".join(lines)
        assert f"http://127.0.0.1:{port}/invocations" in curl and "dataframe_split" in curl
        assert not any(line.startswith("open ") for line in lines), lines  # a POST-only endpoint is no page
        junk = base64.b64encode(b"not a png").decode()
        digit = held_out_digits(best, 1)[0]
        good = base64.b64encode(digit.read_bytes()).decode()
        # not an image: a 400 whose message starts with pet-sweep's sentence, and the server keeps answering
        message = refused_message(port, ["image"], [[junk]])
        assert message.startswith("row 0: `image` (9 bytes) is not an image PIL can read"), message
        # no `image` or `path` column: refused, naming the columns expected (MLflow would answer [])
        message = refused_message(port, ["img"], [[good]])
        assert message.startswith("the request has no `image` column") and "`path` column" in message, message
        # one bad row in a batch: the whole request refused, and said so
        message = refused_message(port, ["image"], [[good], [junk], [good]])
        assert message.startswith("row 1: `image` (9 bytes)") and "The whole request was refused" in message
        assert "row 0" not in message and "row 2" not in message
        body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(digit.read_bytes()).decode()]]}}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())
        [row] = answer["predictions"]
        assert re.fullmatch(r"\d", row["label"]) and 0 < row["probability"] <= 1, answer
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)  # the server and the workers it started
            proc.wait(30)


def refused_message(port: int, columns: list[str], data: list[list[str]]) -> str:
    """The message of the HTTP 400 the server answers this `dataframe_split` request with."""
    body = {"dataframe_split": {"columns": columns, "data": data}}
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                                      json.dumps(body).encode(),
                                                      {"Content-Type": "application/json"}), timeout=60)
    assert refused.value.code == 400
    return json.loads(refused.value.read())["message"]


@pytest.mark.train
def test_register_on_a_store_without_a_registry_stops_before_training(
        finished_study: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    from pet_sweep.config import load_experiment

    best = tmp_path / "best.yaml"
    runner = CliRunner()
    assert runner.invoke(cli, ["export", "--config", str(finished_study), "-o", str(best)]).exit_code == 0
    mlflow.set_tracking_uri(load_experiment(finished_study).tracking_uri)
    before = len(mlflow.search_runs(search_all_experiments=True))
    # a registry MLflow has no store for (as a tracking server without the registry's endpoints)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", "ftp://user:hunter2@registry.invalid/models")
    done = runner.invoke(cli, ["train", str(best), "--register", "nowhere"])
    assert done.exit_code == 2, done.output
    assert "--register: the Model Registry at ftp://user:***@registry.invalid/models cannot be used" in done.output
    assert "nothing was trained or registered" in done.output and "hunter2" not in done.output
    assert len(mlflow.search_runs(search_all_experiments=True)) == before  # no replay run was started
