"""Keep the winner: the learners of the best trial so far and of the report's recommended cheaper
one stay in MLflow as pyfunc models, so shipping one needs no second fine-tune
(`pet-sweep register`); the superseded ones are deleted, so at most `BOUND` are kept a study.

The worker whose trial just completed decides, its learner still in memory (`Objective` hands
it over): where the study, read after Optuna was told, names the trial best or recommended,
it saves the learner as `serve` loads it and uploads it to the trial's run (`tracking_kept`).
Then it reads the study again and deletes every kept model of a completed trial that is
neither best nor recommended now. No lock is needed across machines: a worker deletes only
trials its read saw completed, and of two workers finishing together, the one whose second
read comes first has tagged its model before the other's trial was told, so the other's
later listing sees that model and deletes it where it is superseded. A model from which a
Model Registry version was made is never deleted (the version's source): it leaves the count.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from pet_sweep.config import Experiment
from pet_sweep.errors import StudyError
from pet_sweep.report.read import VALID_METRIC, recommendation_of
from pet_sweep.sweep.records import error_of
from pet_sweep.tracking import RUN_ID_ATTR, check_registry, experiment_id, kept_models, no_artifact_bars

BOUND = 2  # kept models a study holds once its trials are told: the best and the recommended one


def wanted(exp: Experiment, study: optuna.Study) -> tuple[set[int], set[int]]:
    """(the trials whose models are wanted: the lowest error, and the report's recommendation;
    the completed trials this read of the study saw)."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if error_of(t) is not None]
    if not done:
        return set(), set()
    want = {min(done, key=lambda t: (error_of(t), t.number)).number}  # export's --pick best
    rec = recommendation_of(exp, study)
    if rec is not None and rec.pick is not None:
        want.add(rec.pick)
    return want, {t.number for t in done}


def exportable(learner: Any) -> Any:
    """The learner without the callbacks of the sweep (pet-sweep's, the caller's): fastai's own stay."""
    learner.remove_cbs([cb for cb in learner.cbs if not type(cb).__module__.startswith("fastai")])
    return learner


class KeepWinner:
    """Optuna's callback after each trial: keep its model where it is wanted, delete the superseded."""

    def __init__(self, exp: Experiment, objective: Any, echo: Callable[[str], None]) -> None:
        self.exp, self.objective, self.echo = exp, objective, echo
        self._example: bytes | None = None
        self._kept: Any = None
        self.seconds: list[float] = []  # what each save and upload took (bench.overhead --keep-winner)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        number, learner = self.objective.take_learner()
        try:
            if learner is not None and number == trial.number and trial.state == TrialState.COMPLETE:
                self._keep(study, trial, learner)
        except Exception as err:  # noqa: BLE001 - MLflow away, a full disk: the sweep goes on
            self.echo(f"keep         trial {trial.number}'s model not kept: {type(err).__name__}: {str(err)[:200]}")
        finally:
            if learner is not None:
                from pet_sweep.train.recipe import release  # heavy: torch, fastai (only with a learner)

                release(learner)

    @property
    def example(self) -> bytes:
        """The served model's input example: an image of the held-out split (else the validation's),
        read when a first model is kept."""
        if self._example is None:
            splits = self.objective.data.splits
            self._example = next(iter(splits.test or splits.valid)).read_bytes()
        return self._example

    def _keep(self, study: optuna.Study, trial: FrozenTrial, learner: Any) -> None:
        from pet_sweep.serve import save_pyfunc  # heavy: mlflow, pandas

        if self.objective.tracker.down_for():
            raise StudyError("the MLflow server is away")
        if self._kept is None:
            self._kept = kept_models(self.exp.tracking_uri, self.objective.tracker.experiment_id)
        want, _ = wanted(self.exp, study)
        if trial.number in want:
            started = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp, no_artifact_bars():
                self._kept.keep(str(trial.user_attrs[RUN_ID_ATTR]), save_pyfunc(exportable(learner), Path(tmp),
                                                                                self.example))
            self.seconds.append(time.perf_counter() - started)
        want, done = wanted(self.exp, study)  # read again after the tag: the module's docstring says why
        for kept in self._kept.kept(self.exp.study_name):
            if kept.number in done and kept.number not in want:
                self._kept.drop(kept.run_id)


def register_kept(exp: Experiment, pick: Any, name: str) -> tuple[int, int]:
    """`pet-sweep register`: a new version of `name` from the kept model of the trial `pick` names
    (as export's --pick), nothing trained; (the version, the trial)."""
    from pet_sweep.exported import export_config  # heavy: optuna, yaml

    doc, number = export_config(exp, pick)
    source = doc["source"]
    check_registry(exp.tracking_uri)
    found = experiment_id(exp.tracking_uri, exp.tracking_experiment)
    run_id = source.get("mlflow_run_id")
    kept = kept_models(exp.tracking_uri, found) if found else None
    if kept is None or not run_id or not kept.is_kept(run_id):
        rule = "trial {number}" if isinstance(pick, int) else pick or "best"
        raise StudyError(
            f"trial {number} of study {exp.study_name!r} (--pick {rule.format(number=number)}) has no kept model in "
            f"MLflow {exp.tracking_experiment!r} (keep_winner off, kept before it was superseded and deleted, or "
            f"picked only after it ended); train it once and register that: pet-sweep export {exp.name} "
            f"--pick {rule.format(number=number)} -o best.yaml, then pet-sweep train best.yaml --register {name}")
    params = doc["params"]
    tags = {"pet_sweep.config": doc["name"], "params": " ".join(f"{k}={v}" for k, v in params.items()),
            "arch": str(params.get("arch")), "held_out": "not measured", "source_run": run_id,
            "pet_sweep.kept_from": f"trial {number} of study {exp.study_name}"}
    if source.get("validation_error") is not None:
        tags[VALID_METRIC] = f"{source['validation_error']:.6g}"
    if source.get("n_valid"):
        tags["n_valid"] = f"{float(source['n_valid']):.6g}"
    return kept.register(run_id, name, tags), number
