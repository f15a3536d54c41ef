"""The chapter-5 recipe on a tiny slice of digits: phases, discriminative LRs, history, weights."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from pet_sweep.config import load_experiment
from pet_sweep.errors import PetSweepError, TrainingDiverged
from pet_sweep.params import TrialParams
from pet_sweep.sweep.objective import message_of
from pet_sweep.train.data import build_data
from pet_sweep.train.recipe import fine_tune, precision_for


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    import yaml

    from tests.conftest import TINY_SPACE, tiny_experiment

    folder = tmp_path_factory.mktemp("recipe")
    (folder / "sweeps").mkdir()
    (folder / "sweeps" / "tiny.yaml").write_text(yaml.safe_dump(TINY_SPACE))
    (folder / "experiments.yaml").write_text(yaml.safe_dump({"experiments": {"tiny": tiny_experiment()}}))
    exp = load_experiment(folder / "experiments.yaml")
    return exp, build_data(exp)


@pytest.mark.train
def test_freeze_then_unfreeze_with_global_epochs(tiny) -> None:
    exp, data = tiny
    seen = []
    params = TrialParams("resnet18", base_lr=1e-2, lr_lo=1e-4, lr_hi=1e-2, freeze_epochs=1, epochs=2)
    result = fine_tune(data.dls, params, exp.config.model, seed=0, listeners=[seen.append])
    assert [r.epoch for r in result.history] == [0, 1, 2]  # fastai restarts at 0 each fit; we do not
    assert [r.phase for r in result.history] == ["frozen", "unfrozen", "unfrozen"]
    assert seen == result.history
    assert all(math.isfinite(r.train_loss) and math.isfinite(r.valid_loss) for r in result.history)
    assert 0 <= result.error_rate <= 1 and result.precision == "fp32"
    assert len(result.valid_preds) == len(result.valid_targets) == data.n_valid
    wrong = sum(p != t for p, t in zip(result.valid_preds, result.valid_targets))
    assert wrong / data.n_valid == pytest.approx(result.error_rate, abs=1e-6)
    # slice(lo, hi) became even_mults(lo, hi, 3) over a ResNet's three parameter groups
    from fastcore.basics import even_mults

    assert result.group_lrs["unfrozen"] == pytest.approx(list(even_mults(1e-4, 1e-2, 3)))
    assert result.group_lrs["frozen"][-1] == pytest.approx(1e-2)


@pytest.mark.train
def test_no_frozen_phase(tiny) -> None:
    exp, data = tiny
    params = TrialParams("resnet18", base_lr=1e-2, lr_lo=1e-3, lr_hi=1e-2, freeze_epochs=0, epochs=1)
    result = fine_tune(data.dls, params, exp.config.model, seed=0)
    assert [r.phase for r in result.history] == ["unfrozen"] and "frozen" not in result.group_lrs


@pytest.mark.train
def test_same_seed_same_result(tiny) -> None:
    exp, data = tiny
    params = TrialParams("resnet18", base_lr=1e-2, lr_lo=1e-3, lr_hi=1e-2, freeze_epochs=0, epochs=1)
    a = fine_tune(data.dls, params, exp.config.model, seed=3)
    b = fine_tune(data.dls, params, exp.config.model, seed=3)
    assert a.history[-1].train_loss == pytest.approx(b.history[-1].train_loss, rel=1e-4)
    assert a.valid_preds == b.valid_preds


@pytest.mark.train
def test_diverging_loss_stops_with_reason(tiny) -> None:
    exp, data = tiny
    params = TrialParams("resnet18", base_lr=1e6, lr_lo=1e5, lr_hi=1e6, freeze_epochs=1, epochs=1)
    with pytest.raises(TrainingDiverged, match="training loss became (nan|inf)"):
        fine_tune(data.dls, params, exp.config.model, seed=0)


@pytest.mark.train
def test_a_loss_that_blows_up_but_stays_finite_stops_in_its_first_epoch(tiny) -> None:
    exp, data = tiny
    seen = []
    # learning rates 1,000x too high send the training loss to ~1e4, still finite
    params = TrialParams("resnet18", base_lr=10, lr_lo=1, lr_hi=10, freeze_epochs=1, epochs=1)
    with pytest.raises(TrainingDiverged) as caught:
        fine_tune(data.dls, params, exp.config.model, seed=0, listeners=[seen.append])
    found = re.match(r"diverged: loss rose from ([\d.]+) to ([\d.e+]+) by batch (\d+) \(epoch 0, frozen phase", message_of(caught.value))
    assert found, caught.value
    start, end, batch = float(found[1]), float(found[2]), int(found[3])
    assert end > 10 * start and math.isfinite(end)
    assert 1 <= batch <= len(data.dls.train) and seen == []  # within epoch 0: no epoch finished


@pytest.mark.parametrize(("base_lr", "lr_hi", "lr_mult", "freeze_epochs", "epochs"), [
    (3e-2, 3e-2, 1, 0, 2),   # the digits space's highest learning rates, warm-up over 2 epochs only
    (3e-2, 3e-2, 1, 1, 1),   # ... after a frozen epoch: the unfrozen phase's loss rises above the frozen one's
])
@pytest.mark.train
def test_a_normal_trial_is_not_stopped_by_its_warm_up(tiny, base_lr: float, lr_hi: float, lr_mult: float,
                                                      freeze_epochs: int, epochs: int) -> None:
    exp, data = tiny
    params = TrialParams("resnet18", base_lr=base_lr, lr_lo=lr_hi / lr_mult, lr_hi=lr_hi,
                         freeze_epochs=freeze_epochs, epochs=epochs)
    result = fine_tune(data.dls, params, exp.config.model, seed=0)
    assert len(result.history) == 2


@pytest.mark.train
def test_channels_last_trains_the_model_in_nhwc(tiny) -> None:
    exp, data = tiny
    params = TrialParams("resnet18", base_lr=1e-2, lr_lo=1e-3, lr_hi=1e-2, freeze_epochs=0, epochs=1)
    model = exp.config.model.model_copy(update={"channels_last": True})
    result = fine_tune(data.dls, params, model, seed=0, keep_learner=True)
    convs = [m.weight for m in result.learner.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert all(math.isfinite(r.train_loss) and math.isfinite(r.valid_loss) for r in result.history)
    plain = fine_tune(data.dls, params, exp.config.model, seed=0, keep_learner=True)
    assert not all(m.weight.is_contiguous(memory_format=torch.channels_last)
                   for m in plain.learner.model.modules() if isinstance(m, torch.nn.Conv2d))


def test_precision_recorded_as_run() -> None:
    assert precision_for("auto", "cpu") == "fp32"
    assert precision_for("fp16", torch.device("cpu")) == "fp32"
    assert precision_for("auto", "cuda") == "fp16"
    assert precision_for("bf16", "cuda:0") == "bf16"


@pytest.mark.train
def test_pretrained_weights_from_torch_home_cache(tiny, tmp_path: Path, monkeypatch) -> None:
    """The pretrained path loads torchvision's cached file; no download happens."""
    import torchvision

    exp, data = tiny
    reference = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        reference.conv1.weight.fill_(0.0123)
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / url.rsplit("/", 1)[-1])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    model = exp.config.model.model_copy(update={"pretrained": True})
    params = TrialParams("resnet18", base_lr=1e-3, lr_lo=1e-4, lr_hi=1e-3, freeze_epochs=0, epochs=1)
    from pet_sweep.train.recipe import create_learner

    learn = create_learner(data.dls, "resnet18", model, tmp_path)
    assert torch.allclose(learn.model[0][0].weight, torch.full_like(learn.model[0][0].weight, 0.0123))
    result = fine_tune(data.dls, params, model, seed=0)
    assert math.isfinite(result.history[-1].train_loss)


