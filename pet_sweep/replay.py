"""Replay one exported trial once (`pet-sweep train`), and the exported file's layout.

The exported file (``best.yaml``, written by `export`) holds everything the fine-tune
needs: data, model, every recipe parameter, the seed, where to log, and where it came
from. It is read by `yaml_files.read_model` (the only YAML reader) and validated with the
same pydantic models as experiments.yaml. `train` re-runs that fine-tune once,
logs an MLflow run (tagged as a replay of the trial, nested under the sweep's
parent run when the store has it), reports the error on the held-out test
split, and with ``export_model`` saves `learn.export()` as an artifact.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from pet_sweep.config import DataConfig, Experiment, ExperimentConfig, ModelConfig, TrackingConfig, load_space
from pet_sweep.errors import ConfigError, DataError
from pet_sweep.params import TrialParams, lr_text, params_from_dict
from pet_sweep.report.read import HELD_OUT_TAG, N_TEST_METRIC, REPLAY_OF_TAG, REPLAY_ROLE, TEST_METRIC, VALID_METRIC
from pet_sweep.report.stats import errors_of, wilson
from pet_sweep.space import Strict
from pet_sweep.tracking import Tracker, check_server, redact_url_in, require_password
from pet_sweep.train.data import SplitFingerprint
from pet_sweep.train.pretrain import find_checkpoint
from pet_sweep.yaml_files import read_model

FORMAT = "pet-sweep/replay-1"
KIND_TAG = "pet_sweep.kind"  # "replay" on a `train` run: what it is, beside the trials under the same sweep


class CheckpointSource(Strict):
    """The checkpoint the trial started from (`model.weights`): the file's content, and how it was made."""

    sha256: str
    pretrained_on: str | None = None  # the experiment `pet-sweep pretrain` trained it on
    run_id: str | None = None         # that pretraining's MLflow run


class ReplaySource(Strict):
    """Where an exported config came from; `train` works without the study, and checks its
    test split against `split` (the study's, recorded when the sweep started)."""

    experiment: str
    study: str
    trial: int
    storage: str
    validation_error: float | None = None
    n_valid: int | None = None
    mlflow_run_id: str | None = None
    mlflow_parent_run_id: str | None = None
    split: SplitFingerprint | None = None    # the study's split; absent from exports made before it was recorded
    picked_by: Literal["best", "cheapest", "trial"] | None = None  # export's rule (--pick); absent: older exports
    costs: dict[str, float] | None = None    # what the trial cost (COST_ATTRS), as measured; absent: not recorded
    checkpoint: CheckpointSource | None = None  # what `model.weights` holds; `train` finds it by its sha256


class ReplayConfig(Strict):
    """One fine-tune, complete: what `pet-sweep export` writes and `pet-sweep train` reads."""

    format: Literal["pet-sweep/replay-1"]
    name: str
    source: ReplaySource | None = None
    data: DataConfig
    model: ModelConfig
    params: dict[str, Any]
    seed: int = 0
    tracking: TrackingConfig = TrackingConfig()


def load_replay(path: str | Path) -> tuple[ReplayConfig, Experiment]:
    """Read and validate an exported config; the Experiment is a one-trial, fixed-value experiment."""
    cfg, path = read_model(path, ReplayConfig, "a mapping written by `pet-sweep export`")
    return cfg, _experiment(cfg, path)


def _experiment(cfg: ReplayConfig, path: Path) -> Experiment:
    space = load_space(cfg.params, path.parent, file=str(path), experiment=cfg.name)
    if "lr_lo" not in cfg.params:
        raise ConfigError("an exported config gives `lr_lo` (the slice's low end), not `lr_mult`",
                          file=str(path), key="params.lr_lo")
    params_from_dict(cfg.params)
    source = cfg.source
    exp_cfg = ExperimentConfig(
        description=f"replay of trial {source.trial} of study {source.study!r}" if source else "replay",
        data=cfg.data, model=cfg.model, sweep=dict(cfg.params), seed=cfg.seed, tracking=cfg.tracking,
        **({"storage": source.storage, "study_name": source.study} if source else {}))
    return Experiment(name=cfg.name, config=exp_cfg, space=space, config_path=path)


