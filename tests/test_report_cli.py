"""`pet-sweep report`, `export` and `train` end to end on a tiny real study, the notebook, bad input.

One two-trial digits study (300 digits at 16 px, 1 frozen + 1 unfrozen epoch) is
trained once for the whole module; every test reads it, so each must leave it as
it found it (replays only add MLflow runs).
"""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml
from click.testing import CliRunner

from pet_sweep.cli import cli
from tests.conftest import TINY_SPACE, tiny_experiment, trains

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "analysis.ipynb"


def invoke(*args: str) -> Any:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def write_config(folder: Path, **overrides: Any) -> Path:
    (folder / "sweeps").mkdir(parents=True, exist_ok=True)
    space = {**TINY_SPACE, "arch": {"choices": ["resnet18", "xresnet18"]},
             "base_lr": {"low": 3e-3, "high": 3e-2, "log": True}}
    (folder / "sweeps" / "tiny.yaml").write_text(yaml.safe_dump(space))
    doc = {"default": "tiny", "experiments": {"tiny": tiny_experiment(**overrides)}}
    path = folder / "experiments.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture(scope="module")
@trains
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """experiments.yaml of a finished two-trial study (trained once per module)."""
    path = write_config(tmp_path_factory.mktemp("study"))
    result = invoke("run", "--config", path)
    assert result.exit_code == 0, result.output
    assert result.output.count("COMPLETE") == 2
    return path


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.mark.train
def test_optuna_figures_have_one_title_and_no_white_lines(study: Path) -> None:
    import matplotlib.colors
    import optuna
    from matplotlib.ticker import PercentFormatter

    from pet_sweep.report.figures import optuna_figures

    storage = f"sqlite:///{study.parent / 'stores' / 'optuna.db'}"
    loaded = optuna.load_study(study_name="tiny", storage=storage)
    figures, notes = optuna_figures(loaded, ["arch", "base_lr"])
    assert set(figures) == {"param_importances", "parallel_coordinate"}, notes
    assert set(optuna_figures(loaded)[0]) == {"parallel_coordinate"}  # no ranked parameters: no importance figure
    for name, fig in figures.items():
        left_right = [ax.get_title("left") + ax.get_title("right") for ax in fig.axes]
        assert not "".join(left_right)  # Optuna's title no longer drawn under ours
        titles = [ax.get_title() for ax in fig.axes if ax.get_title()] + ([fig._suptitle.get_text()] if fig._suptitle else [])
        assert len(titles) == 1, (name, titles)  # one title; the parallel plot's above the figure, clear of its axes
    assert figures["parallel_coordinate"]._suptitle is not None
    # the error rate in percent, on its axis and its colour bar
    assert isinstance(figures["parallel_coordinate"].axes[0].yaxis.get_major_formatter(), PercentFormatter)
    lines = next(c for ax in figures["parallel_coordinate"].axes for c in ax.collections if c.get_array() is not None)
    # the worst trial's line is not drawn near-white: it must show on the plot's background
    worst = matplotlib.colors.to_rgb(lines.get_cmap()(1.0))
    assert min(worst) < 0.5


