"""bf16 on a CPU: pet-sweep's autocast callback, the capability check, the fallback, the record."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml

from pet_sweep.train import amp, recipe

NO_BF16 = ("this CPU has no bf16 kernels in torch (torch.ops.mkldnn._is_mkldnn_bf16_supported() is False): "
           "pet-sweep trains in fp32 here")


def tiny_learner(model: torch.nn.Module) -> Any:
    """A fastai Learner on 32 random 8x8 images of 2 classes (bf16 on such a model is quick even
    where torch emulates it)."""
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, 8, 8, generator=gen), torch.randint(0, 2, (32,), generator=gen)
    ds = list(zip(x, y))
    dls = DataLoaders.from_dsets(ds, ds, bs=8, device=torch.device("cpu"))
    return Learner(dls, model, loss_func=torch.nn.functional.cross_entropy, cbs=[amp.CpuMixedPrecision()])


def conv_net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(4, 2))


def test_capability_check_is_torchs_own() -> None:
    """The private torch name `cpu_bf16_supported` wraps: pinned, so a torch that drops it fails here."""
    assert callable(torch.ops.mkldnn._is_mkldnn_bf16_supported)
    assert amp.cpu_bf16_supported() == (torch.backends.mkldnn.is_available()
                                        and torch.ops.mkldnn._is_mkldnn_bf16_supported())


@pytest.mark.train
def test_callback_trains_and_validates_under_cpu_autocast() -> None:
    model = conv_net()
    seen: list[tuple[bool, torch.dtype]] = []
    model[0].register_forward_hook(lambda m, i, out: seen.append((m.training, out.dtype)))
    learn = tiny_learner(model)
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-2)
        learn.validate()
    assert {dtype for _, dtype in seen} == {torch.bfloat16}  # the conv computed in bf16 ...
    assert {training for training, _ in seen} == {True, False}  # ... in training and in validation
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the weights stay fp32
    assert learn.pred.dtype == torch.float32 and torch.isfinite(learn.loss)
    assert not torch.is_autocast_enabled("cpu")  # switched off between batches and after the fit


@pytest.mark.train
def test_a_batch_that_raises_does_not_leave_autocast_on() -> None:
    class Failing(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(2, 2)  # something for the optimizer to hold

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("forward failed")

    learn = tiny_learner(Failing())
    with learn.no_bar(), learn.no_logging(), pytest.raises(RuntimeError, match="forward failed"):
        learn.fit(1)
    assert torch.is_autocast_enabled("cpu")  # fastai calls no event after a plain exception ...
    amp.leave_autocast(learn)  # ... so `recipe.fine_tune` does this in its `finally`
    assert not torch.is_autocast_enabled("cpu")


def test_unsupported_cpu_trains_in_fp32_and_says_so(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(amp, "cpu_bf16_supported", lambda: False)
    recipe._notice.cache_clear()
    assert recipe.precision_for("bf16", torch.device("cpu")) == "fp32"
    assert "bf16 needs a CUDA GPU or a CPU with bf16 kernels" in capsys.readouterr().err
    assert recipe.precision_for("auto", "cpu") == "fp32"
    assert recipe.precision_for("bf16", "cuda") == "bf16"  # a GPU's bf16 is fastai's, as before
    learn = SimpleNamespace(dls=SimpleNamespace(device=torch.device("cpu")), cbs=[])
    learn.add_cb = learn.cbs.append
    model = SimpleNamespace(precision="bf16", channels_last=False)
    assert recipe.apply_precision(learn, model) == "fp32" and learn.cbs == []


def test_supported_cpu_runs_bf16_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(amp, "cpu_bf16_supported", lambda: True)
    assert recipe.precision_for("bf16", "cpu") == "bf16"
    assert recipe.precision_for("auto", "cpu") == amp.CPU_AUTO
    assert recipe.precision_for("bf16", "meta") == "fp32"  # pet-sweep's autocast is the CPU's alone
    learn = SimpleNamespace(dls=SimpleNamespace(device=torch.device("cpu")), cbs=[])
    learn.add_cb = learn.cbs.append
    model = SimpleNamespace(precision="bf16", channels_last=False)
    assert recipe.apply_precision(learn, model) == "bf16"
    assert [type(cb) for cb in learn.cbs] == [amp.CpuMixedPrecision]


@pytest.mark.train
@pytest.mark.skipif(not amp.cpu_bf16_supported(), reason=NO_BF16)
def test_a_tiny_trial_runs_in_bf16_on_this_cpu(tmp_path: Path) -> None:
    import optuna

    import pet_sweep
    from pet_sweep.replay import without_training_callbacks
    from tests.conftest import TINY_SPACE, tiny_experiment

    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "tiny.yaml").write_text(yaml.safe_dump(TINY_SPACE))
    spec = tiny_experiment(model={"precision": "bf16"}, budget={"n_trials": 1})
    (tmp_path / "experiments.yaml").write_text(yaml.safe_dump({"experiments": {"tiny": spec}}))
    exp = pet_sweep.config.load_experiment(tmp_path / "experiments.yaml")
    _, study = pet_sweep.run(exp, echo=lambda line: None)
    (trial,) = study.get_trials()
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.user_attrs["precision"] == "bf16"

    from pet_sweep.params import params_from_dict
    from pet_sweep.train.data import build_data

    data = build_data(exp)
    result = recipe.fine_tune(data.dls, params_from_dict(trial.user_attrs["params"]), exp.config.model, seed=0,
                              keep_learner=True)
    assert result.precision == "bf16"
    without_training_callbacks(result.learner)  # what replay does before predicting and exporting
    assert not any(isinstance(cb, amp.CpuMixedPrecision) for cb in result.learner.cbs)
    assert all(p.dtype == torch.float32 for p in result.learner.model.parameters())
