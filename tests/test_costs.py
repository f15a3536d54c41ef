"""Every completed trial measures what it cost (train_seconds, predict_ms, predict_ms_batch,
params_m, peak_memory_mb): as Optuna user attrs and MLflow metrics of its run."""

from __future__ import annotations

import math
import sys
import time

import numpy as np
import optuna
import pytest
from click.testing import CliRunner

from pet_sweep.cli import cli
from pet_sweep.config import load_experiment
from pet_sweep.sweep.records import COST_ATTRS, COST_SECONDS_ATTR
from pet_sweep.train.costs import PeakMemory
from tests._sweeps import trial_runs

ONE_EPOCH = {"arch": "resnet18", "base_lr": 1.0e-2, "lr_hi": 1.0e-2, "lr_mult": 10, "freeze_epochs": 0, "epochs": 1}


@pytest.mark.train
def test_a_completed_trial_records_its_costs(write_experiments) -> None:
    path = write_experiments(space=ONE_EPOCH, data={"limit": 150, "test_pct": 0.0}, budget={"n_trials": 1})
    result = CliRunner().invoke(cli, ["run", "--config", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    exp = load_experiment(path)
    (trial,) = optuna.load_study(study_name=exp.study_name, storage=exp.storage_url).trials
    # peak_memory_mb is left out (not measured) where the CPU's resident memory cannot see the
    # trial's tensors; every other cost is always there
    assert set(COST_ATTRS) - {"peak_memory_mb"} <= set(trial.user_attrs)
    costs = {name: trial.user_attrs[name] for name in COST_ATTRS if name in trial.user_attrs}
    for name, cost in costs.items():
        assert math.isfinite(cost) and cost > 0, (name, cost)
    # the fit phases only: less than the trial, which also built the learner and measured
    assert costs["train_seconds"] < trial.duration.total_seconds()
    measuring = trial.user_attrs[COST_SECONDS_ATTR]
    assert 0 < measuring < trial.duration.total_seconds()

    from fastai.vision.learner import create_vision_model  # heavy: fastai
    from torchvision.models import resnet18  # heavy: torchvision

    model = create_vision_model(resnet18, n_out=10, pretrained=False)  # digits: 10 classes
    assert costs["params_m"] == pytest.approx(sum(p.numel() for p in model.parameters()) / 1e6, rel=1e-9)

    run = trial_runs(exp.tracking_uri, exp.tracking_experiment, exp.study_name)[0]
    for name, cost in costs.items():
        assert run.data.metrics[name] == pytest.approx(cost), name
    assert run.data.metrics[COST_SECONDS_ATTR] == pytest.approx(measuring)
    # the trial line shows its predict_ms
    line = next(line for line in result.output.splitlines() if line.startswith("trial   0 COMPLETE"))
    assert f"predict_ms={costs['predict_ms']:.3g}" in line, line
    # the end of the sweep timed its one model side by side (`train.timing`) and stored the session
    from pet_sweep.report.costs import CostKey, session_of
    from pet_sweep.sweep.records import DEVICE_ATTR
    from pet_sweep.train.timing import ROUNDS

    assert trial.user_attrs[DEVICE_ATTR] == "cpu"
    session = session_of(optuna.load_study(study_name=exp.study_name, storage=exp.storage_url).user_attrs)
    (timed,) = session.timings
    assert timed.key == CostKey("resnet18", 16, "fp32", 32, "cpu", False)
    assert {i.n for i in timed.intervals.values()} == {ROUNDS} and timed.params_m == pytest.approx(costs["params_m"])
    assert "costs        1 model of 1 completed trial timed side by side" in result.output


def _allocate_and_free(megabytes: int, hold: float = 0.0) -> None:
    block = np.ones(megabytes * 2**20 // 8)  # written, so resident
    time.sleep(hold)
    del block


@pytest.mark.parametrize("method", ["default", "sampled"])
def test_peak_memory_sees_a_freed_allocation(method: str) -> None:
    peak = PeakMemory("cpu")
    if method == "sampled":
        pytest.importorskip("psutil")
        peak.method = "sampled"  # the fallback where the kernel keeps no resettable high-water mark
    else:
        # Linux resets and reports the high-water mark; the fallback elsewhere
        assert peak.method == ("vmhwm" if sys.platform.startswith("linux") else "sampled")
    peak.start()
    _allocate_and_free(200, hold=0.2 if method == "sampled" else 0.0)
    grown = peak.stop()
    assert grown >= 150, grown
    # a window in which nothing is allocated grows by far less
    peak.start()
    assert peak.stop() < 50


def test_predict_ms_times_the_model_alone_at_batch_size_1_and_the_training_batch_size() -> None:
    import torch

    from pet_sweep.train import costs

    class Recorder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(3 * 4 * 4, 2)
            self.calls: list[tuple[int, bool, bool]] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls.append((len(x), self.training, torch.is_inference_mode_enabled()))
            return self.linear(x.flatten(1))

    class Loaders:  # what predict_ms reads of fastai's DataLoaders
        train = type("Train", (), {"bs": 8})()
        valid = [(torch.randn(8, 3, 4, 4), torch.zeros(8)) for _ in range(5)]

    learn = type("Learn", (), {"model": Recorder(), "dls": Loaders()})()
    single, batched = costs.predict_ms(learn, "fp32")
    assert math.isfinite(single) and single > 0 and math.isfinite(batched) and batched > 0
    sizes = [n for n, _, _ in learn.model.calls]
    # one warm-up and PREDICT_ITEMS timed passes of one image; one warm-up and
    # PREDICT_BATCHES x BATCH_REPEATS timed passes of a training-size batch
    assert sizes == [1] * (1 + costs.PREDICT_ITEMS) + [8] * (1 + costs.PREDICT_BATCHES * costs.BATCH_REPEATS)
    assert {(training, inference) for _, training, inference in learn.model.calls} == {(False, True)}
    assert learn.model.training  # left in the mode it was in


def test_a_small_validation_set_is_measured_whole() -> None:
    import torch

    from pet_sweep.train import costs

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))
    loaders = type("Loaders", (), {"train": type("Train", (), {"bs": 64})(),
                                   "valid": [(torch.randn(5, 3, 2, 2), torch.zeros(5))]})()
    single, batched = costs.predict_ms(type("Learn", (), {"model": model, "dls": loaders})(), "fp32")
    assert single > 0 and batched > 0
    assert costs.params_m(model) == (12 * 2 + 2) / 1e6