@pytest.mark.train
def test_report_end_to_end(study: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = invoke("report", "--config", study, "--out", out)
    assert result.exit_code == 0, result.output
    text = result.output
    for label in ("best", "valid error", "vs runner-up", "held-out", "verdicts", "next", "report"):
        assert re.search(rf"^{label}\s", text, re.M), (label, text)
    assert re.search(r"\d+\.\d\d% \(95% CI \d+\.\d\d%–\d+\.\d\d%, \d+/60 wrong\)", text)  # 20 % of 300 digits
    assert re.search(r"within noise|beyond noise", text)
    assert "selected as the best of 2 trials on these 60 items" in text
    # two trials are too few for an importance ranking: said, and no figure drawn
    assert re.search(r"^matters most\s+not ranked: 2 completed trials", text, re.M), text
    names = {p.name for p in files_under(out)}
    assert {"report.html", "report.md", "loss_curves.png", "error_curves.png", "error_vs_gap.png",
            "parallel_coordinate.png"} <= names and "param_importances.png" not in names
    page = (out / "report.html").read_text()
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == 4 and all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert "src='figures/" not in page  # self-contained
    md = (out / "report.md").read_text()
    assert "## Trials, best first" in md and "(figures/loss_curves.png)" in md
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out-")]  # temp folder cleaned up

    import optuna
    from mlflow import MlflowClient

    storage = f"sqlite:///{study.parent / 'stores' / 'optuna.db'}"
    parent = optuna.load_study(study_name="tiny", storage=storage).user_attrs["mlflow_parent_run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{study.parent / 'stores' / 'mlflow.db'}")
    attached = {Path(a.path).name for a in client.list_artifacts(parent, "report")}
    assert {"report.html", "report.md", "figures"} <= attached


@pytest.mark.train
def test_report_on_a_running_study(study: Path, tmp_path: Path) -> None:
    import shutil

    import optuna

    copy = tmp_path / "copy"
    shutil.copytree(study.parent, copy, ignore=shutil.ignore_patterns("reports"))
    live = optuna.load_study(study_name="tiny", storage=f"sqlite:///{copy / 'stores' / 'optuna.db'}")
    trial = live.ask()  # a worker is training it right now: one epoch so far
    trial.set_user_attr("params", live.trials[0].user_attrs["params"])
    trial.set_user_attr("history", live.trials[0].user_attrs["history"][:1])
    result = invoke("report", "--config", copy / "experiments.yaml", "--out", tmp_path / "out", "--no-mlflow-attach")
    assert result.exit_code == 0, result.output
    assert "3 trials (2 complete, 1 running)" in result.output and "still running" in result.output
    assert re.search(r"\| 2 \| RUNNING \|.*\| running \|", (tmp_path / "out" / "report.md").read_text())


@pytest.mark.train
def test_report_time_costs_times_the_studys_models_again_and_tables_them(study: Path, tmp_path: Path) -> None:
    import shutil

    import optuna

    from pet_sweep.report.costs import TIMINGS_ATTR

    copy = tmp_path / "copy"  # --time-costs stores its session in the study: not the module's
    shutil.copytree(study.parent, copy, ignore=shutil.ignore_patterns("reports"))
    storage = f"sqlite:///{copy / 'stores' / 'optuna.db'}"
    at_end = optuna.load_study(study_name="tiny", storage=storage).user_attrs[TIMINGS_ATTR]  # `run` timed them
    result = invoke("report", "--config", copy / "experiments.yaml", "--out", tmp_path / "out", "--no-mlflow-attach",
                    "--time-costs")
    assert result.exit_code == 0, result.output
    again = optuna.load_study(study_name="tiny", storage=storage).user_attrs[TIMINGS_ATTR]
    assert again != at_end and len(again["timings"]) == len(at_end["timings"]) >= 1
    assert re.search(r"^costs +\d+ models? of 2 completed trials timed side by side", result.output, re.M)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "### Costs by model" in md and f"timed side by side {again['when']}" in md


@pytest.mark.train
def test_export_train_round_trip(study: Path, tmp_path: Path) -> None:
    best_yaml = tmp_path / "best.yaml"
    result = invoke("export", "--config", study, "-o", best_yaml)
    assert result.exit_code == 0, result.output
    doc = yaml.safe_load(best_yaml.read_text())
    assert set(doc["params"]) == {"arch", "base_lr", "lr_lo", "lr_hi", "freeze_epochs", "epochs"}
    assert doc["data"]["test_pct"] == 0.1 and doc["seed"] == 0 and doc["model"]["img_size"] == 16
    # only what the run used: flip acts with augment, which the experiment leaves off
    assert "flip" not in doc["data"] and doc["data"]["augment"] is False
    trial = doc["source"]["trial"]

    # another MLflow store than the sweep's (the production machine's): a server that is down is
    # refused before any training
    from tests._sweeps import closed_port

    down = invoke("train", best_yaml, "--tracking-uri", f"http://127.0.0.1:{closed_port()}")
    assert down.exit_code == 2 and "cannot reach the MLflow tracking server" in down.output, down.output
    assert "valid error" not in down.output

    result = invoke("train", best_yaml, "--export-model")
    assert result.exit_code == 0, result.output
    assert "reproduces the trial (within its 95% interval)" in result.output
    assert re.search(r"test error\s+\d+\.\d\d% \(95% CI .*/30 wrong\)", result.output)  # 10 % of 300 held out
    assert "(held out: never seen by any trial)" in result.output  # the split's fingerprint matched
    assert doc["source"]["split"]["test"]["n"] == 30
    run_id = re.search(r"MLflow run\s+(\w+)", result.output).group(1)

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=doc["tracking"]["uri"])
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["pet_sweep.role"] == "replay" and run.data.tags["pet_sweep.replay_of"] == str(trial)
    # a replay, not a trial: filtering the sweep's runs by trial state does not count it
    assert run.data.tags["pet_sweep.kind"] == "replay" and "optuna.state" not in run.data.tags
    assert run.data.tags["mlflow.parentRunId"] == doc["source"]["mlflow_parent_run_id"]
    assert run.data.tags["pet_sweep.held_out"] == "true"
    assert run.data.metrics["valid_error_rate"] == pytest.approx(doc["source"]["validation_error"], abs=1 / 60 + 1e-6)
    assert {a.path for a in client.list_artifacts(run_id)} >= {"learner.pkl", "best.yaml"}

    # the exported learner loads and predicts
    from fastai.learner import load_learner

    learner_file = client.download_artifacts(run_id, "learner.pkl", str(tmp_path))
    learn = load_learner(learner_file)
    digit = next((Path(os.environ["PET_SWEEP_CACHE"]) / "digits").glob("7_*.png"))
    predicted, _, probs = learn.predict(digit)
    assert str(predicted) in [str(v) for v in learn.dls.vocab] and len(probs) == 10
    # a file name or an image in memory work as well as a Path, and give the same answer
    from fastai.vision.core import PILImage

    assert str(learn.predict(str(digit))[0]) == str(learn.predict(PILImage.create(digit))[0]) == str(predicted)

    # the report now shows the held-out test error beside the validation error
    result = invoke("report", "--config", study, "--out", tmp_path / "out", "--no-mlflow-attach")
    assert result.exit_code == 0, result.output
    held = next(line for line in result.output.splitlines() if line.startswith("held-out"))
    assert f"on the test split, replay of trial {trial}" in held and run_id in held