def test_missing_pretrained_weights_is_a_clear_error(tiny, tmp_path: Path, monkeypatch) -> None:
    import urllib.request

    exp, data = tiny
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    model = exp.config.model.model_copy(update={"pretrained": True})
    from pet_sweep.train.recipe import create_learner

    with pytest.raises(PetSweepError, match="model.weights"):
        create_learner(data.dls, "resnet34", model, tmp_path)


def test_local_weights_file(tiny, tmp_path: Path) -> None:
    import torchvision

    exp, data = tiny
    reference = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        reference.conv1.weight.fill_(0.5)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    from pet_sweep.train.recipe import create_learner

    model = exp.config.model.model_copy(update={"weights": str(path)})
    learn = create_learner(data.dls, "resnet18", model, tmp_path)
    assert torch.all(learn.model[0][0].weight == 0.5)
    assert len(learn.splitter(learn.model)) == 3  # fastai's ResNet split still applies
    bad = exp.config.model.model_copy(update={"weights": str(tmp_path / "missing.pth")})
    with pytest.raises(PetSweepError, match="checkpoint not found"):
        create_learner(data.dls, "resnet18", bad, tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("channels_last", [False, True])
def test_fp16_on_cuda(tiny, channels_last: bool) -> None:
    exp, _ = tiny
    data = build_data(exp, device=torch.device("cuda"))
    model = exp.config.model.model_copy(update={"precision": "fp16", "channels_last": channels_last})
    params = TrialParams("resnet18", base_lr=1e-2, lr_lo=1e-3, lr_hi=1e-2, freeze_epochs=1, epochs=1)
    result = fine_tune(data.dls, params, model, seed=0)
    assert result.precision == "fp16" and "cuda" in result.device
    assert all(math.isfinite(r.train_loss) for r in result.history)
