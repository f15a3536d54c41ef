"""The sweep's side of `selection:`: fastai's `fine_tune` defaults queued as the baseline, and the
leaders confirmed on more training seeds, each run a trial of its own (Optuna's `enqueue_trial`).

`Confirmer.top_up` runs under the claim lock before every claim (`sweep.loop`), so the workers of an
invocation never queue the same run twice, and it queues nothing the budget has no slot for:

* the baseline's runs on `training_seeds(seed, seeds)` come first, before any searched trial;
* a searched config whose first run errs less than the incumbent's mean (the config with the lowest
  mean over the most seeds, `report.seeds.best_config`) is re-run on the seeds after the first,
  `confirm_top` configs at most. The first confirmation waits for half of the searched configs, so it
  is not spent on the best of two random draws;
* the budget keeps the trials the unspent confirmations need: once only they are left, they go to the
  best first runs not yet confirmed (the top configs are confirmed, whether or not they beat the
  incumbent), or back to the search when there is none.

Repeats and the baseline are not pruned: a run cut short is no draw of the config's error.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import optuna
from optuna.trial import FrozenTrial, TrialState

from pet_sweep.config import Experiment
from pet_sweep.params import TrialParams, inert_params
from pet_sweep.report.seeds import Run, best_config, run_of, seed_spread, selection_of, summarise
from pet_sweep.selection import (
    BASELINE_ATTR,
    BASELINE_ID,
    CONFIG_ATTR,
    SEED_ATTR,
    baseline_params,
    kind_of,
    resolution,
    resolution_warning,
    training_seeds,
)
from pet_sweep.space import Anchored, Anchors, Choice, Range, SearchSpace, anchor_value
from pet_sweep.sweep.budget import Budget, is_retry
from pet_sweep.sweep.records import (
    BATCH_ATTR,
    INTERRUPTED,
    INVOCATION_ATTR,
    PREDS_ATTR,
    REASON_ATTR,
    TARGETS_ATTR,
    error_of,
)

KIND_TAG = "pet_sweep.kind"  # MLflow tag of a trial's run: search, repeat or baseline
SELECTION_ATTRS = (CONFIG_ATTR, SEED_ATTR, BASELINE_ATTR)  # what a retry of a trial carries over


def scheduled(trial: Any) -> bool:
    """A run the selection queued (baseline or repeat): never pruned."""
    return kind_of(trial.user_attrs, trial.number) != "search"


@contextmanager
def fixed_values_quiet(trial: Any) -> Iterator[None]:
    """The baseline's learning rates may lie outside the space's ranges (they are fastai's, not the
    search's): Optuna's warning about an out-of-range fixed parameter says nothing new there."""
    with warnings.catch_warnings():
        if trial.user_attrs.get(BASELINE_ATTR):
            warnings.filterwarnings("ignore", message="Fixed parameter", category=UserWarning)
        yield


def optuna_params(space: SearchSpace, params: TrialParams, anchors: Anchors) -> dict[str, Any]:
    """`params` in the names Optuna suggests (`space.suggest` maps them back): fixed values are not
    suggested, an anchored learning rate is its factor, `lr_mult` is lr_hi / lr_lo."""
    values = params.as_dict()
    values["lr_mult"] = params.lr_hi / params.lr_lo
    inert = inert_params(values)
    out: dict[str, Any] = {}
    for name, spec in space.params.items():
        if name in inert:
            continue
        if isinstance(spec, Anchored):
            out[f"{name}_factor"] = values[name] / anchor_value(anchors, params.arch, spec.anchor, name)
        elif isinstance(spec, Choice):
            out[name] = values[name] if values[name] in spec.choices else \
                min(spec.choices, key=lambda c: abs(float(c) - float(values[name])))
        elif isinstance(spec, Range):
            out[name] = values[name]
    return out


def taken(trials: list[FrozenTrial], seed: int) -> set[tuple[str, int]]:
    """(config, seed) of every run queued, running or ended; a run Ctrl-C stopped is free to queue again."""
    out = set()
    for t in trials:
        if t.state == TrialState.FAIL and t.user_attrs.get(REASON_ATTR) == INTERRUPTED:
            continue
        run = run_of(t.number, t.user_attrs, 0.0, seed)
        out.add((run.config_id, run.seed))
    return out


def completed_runs(trials: list[FrozenTrial], seed: int) -> list[Run]:
    """The completed trials as runs, with their validation predictions (the paired test reads them)."""
    return [run_of(t.number, t.user_attrs, error, seed, t.user_attrs.get(PREDS_ATTR, ()),
                   t.user_attrs.get(TARGETS_ATTR, ())) for t in trials
            if t.state == TrialState.COMPLETE and (error := error_of(t)) is not None and math.isfinite(error)]


class Confirmer:
    """Queues the baseline and the confirmations of one invocation (see the module's docstring)."""

    def __init__(self, exp: Experiment, anchors: Anchors, n_valid: int, echo: Callable[[str], None]) -> None:
        self.exp, self.anchors, self.n_valid, self.echo = exp, anchors, n_valid, echo
        self.sel, self.seed = exp.config.selection, exp.config.seed
        self.seeds = training_seeds(self.seed, self.sel.seeds)
        n_trials = exp.config.budget.n_trials
        self.n_search = max(1, n_trials - min(self.sel.reserved(), n_trials))
        self.said: set[str] = set()  # the resolution lines printed so far
        self.holding = ""            # why the last top_up kept the rest of the budget, in words

    def room(self, trials: list[FrozenTrial], budget: Budget) -> int:
        """Slots of this invocation's budget neither used nor promised to a trial already queued."""
        queued = sum(1 for t in trials if t.state == TrialState.WAITING and not is_retry(t)
                     and INVOCATION_ATTR not in t.user_attrs)
        return budget.n_trials - budget.used(trials) - queued

    def top_up(self, study: optuna.Study, budget: Budget, search_over: bool = False) -> bool:
        """Queue what the selection needs now; True: hold, a new searched trial would take the slots kept
        for a confirmation (a searched trial still running may earn them). `search_over`: the search has
        converged, so the confirmations are due now, as at the budget's end."""
        trials = study.get_trials(deepcopy=False)
        room, done = self.room(trials, budget), taken(trials, self.seed)
        self.holding = ""
        if self.sel.baseline:
            missing = [s for s in self.seeds if (BASELINE_ID, s) not in done][:max(room, 0)]
            if missing:
                params = optuna_params(self.exp.space, baseline_params(self.exp.space)[0], self.anchors)
                for s in missing:
                    study.enqueue_trial(params, user_attrs={BASELINE_ATTR: True, CONFIG_ATTR: BASELINE_ID, SEED_ATTR: s})
                room -= len(missing)
        runs = completed_runs(trials, self.seed)
        self.say_resolution(runs)
        return self._confirm(study, trials, runs, done, room, search_over)

    def _confirm(self, study: optuna.Study, trials: list[FrozenTrial], runs: list[Run],
                 done: set[tuple[str, int]], room: int, search_over: bool = False) -> bool:
        repeats = self.seeds[1:]
        if not repeats or self.sel.confirm_top == 0 or room < len(repeats):
            return False
        spent = {cid for cid, s in done if s != self.seed and cid != BASELINE_ID}
        unspent = self.sel.confirm_top - len(spent)
        if unspent <= 0:
            return False
        configs = summarise(r for r in runs if not r.baseline)
        firsts = sorted((c.runs[0] for c in configs if c.config_id not in spent and c.runs[0].seed == self.seed),
                        key=lambda r: (r.error, r.number))
        incumbent = best_config([c for c in configs if c.config_id in spent]) if spent else None
        if incumbent is None:  # nothing confirmed yet: the best first run, once half the search has run
            challengers = firsts[:1] if len(firsts) >= max(1, self.n_search // 2) else []
        else:
            challengers = [r for r in firsts if r.error < incumbent.mean]
        end_game = search_over or room <= unspent * len(repeats)
        chosen = challengers[:1] or (firsts[:1] if end_game else [])
        if chosen:
            source = next(t for t in trials if t.number == chosen[0].number)
            attrs = {k: source.user_attrs[k] for k in (BATCH_ATTR,) if k in source.user_attrs}
            for s in repeats:
                if (chosen[0].config_id, s) not in done:
                    study.enqueue_trial(dict(source.params),
                                        user_attrs={**attrs, CONFIG_ATTR: chosen[0].config_id, SEED_ATTR: s})
            return False
        running = [t.number for t in trials if t.state == TrialState.RUNNING and kind_of(t.user_attrs, t.number) == "search"]
        if end_game and running:
            self.holding = (f"the last {room} slot(s) are kept to confirm a leader on {len(self.seeds)} seeds; "
                            f"trial(s) {', '.join(map(str, running))} may be one")
            return True
        return False

    def say_resolution(self, runs: list[Run]) -> None:
        """Print the resolution once an error is known (the baseline's, else the median first run's of three),
        again once a seed spread is; warn once when the leader's lead over the median config is below it."""
        configs = summarise(runs)
        base = next((c for c in configs if c.baseline), None)
        firsts = sorted(c.runs[0].error for c in configs if not c.baseline)
        if not self.n_valid or (base is None and len(firsts) < 3):
            return
        spread = seed_spread(configs)
        error, of = (base.mean, "the baseline's") if base else (firsts[len(firsts) // 2], "the median config's")
        res = resolution(self.n_valid, error, len(self.seeds), spread[0] if spread else None, of)
        due = [key for key, known in (("items", True), ("spread", spread is not None)) if known and key not in self.said]
        if due:
            self.said.update(due)
            self.echo(f"resolution   {res.text()}")
        if len(firsts) >= 3 and "likely" not in self.said:
            self.said.add("likely")
            likely = firsts[len(firsts) // 2] - firsts[0]  # the best first run's lead over the median one
            warning = resolution_warning(res, likely, self.exp.config.data.valid_pct, len(self.seeds))
            if warning:
                self.echo(f"warning      {warning}")


def baseline_text(exp: Experiment) -> str:
    """The header's line about the baseline: fastai's fine_tune defaults, and where they leave the space."""
    params, notes = baseline_params(exp.space)
    values = {**params.as_dict(), "lr_mult": params.lr_hi / params.lr_lo}
    notes += [f"the space fixes {name}={spec:g}, not fastai's {values[name]:g}" for name, spec in exp.space.params.items()
              if isinstance(spec, (int, float)) and name in values and not math.isclose(float(spec), values[name])]
    return (f"fastai's fine_tune defaults: arch={params.arch} freeze_epochs={params.freeze_epochs} at base_lr "
            f"{params.base_lr:g}, then {_epochs(params.epochs)} at slice({params.lr_lo:g}, {params.lr_hi:g})"
            + (f" ({'; '.join(notes)})" if notes else ""))


def first_resolution(n_valid: int, known: list[Run]) -> str:
    """The resolution at the start: at the baseline's error where a run of it is in the study, else at 10 %
    and 30 % error (the baseline's own comes once it has run)."""
    base = next((c for c in summarise(known) if c.baseline), None)
    if base is not None:
        return resolution(n_valid, base.mean).text()
    low, high = resolution(n_valid, 0.1), resolution(n_valid, 0.3)
    return (f"{n_valid} validation items resolve differences of {low.difference:.1%} in error rate at a 10% "
            f"error and {high.difference:.1%} at 30% (one seed each; said again at the baseline's error once it ran)")


def selection_metrics(runs: list[Run]) -> tuple[dict[str, float], dict[str, str]]:
    """The parent MLflow run's view of the selection: the best config's mean error, spread and seeds, the
    baseline's mean; none in a study of one run per config without a baseline."""
    sel = selection_of(runs)
    if sel is None:
        return {}, {}
    metrics = {"best_config_error_rate": sel.best.mean, "best_config_n_seeds": float(sel.best.n_seeds)}
    if sel.best.spread is not None:
        metrics["best_config_seed_sd"] = sel.best.spread
    tags = {"best_config": sel.best.config_id, "best_config_text": sel.best.text(), "worth_it": sel.worth_it}
    if sel.baseline is not None:
        metrics["baseline_error_rate"] = sel.baseline.mean
    return metrics, tags


def _epochs(n: int) -> str:
    return f"{n} epoch" if n == 1 else f"{n} epochs"


def best_config_text(runs: list[Run]) -> str:
    """`run`'s closing line on the selection: the best config over its seeds, and whether it beat the
    baseline; "" in a study of one run per config without a baseline."""
    sel = selection_of(runs)
    return "" if sel is None else f"{sel.best.name}: {sel.best.text()}; worth it? {sel.worth_it}"