def test_importances_leave_out_inert_parameters_and_need_enough_trials() -> None:
    import optuna
    from optuna.distributions import FloatDistribution, IntDistribution

    from pet_sweep.report.read import param_importances

    dists = {"lr_hi": FloatDistribution(1e-4, 1e-1, log=True), "epochs": IntDistribution(1, 8),
             "freeze_epochs": IntDistribution(0, 1), "base_lr": FloatDistribution(1e-3, 1e-2, log=True)}
    study = optuna.create_study()
    for i in range(10):
        freeze = i % 2
        # trials 0-3: an old study recorded base_lr without a frozen phase; later ones leave it out
        params = {"lr_hi": 10 ** (-4 + i / 3), "epochs": 1 + i % 8, "freeze_epochs": freeze,
                  **({"base_lr": 10 ** (-3 + i / 10)} if freeze or i < 4 else {})}
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions={k: dists[k] for k in params}, value=0.01 + i / 100,
            user_attrs={"params": {"arch": "resnet18", **params}}))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.RUNNING))  # not counted
    importances, note = param_importances(study)
    assert set(importances) == {"lr_hi", "epochs", "freeze_epochs"}
    assert note == "base_lr left out: it acted in 5 of 10 completed trials"
    fewer = optuna.create_study()
    fewer.add_trials([t for t in study.trials if t.number < 9])
    assert param_importances(fewer) == ({}, "not ranked: 9 completed trials, fewer than the 10 an importance "
                                            "ranking needs to be more than noise")


