"""`budget.stop_when: converged`: the search stops once what is left to gain is below the noise.

The rule is Optuna's Terminator (Makarova et al., "Automatic termination for hyperparameter
optimization", AutoML 2022): stop when the regret bound, an upper confidence bound on how much
better than the best trial the space can still do (Optuna's `RegretBoundEvaluator`, a Gaussian
process over the searched trials), falls below the statistical error of the objective.

Here that error is the noise the best searched trial's validation error carries: its item noise,
sqrt(p(1 - p) / n_valid), or the configs' pooled seed spread once the selection has measured one,
whichever is larger (Optuna's `StaticErrorEvaluator` with that constant). Optuna's default,
`CrossValidationErrorEvaluator`, needs cross-validation scores that a fine-tune does not make.

Only the searched trials (not the baseline, not the repeats on other seeds) feed the bound, and the
rule applies once `budget.min_trials` of them have completed. When it fires, the search ends for this
invocation: no new searched trial starts, but the baseline and the confirmations of the leaders still
run (`sweep.confirm`), so a converged sweep still picks on several seeds. The verdict is kept in the
study (`VERDICT_ATTR`), where the supervisor, the report and a resume read it.

`optuna.terminator` is deprecated since Optuna 4.9 and goes in 6.0 (it moves to OptunaHub, which
loads code from the network). pet-sweep calls the two evaluators, which Optuna does not warn about,
and applies the Terminator's one-line rule itself; with an Optuna that lacks them the sweep refuses
`stop_when: converged` at its start, saying so.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from pet_sweep.config import Experiment
from pet_sweep.errors import PetSweepError
from pet_sweep.report.seeds import seed_spread, summarise
from pet_sweep.selection import kind_of
from pet_sweep.sweep.records import error_of, experimental_relied_on

VERDICT_ATTR = "pet_sweep.terminator"  # study user attr: the last verdict (a dict, `Verdict.as_attr`)


@dataclass(frozen=True)
class Verdict:
    """One evaluation of the rule: on `n_trials` searched trials, regret bound against noise."""

    invocation: str
    n_trials: int          # completed searched trials the bound was fitted on
    regret_bound: float
    noise: float
    noise_from: str        # "items" or "seeds": which noise was the larger
    best_trial: int
    converged: bool

    def text(self) -> str:
        rel = "<" if self.converged else ">="
        head = (f"converged after {self.n_trials} searched trials" if self.converged
                else f"not converged after {self.n_trials} searched trials")
        return (f"{head}: regret bound {self.regret_bound:.2%} {rel} noise {self.noise:.2%} "
                f"(the {'seed spread' if self.noise_from == 'seeds' else 'item noise'} of trial "
                f"{self.best_trial}'s error; Optuna's Terminator rule)")

    def as_attr(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_attr(cls, value: Any) -> "Verdict | None":
        try:
            return cls(**value)
        except TypeError:  # absent, or written by another version
            return None


def stored_verdict(study: optuna.Study) -> Verdict | None:
    return Verdict.from_attr(study.user_attrs.get(VERDICT_ATTR))


def converged_in(study: optuna.Study, invocation: str) -> bool:
    """Did the rule end this invocation's search? (A supervisor asks, after its workers stopped.)"""
    verdict = stored_verdict(study)
    return verdict is not None and verdict.converged and verdict.invocation == invocation


def check_available() -> None:
    """The evaluators this rule needs are in the installed Optuna (they leave it in 6.0)."""
    try:  # heavy (the GP imports torch), and gone in Optuna 6
        from optuna.terminator import RegretBoundEvaluator, StaticErrorEvaluator  # noqa: F401
    except ImportError:
        raise PetSweepError(f"budget.stop_when: converged needs optuna.terminator, which Optuna {optuna.__version__} "
                            "no longer has (it was removed in 6.0); use stop_when: budget, or Optuna 5") from None


class Convergence:
    """The rule for one invocation's workers: `search_over` under the claim lock, before each claim."""

    def __init__(self, exp: Experiment, invocation: str, n_valid: int) -> None:
        self.enabled = exp.config.budget.stop_when == "converged"
        self.min_trials, self.seed = exp.config.budget.min_trials, exp.config.sampler.seed
        self.run_seed, self.invocation, self.n_valid = exp.config.seed, invocation, n_valid
        self._unfitted = -1  # the count of searched trials the bound could not be fitted on
        self.verdict: Verdict | None = None
        if self.enabled:
            check_available()

    def search_over(self, study: optuna.Study) -> bool:
        """True once the rule has fired for this invocation (it stays fired: the search has ended).

        Called under the claim lock, so of the invocation's workers one evaluates each new count of
        searched trials and keeps its verdict in the study; the others read it (`verdict` is set only
        in the worker that evaluated, for it to print)."""
        self.verdict = None
        if not self.enabled:
            return False
        trials = study.get_trials(deepcopy=False)  # read once: every worker asks before each claim
        searched = searched_trials(trials)
        stored = stored_verdict(study)
        if stored is not None and stored.invocation == self.invocation and (
                stored.converged or stored.n_trials == len(searched)):
            return stored.converged
        if len(searched) < self.min_trials or len(searched) == self._unfitted:
            return False
        self.verdict = evaluate(searched, trials, self.n_valid, self.invocation,
                                self.seed, self.run_seed)
        if self.verdict is None:
            self._unfitted = len(searched)  # not again until another trial completes
            return False
        study.set_user_attr(VERDICT_ATTR, self.verdict.as_attr())
        return self.verdict.converged


def searched_trials(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The completed searched trials with a finite error: what the regret bound is fitted on."""
    return [t for t in trials if t.state == TrialState.COMPLETE and kind_of(t.user_attrs, t.number) == "search"
            and (e := error_of(t)) is not None and math.isfinite(e)]


def noise_of(best_error: float, n_valid: int, trials: list[FrozenTrial], run_seed: int) -> tuple[float, str]:
    """The larger of the item noise of `best_error` and the configs' pooled seed spread (when measured)."""
    from pet_sweep.sweep.confirm import completed_runs  # confirm imports the loop's pieces

    items = math.sqrt(best_error * (1 - best_error) / n_valid) if n_valid else 0.0
    spread = seed_spread(summarise(completed_runs(trials, run_seed)))
    if spread is not None and spread[0] > items:
        return spread[0], "seeds"
    return items, "items"


def evaluate(searched: list[FrozenTrial], trials: list[FrozenTrial], n_valid: int, invocation: str,
             seed: int | None, run_seed: int) -> Verdict | None:
    """The rule on `searched`; None when the bound cannot be fitted (a space with nothing searched)."""
    # heavy (the GP imports torch), and gone in Optuna 6 (check_available says so at the start)
    from optuna.terminator import RegretBoundEvaluator, StaticErrorEvaluator

    best = min(searched, key=lambda t: (error_of(t), t.number))
    noise, source = noise_of(float(error_of(best)), n_valid, trials, run_seed)
    # the bound is fitted on the searched trials' error rate (a multi-objective study is refused in the config)
    values = [optuna.trial.create_trial(params=t.params, distributions=t.distributions, value=error_of(t))
              for t in searched]
    with experimental_relied_on():
        try:
            bound = RegretBoundEvaluator(seed=seed).evaluate(values, StudyDirection.MINIMIZE)
        except ValueError:  # "the intersection search space is empty": nothing is searched
            return None
        error = StaticErrorEvaluator(constant=noise).evaluate(values, StudyDirection.MINIMIZE)
    # Optuna's Terminator.should_terminate: improvement < error
    return Verdict(invocation, len(searched), float(bound), float(error), source, best.number, bool(bound < error))
