"""The learning-rate finder: `pet-sweep lr-find`, anchored search spaces, the per-trial finder."""

from __future__ import annotations

import fcntl
import math
import struct
from pathlib import Path
from typing import Any, Callable

import pytest
from click.testing import CliRunner

from pet_sweep.config import load_experiment
from pet_sweep.errors import LRFindError
from pet_sweep.sweep.budget import WorkerRole
from tests.test_space import ANCHORED_SPACE


@pytest.fixture(autouse=True)
def _short_finder(monkeypatch: pytest.MonkeyPatch) -> None:
    """30 finder steps instead of fastai's 100: the same curve, coarser, on a shared CPU."""
    from pet_sweep.train import lrfind

    monkeypatch.setattr(lrfind, "NUM_IT", 30)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    """One torch thread: on a shared CPU, two threads per process cost more than they give."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_a_curve_that_diverges_at_once_gives_no_suggestion() -> None:
    from pet_sweep.train.lrfind import suggest_lrs

    lrs = [1e-7 * 1.2 ** i for i in range(12)]
    with pytest.raises(LRFindError, match="LR finder for resnet34, unfrozen phase: the loss diverged at once"):
        suggest_lrs(lrs, [2.0 * 3 ** i for i in range(12)], 100, "resnet34", "unfrozen")
    lrs = [1e-7 * 1.2 ** i for i in range(100)]
    with pytest.raises(LRFindError, match="resnet18, frozen phase"):
        suggest_lrs(lrs, [math.nan] * 100, 100, "resnet18", "frozen")


def test_suggestions_at_the_start_of_a_short_curve_get_a_caution() -> None:
    from pet_sweep.train.lrfind import caution_for

    lrs = [1e-7 * 10 ** (8 * i / 29) for i in range(30)]  # --num-it 30: 22 usable points from lrs[3]
    fine = {"minimum": lrs[3], "steep": 1e-3, "valley": 2e-3, "slide": 5e-3}
    assert caution_for(lrs, 30, fine) == ""  # minimum / 10 may sit anywhere: it is not judged
    short = {**fine, "slide": lrs[3]}
    assert caution_for(lrs, 30, short) == (
        f"slide at the start of the curve ({lrs[3]:.2e}, 22 usable points of 30 steps): too short a curve for it; "
        "trust valley, or run more steps (--num-it)")
    assert caution_for(lrs, 30, {**short, "steep": lrs[4]}).startswith("steep and slide at the start")


# -- the finder on tiny digits -------------------------------------------------------------------


@pytest.mark.train
def test_cli_lr_find_prints_plots_and_logs_both_phases(write_experiments: Callable[..., Path],
                                                       tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from pet_sweep.cli import cli

    path = write_experiments()
    out = tmp_path / "plots"
    result = CliRunner().invoke(cli, ["lr-find", "tiny", "--config", str(path), "--out", str(out), "--num-it", "40"])
    assert result.exit_code == 0, result.output
    for phase in ("frozen", "unfrozen"):
        line = next(line for line in result.output.splitlines() if line.startswith(f"resnet18   {phase}"))
        for method in ("minimum", "steep", "valley", "slide"):
            assert method in line
        width, height = png_size(out / f"lr-find-resnet18-{phase}.png")
        assert width >= 600 and height >= 400
    assert "after 1 frozen epoch of fit_one_cycle at 1.00e-02" in result.output

    exp = load_experiment(path)
    client = MlflowClient(exp.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(exp.tracking_experiment).experiment_id])
    assert run.info.run_name == "lr-find-resnet18" and run.info.status == "FINISHED"
    assert run.data.params["num_it"] == "40"  # --num-it reached fastai's lr_find
    for phase in ("frozen", "unfrozen"):
        for method in ("minimum", "steep", "valley", "slide"):
            lr = float(run.data.params[f"{phase}.{method}"])
            assert math.isfinite(lr) and lr > 0
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == [
        "lr-find-resnet18-frozen.png", "lr-find-resnet18-unfrozen.png"]
    # a caution on a short curve is printed and logged alike
    cautions = [line.split("caution: ", 1)[1] for line in result.output.splitlines() if "caution: " in line]
    assert cautions == [run.data.params[f"{p}.caution"] for p in ("frozen", "unfrozen") if f"{p}.caution" in
                        run.data.params]


def test_cli_lr_find_rejects_an_unknown_arch(write_experiments: Callable[..., Path]) -> None:
    from pet_sweep.cli import cli

    result = CliRunner().invoke(cli, ["lr-find", "--config", str(write_experiments()), "--arch", "resnet9000"])
    assert result.exit_code == 2
    assert "--arch: unknown architecture 'resnet9000'" in result.output


@pytest.mark.train
def test_finder_leaves_weights_and_training_unchanged(write_experiments: Callable[..., Path]) -> None:
    import tempfile

    import torch

    from pet_sweep.params import TrialParams
    from pet_sweep.tracking import Tracker
    from pet_sweep.train import lrfind, recipe
    from pet_sweep.train.data import build_data

    exp = load_experiment(write_experiments())
    data = build_data(exp)
    model = exp.config.model
    recipe.reseed(data.dls, 0)
    with tempfile.TemporaryDirectory() as tmp:
        learn = recipe.create_learner(data.dls, "resnet18", model, Path(tmp))
        learn.freeze()
        before = {k: v.clone() for k, v in learn.model.state_dict().items()}
        result = lrfind.run_finder(learn, "resnet18", "frozen")
        after = learn.model.state_dict()
        assert set(result.suggestions) == {"minimum", "steep", "valley", "slide"}
        assert all(torch.equal(before[k], after[k]) for k in before), "the finder changed the weights"
        # no zero gradients left behind: fastai would apply weight decay to the frozen body
        assert all(p.grad is None for p in learn.model.parameters())
        recipe.release(learn)

    # a trial trains exactly as it would without the finder (weights, gradients, random state)
    params = TrialParams("resnet18", 1e-2, 1e-3, 1e-2, 1, 1)
    tracker = Tracker(exp.tracking_uri, "finder-in-trial")
    run_id = tracker.start_run("finder-in-trial", {})
    plain = recipe.fine_tune(data.dls, params, model, seed=0)
    found = recipe.fine_tune(data.dls, params, model, seed=0, lr_find=lrfind.trial_finder(tracker, run_id))
    assert [r.valid_loss for r in found.history] == [r.valid_loss for r in plain.history]
    assert len(found.history) == 2  # the finder's mock epochs are not trial epochs
    from mlflow import MlflowClient

    assert float(MlflowClient(exp.tracking_uri).get_run(run_id).data.params["lr_find.frozen.valley"]) > 0


# -- anchored sweeps and the per-trial finder ------------------------------------------------------


@pytest.mark.train
def test_anchored_sweep_runs_the_finder_once_per_arch_and_phase(
        write_experiments: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    from pet_sweep.sweep.loop import run_sweep
    from pet_sweep.sweep.storage import open_study
    from pet_sweep.train import lrfind

    calls: list[tuple[str, tuple[str, ...]]] = []
    real_find = lrfind.find_lrs

    role = WorkerRole("finder-lock-test")

    def counted(dls: Any, arch: str, *args: Any, phases: Any, **kwargs: Any) -> Any:
        calls.append((arch, tuple(phases)))
        # the finder runs holding this machine's claim lock: a worker started beside this
        # one waits for it, then finds the anchors stored instead of running the finder again
        with open(role.lock_path, "a+") as other_worker, pytest.raises(BlockingIOError):
            fcntl.flock(other_worker, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return real_find(dls, arch, *args, phases=phases, **kwargs)

    monkeypatch.setattr(lrfind, "find_lrs", counted)
    path = write_experiments(space=ANCHORED_SPACE, budget={"n_trials": 1}, lr_find=True)
    exp = load_experiment(path)
    lines: list[str] = []
    run_sweep(exp, echo=lines.append, role=role)
    assert calls == [("resnet18", ("frozen", "unfrozen"))]
    # a second process: a fresh Study object on the same sqlite storage reuses the stored anchors
    run_sweep(load_experiment(path), echo=lines.append)
    assert len(calls) == 1
    assert "lr-find resnet18 frozen: stored in the study" in lines

    study = open_study(exp)
    anchors = {p: study.user_attrs[f"lr_find:resnet18:{p}"]["suggestions"] for p in ("frozen", "unfrozen")}
    trials = study.get_trials()
    assert len(trials) == 2 and all(t.state.name == "COMPLETE" for t in trials)
    client = MlflowClient(exp.tracking_uri)
    for trial in trials:
        base_lr = anchors["frozen"]["valley"] * trial.params["base_lr_factor"]
        assert trial.user_attrs["params"]["base_lr"] == pytest.approx(base_lr)
        assert trial.user_attrs["params"]["lr_hi"] == pytest.approx(
            anchors["unfrozen"]["valley"] * trial.params["lr_hi_factor"])
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert float(run.data.params["base_lr_anchor_lr"]) == pytest.approx(anchors["frozen"]["valley"])
        assert float(run.data.params["base_lr"]) == pytest.approx(base_lr)
        assert run.data.params["lr_hi_anchor"] == "unfrozen.valley"
        # lr_find: true -> the trial's own finder plot and suggestions
        assert float(run.data.params["lr_find.frozen.valley"]) > 0
        assert [a.path for a in client.list_artifacts(run.info.run_id) if a.path.startswith("lr_find")] == [
            "lr_find_frozen.png"]
    finder_runs = client.search_runs([client.get_experiment_by_name(exp.tracking_experiment).experiment_id],
                                     filter_string="tags.`pet_sweep.role` = 'lr-find'")
    assert [r.info.run_name for r in finder_runs] == ["lr-find-resnet18"]
    assert finder_runs[0].data.tags["mlflow.parentRunId"] == study.user_attrs["mlflow_parent_run_id"]


@pytest.mark.train
def test_a_diverging_finder_stops_the_sweep_before_any_trial(
        write_experiments: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from pet_sweep.cli import cli
    from pet_sweep.sweep.storage import open_study
    from pet_sweep.train import lrfind

    monkeypatch.setattr(lrfind, "START_LR", 1e4)  # the loss explodes from the first step
    path = write_experiments(space=ANCHORED_SPACE)
    result = CliRunner().invoke(cli, ["run", "--config", str(path)])
    assert result.exit_code == 2, result.output
    assert "LR finder for resnet18, frozen phase: the loss diverged at once" in result.output
    study = open_study(load_experiment(path), create=False)
    assert study.get_trials() == []
    assert not any(k.startswith("lr_find:") for k in study.user_attrs)
