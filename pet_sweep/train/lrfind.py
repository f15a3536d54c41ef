"""The learning-rate finder of fastbook chapter 5 as a first-class step.

fastai's ``lr_find`` trains briefly with an exponentially growing learning rate
and suggests one (``minimum`` / 10, ``steep``, ``valley``, ``slide``). The book
runs it twice, and so does pet-sweep, on one learner per architecture:

    learn = create_learner(...); learn.freeze()
    lr_find()                                              # phase "frozen": fresh head -> base_lr
    learn.fit_one_cycle(freeze_epochs, frozen_lr); learn.unfreeze()
    lr_find()                                              # phase "unfrozen" -> slice(lo, hi)

`freeze_epochs` is the space's fixed value or, when it is searched, its lower
bound; `frozen_lr` is the space's fixed `base_lr` or, when that is searched, the
frozen phase's `valley` (`Protocol` says which ran).

Three users:

* ``pet-sweep lr-find`` (`find_for_experiment`): both phases, plots, one MLflow run per architecture.
* anchored search spaces (`study_anchors`): the finder runs once per (architecture, phase) for a
  study; its suggestions are stored in the study's user attributes, so other workers and a
  resumed study reuse them instead of running it again.
* ``lr_find: true`` (`trial_finder`): inside each trial before training; fastai restores the
  weights afterwards and pet-sweep restores the random state, so the trial trains as without it.
"""

from __future__ import annotations

import contextlib
import math
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from fastai.callback.schedule import minimum, slide, steep, valley

from pet_sweep.config import Experiment, ModelConfig
from pet_sweep.errors import ConfigError, LRFindError
from pet_sweep.params import TrialParams
from pet_sweep.space import PHASES, Anchored, Anchors, Choice, Range, SearchSpace, check_anchors, known_architecture
from pet_sweep.tracking import Tracker
from pet_sweep.train.data import build_data
from pet_sweep.train.pretrain import Checkpoint, checkpoints_for, starting_model
from pet_sweep.train.recipe import apply_precision, create_learner, release, reseed

# fastai's defaults: 100 mock-training steps from 1e-7 to 10, stopped once the loss is 4x its best.
NUM_IT = 100
START_LR = 1e-7
END_LR = 10.0
SUGGEST_FUNCS = {"minimum": minimum, "steep": steep, "valley": valley, "slide": slide}
# `slide` compares gradients 15 points apart; fewer points than this cannot give all four suggestions.
MIN_POINTS = 16
STUDY_ATTR = "lr_find"  # study user attribute "lr_find:<arch>:<phase>"


@dataclass(frozen=True)
class Protocol:
    """How the unfrozen phase is reached: `freeze_epochs` of frozen training at `frozen_lr`."""

    freeze_epochs: int
    freeze_epochs_from: str
    frozen_lr: float | None  # None: the frozen phase's `valley`

    def describe(self, frozen_lr: float | None) -> str:
        if self.freeze_epochs == 0:
            return f"unfrozen at once (freeze_epochs 0: {self.freeze_epochs_from})"
        source = "the space's base_lr" if self.frozen_lr is not None else "the frozen phase's valley"
        plural = "s" if self.freeze_epochs > 1 else ""
        return (f"after {self.freeze_epochs} frozen epoch{plural} of fit_one_cycle at {frozen_lr:.2e}"
                f" (freeze_epochs: {self.freeze_epochs_from}; lr: {source})")


def protocol_for(space: SearchSpace, freeze_epochs: int | None = None) -> Protocol:
    """The finder protocol an experiment's space implies (`freeze_epochs` overrides the space)."""
    if freeze_epochs is not None:
        if freeze_epochs < 0:
            raise ConfigError(f"--freeze-epochs must be >= 0, but got {freeze_epochs}")
        epochs, source = freeze_epochs, "--freeze-epochs"
    else:
        spec = space.params["freeze_epochs"]
        fixed = not isinstance(spec, (Range, Choice))
        epochs = int(space.bounds("freeze_epochs")[0])
        source = "fixed in the space" if fixed else "the space's lower bound"
    base_lr = space.params.get("base_lr")  # absent from a space without a frozen phase
    fixed_lr = None if base_lr is None or isinstance(base_lr, (Range, Choice, Anchored)) else float(base_lr)
    return Protocol(epochs, source, fixed_lr)


@dataclass(frozen=True)
class PhaseResult:
    """One `lr_find`: the curve fastai plots and its four suggestions."""

    arch: str
    phase: str
    lrs: tuple[float, ...]
    losses: tuple[float, ...]
    suggestions: dict[str, float]
    num_it: int
    note: str = ""
    caution: str = ""  # a suggestion the curve is too short to support