@pytest.mark.train
def test_no_frozen_phase_leaves_base_lr_out_of_the_trial_mlflow_and_best_yaml(tmp_path: Path) -> None:
    import optuna
    from mlflow import MlflowClient

    path = write_config(tmp_path, data={"limit": 120, "valid_pct": 0.25, "test_pct": 0.1}, budget={"n_trials": 1})
    space = yaml.safe_load((tmp_path / "sweeps" / "tiny.yaml").read_text())
    (tmp_path / "sweeps" / "tiny.yaml").write_text(yaml.safe_dump({**space, "freeze_epochs": 0}))
    result = invoke("run", "--config", path)
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if "COMPLETE" in x)
    assert "base_lr" not in line and "freeze_epochs=0" in line  # absent, not 0
    trial = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'stores' / 'optuna.db'}").trials[0]
    assert "base_lr" not in trial.params and "base_lr" not in trial.user_attrs["params"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'stores' / 'mlflow.db'}")
    run = client.get_run(trial.user_attrs["mlflow_run_id"])
    assert "base_lr" not in run.data.params and run.data.params["freeze_epochs"] == "0"
    config = yaml.safe_load(open(client.download_artifacts(run.info.run_id, "trial_config.yaml", str(tmp_path))))
    assert "base_lr" not in config["params"]
    best_yaml = tmp_path / "best.yaml"
    assert invoke("export", "--config", path, "-o", best_yaml).exit_code == 0
    assert "base_lr" not in yaml.safe_load(best_yaml.read_text())["params"]
    report = invoke("report", "--config", path, "--out", tmp_path / "out", "--no-mlflow-attach")
    assert report.exit_code == 0, report.output
    assert "base_lr does nothing in this space" in report.output and "base_lr=" not in report.output
    replay = invoke("train", best_yaml)
    assert replay.exit_code == 0, replay.output
    assert "base_lr" not in next(x for x in replay.output.splitlines() if x.startswith("replay"))
    # with a frozen phase, a config missing base_lr is refused, naming the key
    doc = yaml.safe_load(best_yaml.read_text())
    doc["params"]["freeze_epochs"] = 1
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    refused = invoke("train", bad)
    assert refused.exit_code == 2 and "base_lr" in refused.output, refused.output