def with_local_weights(cfg: ReplayConfig, exp: Experiment, echo: Callable[[str], None]) -> Experiment:
    """`exp` with `model.weights` the file on this machine (found by the recorded sha256 where
    the named one is missing); a ConfigError saying what to do where neither is there."""
    if cfg.model.weights is None:
        return exp
    known = cfg.source.checkpoint if cfg.source else None
    found = find_checkpoint(cfg.model.weights, known and known.sha256, known and known.pretrained_on,
                            file=str(exp.config_path), echo=echo)
    local = cfg.model_copy(update={"model": cfg.model.model_copy(update={"weights": str(found)})})
    return _experiment(local, exp.config_path)


# -- train (replay) ------------------------------------------------------------


@dataclass(frozen=True)
class ReplayOutcome:
    run_id: str
    valid_error: float
    n_valid: int
    test_error: float | None
    n_test: int
    reproduced: bool | None      # within the original trial's 95 % interval; None: nothing to compare
    model_artifact: str | None
    seconds: float
    held_out: bool | None        # SplitCheck.held_out: the test error is held out only when True
    registered: int | None = None  # the Model Registry version `--register NAME` created
    test_predictions: tuple[int, ...] = ()  # the class index given to each held-out item, in split order
    test_targets: tuple[int, ...] = ()      # each held-out item's true class index


@dataclass(frozen=True)
class SplitCheck:
    """How the replay's test split compares with the sweep's (the fingerprint in best.yaml)."""

    held_out: bool | None  # True: same test items; False: they changed; None: nothing recorded to compare
    text: str

    @property
    def tag(self) -> str:
        return {True: "true", False: "false", None: "unverified"}[self.held_out]


def check_test_split(source: ReplaySource | None, now: SplitFingerprint, *, allow_change: bool,
                     where: str) -> SplitCheck:
    """Compare the test split `train` just built with the sweep's; a changed one is refused
    unless `allow_change`, since trials may have trained or been selected on its items."""
    recorded = source.split if source else None
    if recorded is None:
        return SplitCheck(None, "unverifiable: the config records no split fingerprint (exported from a study that "
                                "predates them), so the test items may not be the sweep's held-out ones")
    if recorded.test == now.test:
        others = recorded.changes(now)
        return SplitCheck(True, "test split unchanged since the sweep (fingerprint matched)" +
                          (f"; but {', '.join(others)}: the validation error is on other items" if others else ""))
    added, removed = recorded.test_change(now)
    change = (f"the test split changed since the sweep: {added} item(s) added, {removed} removed "
              f"({recorded.test.n} then, {now.test.n} now)")
    if not allow_change:
        raise DataError(f"{where}: {change}; trials may have trained or been selected on its items, so its error "
                        "would not be held out. Restore the data, or pass --allow-split-change to measure it "
                        "anyway (labelled 'not held out')")
    return SplitCheck(False, f"{change}; measured anyway (--allow-split-change): not held out")


def without_training_callbacks(learn: Any) -> None:
    """Drop pet-sweep's per-trial callbacks: they would fire again in `validate`, `predict`
    and in every use of the exported learner (and fail outside a fit). CPU bf16 goes too: the
    exported learner is an fp32 model that loads without pet-sweep, and predicts in fp32."""
    from pet_sweep.train.amp import CpuMixedPrecision  # heavy: fastai
    from pet_sweep.train.callbacks import EpochHistory, StopOnDivergence

    learn.remove_cbs([cb for cb in learn.cbs if isinstance(cb, (EpochHistory, StopOnDivergence, CpuMixedPrecision))])


def held_out_predictions(learn: Any, items: tuple[Path, ...]) -> tuple[list[int], list[int]]:
    """The learner's class index for each held-out item (labelled like the training items), and
    the item's true index: the test error, and the pairs a paired test compares."""
    dl = learn.dls.test_dl(list(items), with_labels=True)
    with learn.no_bar(), learn.no_logging():
        probs, targets = learn.get_preds(dl=dl)
    return probs.argmax(dim=1).tolist(), targets.view(-1).tolist()