def suggest_lrs(lrs: Sequence[float], losses: Sequence[float], num_it: int, arch: str, phase: str) -> dict[str, float]:
    """fastai's four suggestions from a finder curve, or `LRFindError` naming the architecture and phase.

    Trims the curve as fastai's ``lr_find`` does (the first tenth and the last 5
    points, and everything from the first NaN), but refuses where fastai would
    crash or return NaN: a loss that diverged at once leaves too few points.
    """
    where = f"LR finder for {arch}, {phase} phase"
    lr_t = torch.tensor(list(lrs), dtype=torch.float64)[num_it // 10:-5]
    loss_t = torch.tensor(list(losses), dtype=torch.float64)[num_it // 10:-5]
    bad = torch.nonzero(~torch.isfinite(loss_t)).view(-1)
    if len(bad):
        lr_t, loss_t = lr_t[:int(bad[0])], loss_t[:int(bad[0])]
    if len(loss_t) < MIN_POINTS:
        stopped = f"at lr {lrs[-1]:.2e}" if len(lrs) else "before the first step"
        raise LRFindError(f"{where}: the loss diverged at once (stopped {stopped} after {len(lrs)} of {num_it} steps,"
                          f" {len(loss_t)} usable points, {MIN_POINTS} needed); no valid suggestion. Check the data"
                          " and the model, or the batch size and precision")
    found: dict[str, float] = {}
    for name, func in SUGGEST_FUNCS.items():
        lr = float(func(lr_t, loss_t, num_it)[0])
        if not (math.isfinite(lr) and lr > 0):
            raise LRFindError(f"{where}: suggestion `{name}` is {lr!r}, not a positive learning rate")
        found[name] = lr
    return found


def caution_for(lrs: Sequence[float], num_it: int, suggestions: dict[str, float]) -> str:
    """Say which suggestions sit at the very start of the usable curve, where a short curve
    (few `num_it`) leaves `slide` and `steep` nothing to compare; empty when none does."""
    usable = list(lrs)[num_it // 10:-5]
    if len(usable) < 2:
        return ""
    at_start = [name for name, lr in suggestions.items() if name != "minimum" and lr <= usable[1]]
    if not at_start:
        return ""
    return (f"{' and '.join(at_start)} at the start of the curve ({usable[0]:.2e}, {len(usable)} usable points of "
            f"{num_it} steps): too short a curve for {'them' if len(at_start) > 1 else 'it'}; "
            "trust valley, or run more steps (--num-it)")


def run_finder(learn: Any, arch: str, phase: str, *, num_it: int | None = None, start_lr: float | None = None,
               note: str = "") -> PhaseResult:
    """fastai's ``lr_find`` on the learner as it is (frozen or not); fastai restores the weights."""
    num_it, start_lr = num_it or NUM_IT, start_lr or START_LR
    no_grad = [p for p in learn.model.parameters() if p.grad is None]
    with learn.no_bar():
        learn.lr_find(start_lr=start_lr, end_lr=END_LR, num_it=num_it, suggest_funcs=None, show_plot=False)
    # fastai's LRFinder ends with opt.zero_grad(), leaving zero (not None) gradients; fastai's
    # optimizer steps every parameter with a gradient, so weight decay would then shrink
    # parameters frozen afterwards. Put them back as they were.
    for param in no_grad:
        param.grad = None
    lrs = [float(v) for v in learn.recorder.lrs]
    losses = [float(v) for v in learn.recorder.losses]
    suggestions = suggest_lrs(lrs, losses, num_it, arch, phase)
    # the plotted curve: fastai's plot_lr_find drops the last 5 points, where the loss shoots up
    return PhaseResult(arch, phase, tuple(lrs[:-5]), tuple(losses[:-5]), suggestions, num_it, note,
                       caution_for(lrs, num_it, suggestions))


def find_lrs(dls: Any, arch: str, model: ModelConfig, *, seed: int, phases: Sequence[str], protocol: Protocol,
             frozen_valley: float | None = None, num_it: int | None = None,
             start_lr: float | None = None) -> dict[str, PhaseResult]:
    """Run the finder for `phases` of one architecture on a fresh learner (seeded like a trial).

    The frozen phase also runs when the unfrozen one needs its `valley` and
    `frozen_valley` (a cached result) is not given; every phase that ran is returned.
    """
    results: dict[str, PhaseResult] = {}
    reseed(dls, seed)
    with tempfile.TemporaryDirectory(prefix="pet-sweep-lr-find-") as workdir:
        # fastai's LRFinder saves the weights it restores under learn.path/model_dir
        learn = create_learner(dls, arch, model, Path(workdir))
        try:
            apply_precision(learn, model)
            learn.freeze()
            needs_valley = ("unfrozen" in phases and protocol.freeze_epochs > 0 and protocol.frozen_lr is None
                            and frozen_valley is None)
            if "frozen" in phases or needs_valley:
                results["frozen"] = run_finder(learn, arch, "frozen", num_it=num_it, start_lr=start_lr,
                                               note="fresh head, body frozen")
                frozen_valley = results["frozen"].suggestions["valley"]
            if "unfrozen" in phases:
                frozen_lr = protocol.frozen_lr if protocol.frozen_lr is not None else frozen_valley
                if protocol.freeze_epochs > 0:
                    with learn.no_bar(), learn.no_logging():
                        learn.fit_one_cycle(protocol.freeze_epochs, frozen_lr)
                learn.unfreeze()
                results["unfrozen"] = run_finder(learn, arch, "unfrozen", num_it=num_it, start_lr=start_lr,
                                                 note=protocol.describe(frozen_lr))
        finally:
            release(learn)
    return results


def plot_phase(result: PhaseResult, path: Path) -> Path:
    from pet_sweep.report.trial_figures import lr_find_plot  # heavy: matplotlib

    title = f"LR finder: {result.arch}, {result.phase} phase" + (f"\n{result.note}" if result.note else "")
    return lr_find_plot(result.lrs, result.losses, result.suggestions, path, title)


def suggestion_params(results: dict[str, PhaseResult], prefix: str = "") -> dict[str, float]:
    """``frozen.valley: 1.2e-3``, ... for MLflow."""
    return {f"{prefix}{phase}.{name}": lr for phase, r in results.items() for name, lr in r.suggestions.items()}


def format_suggestions(result: PhaseResult) -> str:
    return "  ".join(f"{name} {lr:.2e}" for name, lr in result.suggestions.items())


def log_finder_run(tracker: Any, arch: str, results: dict[str, PhaseResult], plots: Sequence[Path], *,
                   protocol: Protocol, seed: int, parent_run_id: str | None = None,
                   study_name: str | None = None) -> str:
    """One finished MLflow run ``lr-find-<arch>``: suggestions as params, plots as artifacts."""
    tags = {"pet_sweep.role": "lr-find", "arch": arch}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    if study_name:
        tags["pet_sweep.study"] = study_name
    run_id = tracker.start_run(f"lr-find-{arch}", tags)
    num_it = next(iter(results.values())).num_it
    tracker.log_params(run_id, {"arch": arch, "seed": seed, "num_it": num_it, "freeze_epochs": protocol.freeze_epochs,
                                "freeze_epochs_from": protocol.freeze_epochs_from,
                                **{f"{phase}.note": r.note for phase, r in results.items()},
                                **{f"{phase}.caution": r.caution for phase, r in results.items() if r.caution},
                                **suggestion_params(results)})
    tracker.log_artifacts(run_id, plots)
    tracker.end_run(run_id)
    return run_id


@dataclass(frozen=True)
class ArchFinding:
    """What ``pet-sweep lr-find`` found for one architecture."""

    arch: str
    phases: dict[str, PhaseResult]
    plots: tuple[Path, ...]
    run_id: str


def find_for_experiment(exp: Experiment, *, out_dir: Path, archs: Sequence[str] = (),
                        freeze_epochs: int | None = None, num_it: int | None = None,
                        echo: Callable[[str], None] = print) -> list[ArchFinding]:
    """``pet-sweep lr-find``: both phases for each architecture (default: every one in the space)."""
    for arch in archs:
        if not known_architecture(arch):
            raise ConfigError(f"--arch: unknown architecture {arch!r}; the space uses"
                              f" {', '.join(exp.space.architectures)}")
    protocol = protocol_for(exp.space, freeze_epochs)
    data = build_data(exp)
    checkpoints = checkpoints_for(exp, echo=echo)  # the finder probes the body the trials start from
    tracker = Tracker(exp.tracking_uri, exp.tracking_experiment)
    findings = []
    for arch in archs or exp.space.architectures:
        results = find_lrs(data.dls, arch, starting_model(exp.config.model, checkpoints, arch), seed=exp.config.seed,
                           phases=PHASES, protocol=protocol, num_it=num_it)
        plots = [plot_phase(r, out_dir / f"lr-find-{arch}-{phase}.png") for phase, r in results.items()]
        run_id = log_finder_run(tracker, arch, results, plots, protocol=protocol, seed=exp.config.seed)
        for phase, result in results.items():
            echo(f"{arch:<10} {phase:<9}{format_suggestions(result)}")
            echo(f"{'':<20}({result.note})")
            if result.caution:
                echo(f"{'':<20}caution: {result.caution}")
        findings.append(ArchFinding(arch, results, tuple(plots), run_id))
    return findings


# -- anchored search spaces: once per (architecture, phase) per study -------------------------


def _attr(arch: str, phase: str) -> str:
    return f"{STUDY_ATTR}:{arch}:{phase}"


def study_anchors(study: Any, exp: Experiment, data: Any, *, tracker: Any = None, parent_run_id: str | None = None,
                  echo: Callable[[str], None] = print,
                  checkpoints: Mapping[str, Checkpoint] | None = None) -> Anchors:
    """The LR-finder suggestions an anchored space needs, run at most once per study.

    Each (architecture, phase) is stored as the study user attribute
    ``lr_find:<arch>:<phase>``; a resumed study or another worker reads it back.
    Then `lr_lo <= lr_hi` is checked with the real anchors, before any trial starts.
    """
    space = exp.space
    phases = space.anchor_phases
    if not phases:
        return {}
    protocol = protocol_for(space)
    anchors: dict[str, dict[str, dict[str, float]]] = {}
    for arch in space.architectures:
        stored = {phase: study.user_attrs.get(_attr(arch, phase)) for phase in PHASES}
        missing = [phase for phase in phases if stored[phase] is None]
        if missing:
            frozen = stored["frozen"]
            results = find_lrs(data.dls, arch, starting_model(exp.config.model, checkpoints or {}, arch),
                               seed=exp.config.seed, phases=missing,
                               protocol=protocol, frozen_valley=frozen["suggestions"]["valley"] if frozen else None)
            run_id = None
            if tracker is not None:
                with tempfile.TemporaryDirectory() as tmp:
                    plots = [plot_phase(r, Path(tmp) / f"lr-find-{arch}-{p}.png") for p, r in results.items()]
                    run_id = log_finder_run(tracker, arch, results, plots, protocol=protocol, seed=exp.config.seed,
                                            parent_run_id=parent_run_id, study_name=study.study_name)
            for phase, result in results.items():
                # a worker that finished the same finder first wins, so all workers share one set of anchors
                stored[phase] = study.user_attrs.get(_attr(arch, phase))
                if stored[phase] is None:
                    stored[phase] = {"suggestions": result.suggestions, "note": result.note, "mlflow_run_id": run_id}
                    study.set_user_attr(_attr(arch, phase), stored[phase])
                echo(f"lr-find {arch} {phase}: {format_suggestions(result)}")
        for phase in phases:
            if phase not in missing:
                echo(f"lr-find {arch} {phase}: stored in the study")
        anchors[arch] = {phase: dict(stored[phase]["suggestions"]) for phase in PHASES if stored[phase]}
    check_anchors(space, anchors)
    return anchors


# -- per-trial finder (`lr_find: true`) -------------------------------------------------------


@contextlib.contextmanager
def preserved_rng(dls: Any) -> Iterator[None]:
    """Put every random state back afterwards, so the finder does not change the trial's batches."""
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    # fastai's DataLoader.randomize() replaces `rng`: keep the object and its state
    loaders = [(dl, dl.rng, dl.rng.getstate()) for dl in dls.loaders]
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])
        for dl, rng, state in loaders:
            rng.setstate(state)
            dl.rng = rng


def trial_finder(tracker: Any, run_id: str, *, num_it: int | None = None) -> Callable[[Any, TrialParams], None]:
    """The recipe's optional finder step: ``lr_find`` in the trial's first phase, plot + suggestions to
    its MLflow run. A finder with no suggestion is noted on the run; the trial still trains."""

    def find(learn: Any, params: TrialParams) -> None:
        phase = "frozen" if params.freeze_epochs > 0 else "unfrozen"
        if phase == "frozen":
            learn.freeze()
        else:
            learn.unfreeze()
        try:
            with preserved_rng(learn.dls):
                result = run_finder(learn, params.arch, phase, num_it=num_it, note="in the trial, before training")
        except LRFindError as err:
            tracker.set_tag(run_id, "lr_find.error", str(err))
            return
        with tempfile.TemporaryDirectory() as tmp:
            plot = plot_phase(result, Path(tmp) / f"lr_find_{phase}.png")
            tracker.log_artifacts(run_id, [plot])
        tracker.log_params(run_id, suggestion_params({phase: result}, prefix="lr_find."))

    return find