@pytest.mark.train
def test_notebook_executes(study: Path) -> None:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    env_before = dict(os.environ)
    os.environ.update(PET_SWEEP_CONFIG=str(study), PET_SWEEP_EXPERIMENT="tiny")
    os.environ.pop("MPLBACKEND", None)  # let the kernel use its inline backend
    try:
        NotebookClient(nb, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    outputs = [o for cell in nb.cells for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 4
    printed = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "valid error" in printed and "vs runner-up" in printed


# -- bad input: exit code 2, a clear message, nothing written --------------------


def test_no_study_yet(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    out = tmp_path / "out"
    result = invoke("report", "--config", path, "--out", out)
    assert result.exit_code == 2
    assert "no Optuna storage at" in result.output and "pet-sweep run tiny" in result.output
    assert not out.exists() and not (tmp_path / "stores").exists()
    result = invoke("export", "--config", path, "-o", tmp_path / "best.yaml")
    assert result.exit_code == 2 and not (tmp_path / "best.yaml").exists()


@pytest.mark.train
def test_unknown_study_name(study: Path, tmp_path: Path) -> None:
    result = invoke("report", "--config", study, "--study-name", "nope", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "no study named 'nope'" in result.output
    assert not (tmp_path / "out").exists()


def test_no_completed_trial(tmp_path: Path) -> None:
    import optuna

    path = write_config(tmp_path)
    (tmp_path / "stores").mkdir()
    study = optuna.create_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'stores' / 'optuna.db'}")
    study.tell(study.ask(), state=optuna.trial.TrialState.PRUNED)
    study.ask()  # still running
    result = invoke("report", "--config", path, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert "no completed trial yet (1 pruned, 1 running)" in result.output
    assert not (tmp_path / "out").exists()
    result = invoke("export", "--config", path, "-o", tmp_path / "best.yaml")
    assert result.exit_code == 2 and "no completed trial" in result.output


@pytest.mark.train
def test_mlflow_store_lacking_the_runs(study: Path, tmp_path: Path) -> None:
    missing = tmp_path / "elsewhere.db"
    result = invoke("report", "--config", study, "--tracking-uri", f"sqlite:///{missing}", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "no MLflow store at" in result.output
    assert not missing.exists() and not (tmp_path / "out").exists()

    from mlflow import MlflowClient

    empty = tmp_path / "empty.db"
    MlflowClient(tracking_uri=f"sqlite:///{empty}").search_experiments()  # a store with no runs in it
    result = invoke("report", "--config", study, "--tracking-uri", f"sqlite:///{empty}", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "lacks the sweep's runs" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.train
def test_export_unknown_or_unfinished_trial(study: Path, tmp_path: Path) -> None:
    result = invoke("export", "--config", study, "--trial", "99", "-o", tmp_path / "best.yaml")
    assert result.exit_code == 2
    assert "trial 99 does not exist in study 'tiny' (it has 2 trials; completed: 0, 1)" in result.output
    assert not (tmp_path / "best.yaml").exists()


def test_train_refuses_a_bad_config(tmp_path: Path) -> None:
    bad = tmp_path / "best.yaml"
    bad.write_text(yaml.safe_dump({"format": "pet-sweep/replay-1", "name": "x", "data": {"source": "digits"},
                                   "model": {}, "params": {**TINY_SPACE, "lr_lo": 1e-3, "lr_mult": None}}))
    result = invoke("train", bad)
    assert result.exit_code == 2 and str(bad) in result.output
    doc = {"format": "pet-sweep/replay-1", "name": "x", "data": {"source": "digits"}, "model": {"img_size": 0},
           "params": {"arch": "resnet18", "base_lr": 1e-3, "lr_lo": 1e-4, "lr_hi": 1e-3, "freeze_epochs": 1,
                      "epochs": 1}}
    bad.write_text(yaml.safe_dump(doc))
    result = invoke("train", bad)
    assert result.exit_code == 2 and "key 'model.img_size'" in result.output
    result = invoke("train", tmp_path / "missing.yaml")
    assert result.exit_code == 2 and "file not found" in result.output
    assert not (tmp_path / "stores").exists()


@pytest.mark.train
def test_every_command_reads_the_stores_the_environment_names(study: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine of a shared sweep sets PET_SWEEP_STORAGE / PET_SWEEP_TRACKING_URI once (README, Scale out):
    report, export and list read the shared study with them, as run does."""
    elsewhere = write_config(tmp_path / "elsewhere")  # the same experiment, its own (empty) stores
    stores = study.parent / "stores"
    monkeypatch.setenv("PET_SWEEP_STORAGE", f"sqlite:///{stores / 'optuna.db'}")
    monkeypatch.setenv("PET_SWEEP_TRACKING_URI", f"sqlite:///{stores / 'mlflow.db'}")
    listed = invoke("list", "--config", elsewhere)
    assert listed.exit_code == 0 and re.search(r"^tiny \*\s+tiny\s+2\s+0\s+0\s+0\s", listed.output, re.M), listed.output
    reported = invoke("report", "--config", elsewhere, "--out", tmp_path / "report", "--no-mlflow-attach")
    assert reported.exit_code == 0, reported.output
    exported = invoke("export", "--config", elsewhere, "-o", tmp_path / "best.yaml")
    assert exported.exit_code == 0, exported.output
    doc = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert doc["source"]["storage"].startswith(f"sqlite:///{stores}")
    assert doc["tracking"]["uri"] == f"sqlite:///{stores / 'mlflow.db'}"  # train logs where the sweep did
    assert not (tmp_path / "elsewhere" / "stores").exists()  # nothing created where the file points


# -- the held-out split, enforced: fingerprints in the study and best.yaml --------------


def _breed_images(folder: Path, breeds: tuple[str, ...], numbers: range) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for k, breed in enumerate(breeds):
        for i in numbers:
            Image.new("RGB", (16, 16), (80 * k, 255 - 80 * k, (7 * i) % 255)).save(folder / f"{breed}_{i}.png")


@pytest.mark.train
def test_train_refuses_a_changed_test_split(tmp_path: Path) -> None:
    """Sweep a pets-shaped folder, export, add 5 images: `run` and `train` refuse, naming the change;
    with --allow-split-change the test error is measured and labelled "not held out" everywhere."""
    from mlflow import MlflowClient

    from pet_sweep.train.data import image_files, split_items

    breeds, images = ("Abyssinian", "Bengal", "great_pyrenees"), tmp_path / "pets" / "images"
    _breed_images(images, breeds, range(1, 21))
    data = {"source": "folder", "path": "pets", "label": "regex", "pattern": r"^(.+)_\d+\.png$", "limit": None}
    path = write_config(tmp_path, data=data, model={"batch_size": 8}, budget={"n_trials": 1})
    assert invoke("run", "--config", path).exit_code == 0
    best_yaml = tmp_path / "best.yaml"
    assert invoke("export", "--config", path, "-o", best_yaml).exit_code == 0
    split = yaml.safe_load(best_yaml.read_text())["source"]["split"]
    assert (split["train"]["n"], split["valid"]["n"], split["test"]["n"]) == (42, 12, 6)

    def test_names() -> set[str]:
        return {p.name for p in split_items(image_files(images.parent), 0.2, 0.1, 1).test}

    before = test_names()
    _breed_images(images, breeds[:1], range(21, 26))  # 5 more images after the sweep
    after = test_names()
    added, removed = len(after - before), len(before - after)
    assert added + removed > 0  # the seeded permutation reshuffles: the test split is not the same

    resumed = invoke("run", "--config", path)  # resuming the study on it: refused, nothing trained
    assert resumed.exit_code == 2, resumed.output
    assert f"test split 6 -> 6 items ({added} added, {removed} removed)" in resumed.output
    assert "study 'tiny' was run on another split" in resumed.output and "COMPLETE" not in resumed.output

    tracking = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'stores' / 'mlflow.db'}")
    experiment_id = tracking.get_experiment_by_name("pet-sweep/tiny").experiment_id
    n_runs = len(tracking.search_runs([experiment_id]))
    refused = invoke("train", best_yaml)
    assert refused.exit_code == 2, refused.output
    assert f"the test split changed since the sweep: {added} item(s) added, {removed} removed" in refused.output
    assert "--allow-split-change" in refused.output and "valid error" not in refused.output
    assert len(tracking.search_runs([experiment_id])) == n_runs  # no MLflow run left behind

    allowed = invoke("train", best_yaml, "--allow-split-change")
    assert allowed.exit_code == 0, allowed.output
    assert "never seen" not in allowed.output
    assert re.search(r"^test error .*\(not held out: the test split changed since the sweep\)", allowed.output, re.M)
    run_id = re.search(r"MLflow run\s+(\w+)", allowed.output).group(1)
    tags = tracking.get_run(run_id).data.tags
    assert tags["pet_sweep.held_out"] == "false" and f"{added} item(s) added" in tags["pet_sweep.split"]

    reported = invoke("report", "--config", path, "--out", tmp_path / "out", "--no-mlflow-attach")
    held = next(line for line in reported.output.splitlines() if line.startswith("held-out"))
    assert "on the test split (not held out: it changed after the sweep)" in held and run_id in held


def test_check_test_split_matched_changed_or_unverifiable() -> None:
    from pet_sweep.errors import DataError
    from pet_sweep.replay import ReplaySource, check_test_split
    from pet_sweep.train.data import split_fingerprint, split_items

    root = Path("/data")
    items = [root / f"{i % 3}_{i}.png" for i in range(100)]
    then = split_fingerprint(split_items(items, 0.2, 0.1, 1), root)
    source = ReplaySource(experiment="e", study="s", trial=0, storage="sqlite:///x.db", split=then)
    same = check_test_split(source, then, allow_change=False, where="best.yaml")
    assert same.held_out is True and same.tag == "true" and "fingerprint matched" in same.text

    now = split_fingerprint(split_items(items + [root / "0_100.png"], 0.2, 0.1, 1), root)
    added, removed = then.test_change(now)
    with pytest.raises(DataError, match=rf"^best.yaml: the test split changed since the sweep: {added} item\(s\) "
                                        rf"added, {removed} removed \(10 then, 10 now\)"):
        check_test_split(source, now, allow_change=False, where="best.yaml")
    changed = check_test_split(source, now, allow_change=True, where="best.yaml")
    assert changed.held_out is False and changed.tag == "false" and changed.text.endswith("not held out")

    # an export from before fingerprints (or one without a source): never called held out
    for old in (source.model_copy(update={"split": None}), None):
        unknown = check_test_split(old, now, allow_change=False, where="best.yaml")
        assert unknown.held_out is None and unknown.tag == "unverified" and unknown.text.startswith("unverifiable")


def test_a_study_that_predates_fingerprints_is_left_unrecorded(tmp_path: Path) -> None:
    import optuna

    from pet_sweep.config import load_experiment
    from pet_sweep.sweep.records import SPLIT_ATTR
    from pet_sweep.sweep.storage import check_split
    from pet_sweep.train.data import split_fingerprint, split_items

    exp = load_experiment(write_config(tmp_path))
    fp = split_fingerprint(split_items([Path(f"/d/0_{i}.png") for i in range(50)], 0.2, 0.1, 1), Path("/d"))
    lines: list[str] = []
    old = optuna.create_study()
    old.tell(old.ask(), 0.5)  # a trial run on a split nobody recorded
    check_split(old, exp, fp, lines.append)
    assert SPLIT_ATTR not in old.user_attrs and "predates split fingerprints" in lines[0]
    new = optuna.create_study()
    check_split(new, exp, fp, lines.append)
    assert new.user_attrs[SPLIT_ATTR] == fp.model_dump() and len(lines) == 1
    check_split(new, exp, fp, lines.append)  # resumed on the same split: accepted


@pytest.mark.parametrize("data, flip", [({}, None), ({"augment": True}, True), ({"flip": False}, False),
                                        ({"augment": True, "flip": False}, False)])
def test_export_writes_flip_only_where_the_run_used_it_or_the_experiment_set_it(
        write_experiments: Callable[..., Path], data: dict[str, Any], flip: bool | None) -> None:
    """best.yaml of digits said `flip: true`, a default that does nothing without augment."""
    import optuna

    from pet_sweep.config import load_experiment
    from pet_sweep.exported import export_config
    from pet_sweep.sweep.records import PARAMS_ATTR

    exp = load_experiment(write_experiments(data=data))
    Path(exp.storage_url.removeprefix("sqlite:///")).parent.mkdir(exist_ok=True)
    study = optuna.create_study(study_name=exp.study_name, storage=exp.storage_url)
    trial = study.ask()
    trial.set_user_attr(PARAMS_ATTR, {"arch": "resnet18", "base_lr": 0.01, "lr_lo": 0.001, "lr_hi": 0.01,
                                      "freeze_epochs": 1, "epochs": 1})
    study.tell(trial, 0.1)
    doc, _ = export_config(exp)
    assert doc["data"].get("flip") == flip