def _without_passwords(path: Path, cfg: ReplayConfig, folder: Path) -> Path:
    """A copy of the config to upload, with the passwords of its URLs hidden (a hand-edited one may have them)."""
    text = path.read_text(encoding="utf-8")
    for url in (cfg.tracking.uri, cfg.source.storage if cfg.source else ""):
        text = redact_url_in(text, url)
    copy = folder / path.name
    copy.write_text(text, encoding="utf-8")
    return copy


def _start_run(tracker: Tracker, cfg: ReplayConfig, params: TrialParams, data: Any, split: SplitCheck,
               precision: str) -> str:
    """The replay's MLflow run with its parameters, nested under the sweep's parent run where this store has it."""
    # a replay is no trial: tagged as one kind of run, with no Optuna trial state to count it by
    tags = {"pet_sweep.role": REPLAY_ROLE, KIND_TAG: REPLAY_ROLE, "arch": params.arch, HELD_OUT_TAG: split.tag,
            "pet_sweep.split": split.text}
    source = cfg.source
    if source:
        tags.update({"pet_sweep.study": source.study, REPLAY_OF_TAG: str(source.trial)})
        if tracker.has_run(source.mlflow_parent_run_id):
            tags["mlflow.parentRunId"] = str(source.mlflow_parent_run_id)
    run_id = tracker.start_run(f"replay-{cfg.name}", tags)
    tracker.log_params(run_id, {**params.as_dict(), "seed": cfg.seed, "precision": precision,
                                "img_size": cfg.model.img_size, "batch_size": cfg.model.batch_size,
                                "pretrained": cfg.model.pretrained, "channels_last": cfg.model.channels_last,
                                "data": cfg.data.source,
                                "n_test": len(data.splits.test), "device": str(data.dls.device)})
    return run_id


def train(path: str | Path, *, export_model: bool = False, tracking_uri: str | None = None,
          allow_split_change: bool = False, register: str | None = None,
          echo: Callable[[str], None] = print, progress: Any = None) -> ReplayOutcome:
    """Re-run an exported fine-tune once, logged to MLflow; report validation and test error.

    `tracking_uri` logs it to another MLflow store than the one the config names
    (the sweep's), e.g. on the machine that takes the config to production.
    A test split that differs from the sweep's is refused unless `allow_split_change`.
    `register`: log the learner as a pyfunc model and register it as a new version of that name.
    `progress` (a `progress.Progress`, as `run` shows a sweep) sees the fine-tune's epochs; it
    is closed when the training ends.
    """
    from pet_sweep.train import recipe  # heavy: torch and fastai
    from pet_sweep.train.data import build_data

    cfg, exp = load_replay(path)
    exp = with_local_weights(cfg, exp, echo).with_overrides(tracking_uri=tracking_uri)
    # export keeps no password: the real one comes from the environment or the option
    require_password(exp.tracking_uri, "PET_SWEEP_TRACKING_URI (or pass --tracking-uri)",
                     file=exp.where, key="tracking.uri")
    check_server(exp.tracking_uri)  # a server that is down: said before the training, not after
    if register:
        from pet_sweep import serve  # heavy: mlflow, pandas

        serve.check_registry(exp.tracking_uri)  # a store with no registry: said before the training too
    params = params_from_dict(cfg.params)
    data = build_data(exp)
    split = check_test_split(cfg.source, data.fingerprint, allow_change=allow_split_change,
                             where=exp.where)
    echo(f"split        {split.text}")
    tracker = Tracker(exp.tracking_uri, exp.tracking_experiment)
    precision = recipe.precision_for(cfg.model.precision, data.dls.device)
    run_id = _start_run(tracker, cfg, params, data, split, precision)
    echo(f"replay       {cfg.name}: {params.arch} {lr_text(params.as_dict())} freeze_epochs={params.freeze_epochs} "
         f"epochs={params.epochs} seed={cfg.seed} ({precision}, {data.dls.device})")
    started = time.perf_counter()
    result = None
    try:
        result = recipe.fine_tune(data.dls, params, exp.config.model, seed=cfg.seed,
                                  listeners=[tracker.epoch_logger(run_id), *_shown(progress, cfg)],
                                  keep_learner=True)
        if progress is not None:
            progress.close()
        measured, (preds, targets) = _measure(result, data, cfg.source)
        measured["duration_s"] = time.perf_counter() - started
        version = _register(register, result.learner, exp.tracking_uri, run_id, data, cfg, measured, split)
        model_artifact = _finish(tracker, run_id, result.learner, measured, Path(path).expanduser().resolve(), cfg,
                                 export_model=export_model)
    except BaseException as err:
        tracker.fail_run(run_id, redact_url_in(f"{type(err).__name__}: {err}", exp.tracking_uri))
        raise
    finally:
        if progress is not None:
            progress.close()
        if result is not None and result.learner is not None:
            recipe.release(result.learner)
    return ReplayOutcome(run_id, result.error_rate, int(measured["n_valid"]), measured.get(TEST_METRIC),
                         len(data.splits.test), measured.get("reproduced"), model_artifact,
                         time.perf_counter() - started, split.held_out, version, tuple(preds), tuple(targets))


def _shown(progress: Any, cfg: ReplayConfig) -> list[Callable[[Any], None]]:
    """The epoch listener that shows the replay's progress (numbered as the trial it replays)."""
    if progress is None:
        return []
    number = cfg.source.trial if cfg.source else 0
    progress.trial_started(number, cfg.params)
    return [lambda record: progress.epoch_done(number, record)]


def _register(name: str | None, learner: Any, tracking_uri: str, run_id: str, data: Any, cfg: ReplayConfig,
              measured: dict[str, Any], split: SplitCheck) -> int | None:
    """`--register NAME`: the learner as a new version of NAME, tagged with what it is and how good."""
    if not name:
        return None
    from pet_sweep import serve  # heavy: mlflow, pandas

    example = next(iter(data.splits.test or data.splits.valid)).read_bytes()  # an image no trial trained on
    tags = {"pet_sweep.config": cfg.name, "params": " ".join(f"{k}={v}" for k, v in cfg.params.items()),
            "arch": str(cfg.params.get("arch")), "held_out": split.tag, "source_run": run_id,
            **{k: f"{v:.6g}" for k, v in measured.items() if isinstance(v, float)}}
    return serve.register(learner, name, tracking_uri=tracking_uri, run_id=run_id, example=example, tags=tags)


def _measure(result: Any, data: Any, source: ReplaySource | None) -> tuple[dict[str, Any], tuple[list[int], list[int]]]:
    """The replay's metrics (validation error, test error on the held-out items, whether it
    reproduces), and its held-out predictions with their targets."""
    n_valid = len(result.valid_targets) or data.n_valid
    without_training_callbacks(result.learner)
    measured: dict[str, Any] = {VALID_METRIC: result.error_rate, "n_valid": float(n_valid)}
    preds: list[int] = []
    targets: list[int] = []
    if data.splits.test:
        preds, targets = held_out_predictions(result.learner, data.splits.test)
        wrong = sum(p != t for p, t in zip(preds, targets))
        measured.update({TEST_METRIC: wrong / len(targets), N_TEST_METRIC: float(len(targets))})
    if source and source.validation_error is not None:
        lo, hi = wilson(errors_of(source.validation_error, n_valid), n_valid)
        measured["reproduced"] = lo <= result.error_rate <= hi  # within the trial's 95 % interval
    return measured, (preds, targets)


def _finish(tracker: Tracker, run_id: str, learner: Any, measured: dict[str, Any], config_file: Path,
            cfg: ReplayConfig, *, export_model: bool) -> str | None:
    """Close the run with its metrics and artifacts (the config, the learner if asked); the model's URI."""
    reproduced = measured.get("reproduced")
    metrics = {k: v for k, v in measured.items() if k != "reproduced"}
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = [_without_passwords(config_file, cfg, Path(tmp))]
        model_artifact = None
        if export_model:
            model_path = Path(tmp) / "learner.pkl"
            learner.export(model_path)
            artifacts.append(model_path)
            model_artifact = f"runs:/{run_id}/{model_path.name}"
        tracker.finish_run(run_id, "FINISHED", metrics,
                           {"reproduced": str(reproduced).lower()} if reproduced is not None else {}, artifacts)
    return model_artifact
