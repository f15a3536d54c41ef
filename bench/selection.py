"""Selection: does the pick win again? Each method's pick, retrained on fresh seeds, on held-out items.

A sweep names a winner from one training seed and a small validation set; what a user gets is that
config trained again. For each sweep seed, every method searches (or not) on the same shipped
experiment at equal compute, and its pick is exported and replayed with pet-sweep's own `export` and
`train` on `--retrain-seeds` (fresh training seeds no sweep used), judged on the held-out split no
trial saw. Methods (`METHODS`, pluggable: a sampler or a fidelity to judge is one more entry):

- pet-sweep: the shipped experiment as configured in experiments.yaml (its sampler, pruner and
  selection), sampler and training seed set to the sweep seed; its pick is what `export` names;
- optuna-tpe-median: what a user wires by hand: TPE and the median pruner at Optuna's defaults
  (TPESampler n_startup_trials 10, MedianPruner n_startup_trials 5, n_warmup_steps 0), best-of-N
  on one seed;
- random: random search, no pruner, best-of-N on one seed;
- fine_tune: fastai's `fine_tune` defaults, no search: the space's first architecture, 1 frozen
  epoch at base_lr 2e-3, then slice(base_lr/2/100, base_lr/2), at the middle of the space's
  epochs. Written as a recipe config, so its phases use fit_one_cycle's defaults (pct_start 0.25,
  div 25), not fine_tune's pct_start 0.99 and div 5: the recipe cannot express those.

Equal compute: the first method that searches runs as configured (`budget.n_trials`; no timeout);
the epochs it trained are the budget of every other search method on that sweep seed, which
runs trials (resuming its study, as `pet-sweep run` again does) until it has trained at least as
many: it may overshoot by one trial, never fall short. `--budget-epochs N` gives every search N.

Figures: per method, the mean held-out error of its picks over sweep seeds x retrain seeds x items
(Wilson 95 %) and over sweep seeds (t 95 %: the sweep's own noise); the regret against the best
config any method picked (its mean held-out error over the retrain seeds; the minimum of noisy
means, so the regrets lean high). Per pair of methods, two tests, each Holm across the pairs:
the paired exact McNemar test of `report.stats` on (sweep seed, retrain seed, item) pairs (item
and retrain-seed noise: are these picks different?), and a paired t-test of the per-sweep-seed
mean errors (sweep noise: would another sweep seed pick as well?). A method beats another
"beyond noise" only where both say so: a pooled count can be decided by one sweep seed whose
pick was unlucky, when the searches shared their picks on the others.

    python -m bench.selection --experiment digits-transfer --seeds 0 1 2 3 4
    python -m bench.selection --seeds 1 --threads 1 --save s1.json   # one sweep seed a process, then:
    python -m bench.selection --combine s0.json s1.json ...          # the verdicts over all their seeds
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import yaml

from bench.common import fit_selection, header, shipped_experiment, temp_dir, wilson_text, write_experiment

RETRAIN_SEEDS = [1000, 1001, 1002]   # no sweep seed reaches these
GOAL_RIVALS = ("optuna-tpe-median", "random")
BASELINE = "fine_tune"
FINE_TUNE_BASE_LR = 2e-3             # fastai 2.8's fine_tune(base_lr=2e-3, freeze_epochs=1, lr_mult=100)


def without(settings: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if k not in keys}


def as_shipped(base: dict[str, Any], seed: int) -> dict[str, Any]:
    return {**base, "sampler": {**base.get("sampler", {}), "seed": seed}}


def plain_optuna(base: dict[str, Any], seed: int) -> dict[str, Any]:
    return {**without(base, "selection"), "sampler": {"name": "tpe", "seed": seed, "n_startup_trials": 10},
            "pruner": {"name": "median", "n_startup_trials": 5, "n_warmup_steps": 0}}


def random_search(base: dict[str, Any], seed: int) -> dict[str, Any]:
    return {**without(base, "selection"), "sampler": {"name": "random", "seed": seed}, "pruner": {"name": "none"}}


def fine_tune_defaults(space: dict[str, Any]) -> dict[str, Any]:
    """fastai's `fine_tune` defaults as recipe parameters, at the space's first architecture."""
    arch = space["arch"]["choices"][0] if isinstance(space["arch"], dict) else space["arch"]
    epochs = space["epochs"]
    unfrozen = (epochs["low"] + epochs["high"]) // 2 if isinstance(epochs, dict) else int(epochs)
    return {"arch": arch, "base_lr": FINE_TUNE_BASE_LR, "lr_lo": FINE_TUNE_BASE_LR / 2 / 100,
            "lr_hi": FINE_TUNE_BASE_LR / 2, "freeze_epochs": 1, "epochs": unfrozen}


@dataclass(frozen=True)
class Method:
    text: str
    search: Callable[[dict[str, Any], int], dict[str, Any]] | None = None  # (shipped settings, seed) -> settings
    fixed: Callable[[dict[str, Any]], dict[str, Any]] | None = None        # space -> recipe params: no search


METHODS: dict[str, Method] = {
    "pet-sweep": Method("the shipped experiment as configured (sampler, pruner, selection); export's pick",
                        search=as_shipped),
    "optuna-tpe-median": Method("TPE and the median pruner at Optuna's defaults, best-of-N on one seed",
                                search=plain_optuna),
    "random": Method("random search, no pruner, best-of-N on one seed", search=random_search),
    BASELINE: Method("fastai's fine_tune defaults, no search (recipe phases: fit_one_cycle's pct_start/div)",
                     fixed=fine_tune_defaults),
}


@dataclass
class Pick:
    """One method's pick on one sweep seed, and its replays' held-out predictions per retrain seed."""

    params: dict[str, Any]
    trial: int | None = None          # None: no search
    valid_error: float | None = None
    trials: int = 0
    epochs: int = 0
    seconds: float = 0.0
    preds: dict[int, list[int]] = field(default_factory=dict)
    held_out: dict[int, bool | None] = field(default_factory=dict)   # replay's split check (None: unverified)

    def error(self, seed: int, targets: list[int]) -> float:
        return sum(p != t for p, t in zip(self.preds[seed], targets)) / len(targets)

    def mean_error(self, targets: list[int]) -> float:
        return statistics.mean(self.error(s, targets) for s in self.preds)


def most_epochs(space: dict[str, Any]) -> int:
    """The most epochs one trial of the space can train (frozen + unfrozen)."""
    def top(value: Any) -> int:
        return int(value["high"]) if isinstance(value, dict) and "high" in value else int(value)
    return top(space.get("freeze_epochs", 0)) + top(space["epochs"])


class Bench:
    """The sweeps and replays of one process, in one folder with one MLflow store (a fresh MLflow
    sqlite store costs seconds of migrations, paid once)."""

    def __init__(self, args: argparse.Namespace, space: dict[str, Any]) -> None:
        self.args, self.space, self.root = args, space, temp_dir("selection")
        self.base, _, self.others = shipped_experiment(args.experiment, selection=True)
        self.replays: dict[str, tuple[list[int], list[int], bool | None]] = {}   # one replay per (config, seed)
        self.targets: list[int] = []

    def experiment(self, name: str, settings: dict[str, Any], seed: int) -> Any:
        from pet_sweep.config import load_experiment

        budget = {"n_trials": self.args.n_trials or self.base["budget"]["n_trials"]}  # no timeout: trials decide
        model = {**self.base["model"], **({"img_size": self.args.img_size} if self.args.img_size else {})}
        data = {**self.base["data"], **({"limit": self.args.limit} if self.args.limit else {})}
        if "selection" in settings:  # the shipped selection, scaled to a smaller --n-trials
            settings = {**settings, "selection": fit_selection(settings["selection"], budget["n_trials"])}
        settings = {**settings, "budget": budget, "model": model, "data": data, "seed": seed,
                    "tracking": {"uri": f"sqlite:///{self.root / 'mlflow.db'}", "experiment": f"selection-{name}-{seed}"}}
        return load_experiment(write_experiment(self.root / f"{name}-{seed}", settings, self.space, others=self.others))

    def search(self, name: str, method: Method, seed: int, budget: int | None) -> tuple[Pick, dict[str, Any]]:
        """The method's sweep (to `budget` epochs, or as configured) and its exported pick."""
        from bench.common import epochs_trained
        from pet_sweep.exported import export_config
        from pet_sweep.sweep.loop import run_sweep
        from pet_sweep.sweep.storage import open_study, quiet_optuna

        quiet_optuna()
        assert method.search is not None
        exp = self.experiment(name, method.search(self.base, seed), seed)
        started, spent = time.perf_counter(), 0
        while True:
            chunk = None if budget is None else max(1, (budget - spent) // most_epochs(self.space))
            run_sweep(exp if chunk is None else exp.with_overrides(n_trials=chunk), echo=lambda line: None)
            study = open_study(exp, create=False)
            spent = epochs_trained(study)
            if budget is None or spent >= budget:
                break
        doc, number = export_config(exp)
        pick = Pick(doc["params"], number, doc["source"].get("validation_error"), len(study.trials), spent,
                    time.perf_counter() - started)
        return pick, doc

    def fixed_doc(self, params: dict[str, Any], seed: int) -> dict[str, Any]:
        """A no-search config as `export` writes one: the trial config, from the arch's checkpoint."""
        from pet_sweep.config import ModelConfig
        from pet_sweep.params import params_from_dict
        from pet_sweep.replay import FORMAT
        from pet_sweep.sweep.records import trial_config
        from pet_sweep.train.pretrain import checkpoints_for, starting_model

        exp = self.experiment(BASELINE, as_shipped(self.base, seed), seed)
        base = trial_config(exp, params_from_dict(params))
        model = starting_model(ModelConfig(**base["model"]), checkpoints_for(exp, echo=lambda line: None),
                               params["arch"])
        data = {**base["data"], **({"path": str(exp.data_path())} if exp.data_path() is not None else {})}
        return {"format": FORMAT, "name": f"selection-{BASELINE}", "data": data,
                "model": model.model_dump(exclude_none=True), "params": base["params"], "seed": seed,
                "tracking": {"uri": exp.tracking_uri, "experiment": exp.tracking_experiment}}

    def retrain(self, name: str, sweep_seed: int, doc: dict[str, Any], pick: Pick) -> None:
        """`pet-sweep train` of the pick's exported config once per retrain seed (a config already
        replayed on that seed by another method is not trained again)."""
        from pet_sweep.exported import write_config
        from pet_sweep.replay import train

        for seed in self.args.retrain_seeds:
            key = json.dumps([doc["params"], doc["model"], seed], sort_keys=True)
            if key not in self.replays:
                path = write_config({**doc, "seed": seed, "name": f"{doc['name']}-seed{seed}"},
                                    self.root / "picks" / f"{name}-{sweep_seed}-seed{seed}.yaml")
                out = train(path, echo=lambda line: None)
                self.replays[key] = (list(out.test_predictions), list(out.test_targets), out.held_out)
            preds, targets, held_out = self.replays[key]
            if self.targets and targets != self.targets:
                raise RuntimeError(f"{name}, sweep seed {sweep_seed}: the held-out items differ from the others'")
            self.targets = targets
            pick.preds[seed], pick.held_out[seed] = preds, held_out

    def sweep_seed(self, seed: int, names: list[str]) -> dict[str, Pick]:
        picks: dict[str, Pick] = {}
        budget = self.args.budget_epochs
        for name in names:
            method = METHODS[name]
            if method.search is not None:
                pick, doc = self.search(name, method, seed, budget)
                budget = pick.epochs if budget is None else budget
            else:
                assert method.fixed is not None
                started = time.perf_counter()
                params = method.fixed(self.space)
                pick, doc = Pick(params), self.fixed_doc(params, seed)
                pick.seconds = time.perf_counter() - started
            started = time.perf_counter()
            self.retrain(name, seed, doc, pick)
            picks[name] = pick
            errors = " ".join(f"{pick.error(s, self.targets):.4f}" for s in self.args.retrain_seeds)
            valid = "-" if pick.valid_error is None else f"{pick.valid_error:.4f}"
            print(f"{seed} | {name} | {pick.trials} | {pick.epochs} | {pick.trial if pick.trial is not None else '-'} | "
                  f"{valid} | {errors} | {pick.mean_error(self.targets):.4f} | "
                  f"{pick.seconds:.0f}+{time.perf_counter() - started:.0f} | {pick.params}", flush=True)
        return picks


def measure(args: argparse.Namespace, names: list[str]) -> tuple[dict[int, dict[str, Pick]], list[int]]:
    import torch  # heavy: only to pin the threads

    torch.set_num_threads(args.threads)
    _, shipped_space, _ = shipped_experiment(args.experiment)
    space = yaml.safe_load(args.space.read_text()) if args.space else shipped_space
    bench = Bench(args, space)
    for name in names:
        print(f"# {name}: {METHODS[name].text}")
    print("sweep seed | method | trials | epochs | pick (trial) | its valid err | held-out err per retrain seed | "
          "mean | wall s (search+retrain) | params", flush=True)
    runs = {seed: bench.sweep_seed(seed, names) for seed in args.seeds}
    return runs, bench.targets


def save(path: Path, runs: dict[int, dict[str, Pick]], targets: list[int]) -> None:
    path.write_text(json.dumps({"targets": targets, "runs": {s: {n: asdict(p) for n, p in picks.items()}
                                                             for s, picks in runs.items()}}))


def combine(paths: list[Path]) -> tuple[dict[int, dict[str, Pick]], list[int]]:
    """The picks of several `--save` files: each sweep seed once, the same held-out items and methods."""
    runs: dict[int, dict[str, Pick]] = {}
    targets: list[int] = []
    for path in paths:
        doc = json.loads(path.read_text())
        if targets and doc["targets"] != targets:
            raise SystemExit(f"{path}: its held-out items differ from the earlier files'")
        targets = doc["targets"]
        for seed, picks in doc["runs"].items():
            if int(seed) in runs:
                raise SystemExit(f"{path}: sweep seed {seed} is already in an earlier file")
            if runs and set(picks) != set(next(iter(runs.values()))):
                raise SystemExit(f"{path}: methods {sorted(picks)}, but the earlier files have "
                                 f"{sorted(next(iter(runs.values())))}")
            runs[int(seed)] = {n: Pick(**{**p, "preds": {int(k): v for k, v in p["preds"].items()},
                                          "held_out": {int(k): v for k, v in p["held_out"].items()}})
                               for n, p in picks.items()}
    return runs, targets


def pooled(runs: dict[int, dict[str, Pick]], name: str) -> list[int]:
    """A method's held-out predictions over every sweep seed and retrain seed, in one order for all."""
    return [p for seed in sorted(runs) for r in sorted(runs[seed][name].preds) for p in runs[seed][name].preds[r]]


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and t 95 % interval (nan without two values)."""
    from scipy.stats import t  # heavy: scipy.stats

    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return mean, mean - half, mean + half


def regrets(runs: dict[int, dict[str, Pick]], targets: list[int], names: list[str]) -> tuple[float, dict[str, float]]:
    """The best config any method picked (lowest mean held-out error over its retrain seeds) and each
    method's mean regret against it over the sweep seeds."""
    best = min(runs[s][n].mean_error(targets) for s in runs for n in names)
    return best, {n: statistics.mean(runs[s][n].mean_error(targets) - best for s in runs) for n in names}


def compare(runs: dict[int, dict[str, Pick]], targets: list[int], pairs: list[tuple[str, str]]) -> list[Any]:
    """Exact McNemar per pair on (sweep seed, retrain seed, item) pairs, Holm across the pairs."""
    from pet_sweep.report.stats import compare_predictions, holm_corrected

    n_retrains = {len(p.preds) for picks in runs.values() for p in picks.values()}
    if len(n_retrains) != 1:
        raise SystemExit(f"the picks were retrained on different numbers of seeds: {sorted(n_retrains)}")
    truth = targets * len(runs) * n_retrains.pop()
    return holm_corrected([compare_predictions(f"{a} vs {b}", (0, pooled(runs, a)), (i, pooled(runs, b)), truth)
                           for i, (a, b) in enumerate(pairs, start=1)])


def seed_p_value(diffs: list[float]) -> float:
    """Two-sided paired t-test of per-sweep-seed differences against 0 (nan below two seeds; 0 where
    every seed differs by the same nonzero amount, 1 where none differs)."""
    from scipy.stats import t  # heavy: scipy.stats

    if len(diffs) < 2:
        return float("nan")
    mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
    if sd == 0:
        return 0.0 if mean != 0 else 1.0
    return float(2 * t.sf(abs(mean) / (sd / len(diffs) ** 0.5), len(diffs) - 1))


def seeds_needed(diffs: list[float], family: int, power: float = 0.8) -> str:
    """Sweep seeds for a paired t-test (normal approximation) to find the mean of `diffs` at their
    spread, at Holm's strictest level over `family` pairs; "-" where the seeds never differ, or all by the same."""
    from scipy.stats import norm  # heavy: scipy.stats

    from pet_sweep.report.stats import ALPHA

    mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
    if mean == 0 or sd == 0:
        return "-"
    z = norm.ppf(1 - ALPHA / family / 2) + norm.ppf(power)
    return str(max(2, math.ceil((z * sd / abs(mean)) ** 2)))


@dataclass(frozen=True)
class Verdict:
    """One pair's tests: `pooled` (McNemar, Holm), the per-sweep-seed differences a - b, their paired
    t-test's Holm p, and the verdict of both."""

    pooled: Any
    diffs: list[float]
    seed_p: float
    verdict: str

    def beats(self) -> bool:
        """a's pick beats b's beyond noise."""
        return self.verdict == "beyond noise" and self.pooled.best_error < self.pooled.other_error


def verdicts(runs: dict[int, dict[str, Pick]], targets: list[int], pairs: list[tuple[str, str]]) -> list[Verdict]:
    """Per pair: the pooled McNemar comparison, the sweep seeds' paired t-test (Holm across the pairs)
    and the verdict of both."""
    from pet_sweep.report.stats import ALPHA, holm

    seeds = sorted(runs)
    diffs = [[runs[s][a].mean_error(targets) - runs[s][b].mean_error(targets) for s in seeds] for a, b in pairs]
    raw = [seed_p_value(d) for d in diffs]
    seed_p = [float("nan") if r != r else p for r, p in zip(raw, holm([1.0 if r != r else r for r in raw]))]
    out = []
    for c, d, p in zip(compare(runs, targets, pairs), diffs, seed_p):  # nan (one sweep seed): never beyond
        items = c.verdict == "beyond noise"
        verdict = ("beyond noise" if items and p < ALPHA else "within noise (items)" if not items
                   else "within noise (sweep seeds)")
        out.append(Verdict(c, d, p, verdict))
    return out


def loses_on_a_seed(runs: dict[int, dict[str, Pick]], targets: list[int], name: str, baseline: str) -> list[int]:
    """The sweep seeds where `baseline`'s pick beats `name`'s beyond noise (McNemar over that seed's
    retrain seeds x items, Holm across the sweep seeds)."""
    from pet_sweep.report.stats import holm_corrected

    seeds = sorted(runs)
    # one hypothesis per seed: each its own rival number, so that Holm counts them all
    found = holm_corrected([replace(compare({s: runs[s]}, targets, [(name, baseline)])[0], other_trial=i)
                            for i, s in enumerate(seeds)])
    return [s for s, c in zip(seeds, found) if c.verdict == "beyond noise" and c.best_error > c.other_error]


def report(runs: dict[int, dict[str, Pick]], targets: list[int]) -> list[str]:
    """The summary table, the paired comparisons and the goal's checks."""
    from pet_sweep.report.stats import plural

    names = list(next(iter(runs.values())))
    seeds = sorted(runs)
    n = len(targets)
    lines = [f"# over {plural(len(seeds), 'sweep seed')} ({' '.join(map(str, seeds))}) x retrain seeds "
             f"{' '.join(map(str, sorted(runs[seeds[0]][names[0]].preds)))} x {n} held-out items",
             "| method | held-out error of its pick, pooled [Wilson 95% CI] | over sweep seeds: mean [t 95% CI] | "
             "regret vs the best config found | epochs searched (per sweep seed) | trials |", "|---|---|---|---|---|---|"]
    best, regret = regrets(runs, targets, names)
    for name in names:
        truth = targets * len(seeds) * len(runs[seeds[0]][name].preds)
        wrong = sum(p != t for p, t in zip(pooled(runs, name), truth))
        mean, lo, hi = t_interval([runs[s][name].mean_error(targets) for s in seeds])
        lines.append(f"| {name} | {wilson_text(wrong, len(truth))} | {mean:.4f} [{lo:.4f}, {hi:.4f}] | "
                     f"{regret[name]:+.4f} | {' '.join(str(runs[s][name].epochs) for s in seeds)} | "
                     f"{' '.join(str(runs[s][name].trials) for s in seeds)} |")
    lines.append(f"# the best config any method picked: mean held-out error {best:.4f}")
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    found = verdicts(runs, targets, pairs)
    lines += ["| pair (a vs b) | a | b | only a wrong / only b wrong | McNemar p | Holm p | "
              "sweep seeds a lower / tie / higher | sweep seeds paired t, Holm p | verdict |",
              "|---|---|---|---|---|---|---|---|---|"]
    for (a, b), v in zip(pairs, found):
        c, d = v.pooled, v.diffs
        tally = f"{sum(x < 0 for x in d)} / {sum(x == 0 for x in d)} / {sum(x > 0 for x in d)}"
        lines.append(f"| {a} vs {b} | {c.best_error:.4f} | {c.other_error:.4f} | {c.only_best_wrong} / "
                     f"{c.only_other_wrong} | {c.p_value:.3g} | {c.adjusted[1]:.3g} | {tally} | {'-' if v.seed_p != v.seed_p else f'{v.seed_p:.3g}'} | "
                     f"{v.verdict} |")
    needed = [f"{b} {seeds_needed(v.diffs, len(pairs))}" for (a, b), v in zip(pairs, found)
              if a == "pet-sweep"] if len(seeds) >= 2 else []
    if needed:
        lines.append("# sweep seeds a paired t-test would need at these spreads to call each pet-sweep pair "
                     f"(power 0.8, Holm's strictest level): {', '.join(needed)}")
    lines += goal(runs, targets, names, dict(zip(pairs, found)))
    return lines


def goal(runs: dict[int, dict[str, Pick]], targets: list[int], names: list[str],
         comparisons: dict[tuple[str, str], Verdict]) -> list[str]:
    """The issue's goal, each part checked here: pet-sweep's pick beats each rival's beyond noise
    (lower error; Holm-adjusted pooled McNemar and sweep seeds' paired t both below 0.05), and loses
    to fine_tune beyond noise neither so nor on any one sweep seed."""
    if "pet-sweep" not in names or len(runs) < 5:
        return [f"goal: not judged ({'no pet-sweep arm' if 'pet-sweep' not in names else f'{len(runs)} < 5 sweep seeds'})"]
    lines = []
    for rival in (r for r in GOAL_RIVALS if r in names):
        v = comparisons.get(("pet-sweep", rival))
        met = v is not None and v.beats()
        lines.append(f"goal: pet-sweep's pick beats {rival}'s beyond noise (pooled and over sweep seeds, "
                     f"Holm p < 0.05): {'met' if met else 'not met'}")
    if BASELINE in names:
        v = comparisons.get(("pet-sweep", BASELINE))
        lost = loses_on_a_seed(runs, targets, "pet-sweep", BASELINE)
        pooled_loss = v is not None and v.pooled.verdict == "beyond noise" and v.pooled.best_error > v.pooled.other_error
        lines.append(f"goal: pet-sweep's pick never loses to {BASELINE} beyond noise (pooled, and on each sweep seed, "
                     f"Holm across seeds): {'not met' if lost or pooled_loss else 'met'}"
                     + (f" (loses on sweep seeds {' '.join(map(str, lost))})" if lost else ""))
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="digits-transfer", help="a shipped experiment")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="sweep seeds (>= 5 to judge)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--retrain-seeds", type=int, nargs="+", default=RETRAIN_SEEDS)
    parser.add_argument("--n-trials", type=int, help="the first search's trials (default: the experiment's)")
    parser.add_argument("--budget-epochs", type=int, help="every search's epochs (default: the first search's)")
    parser.add_argument("--img-size", type=int, help="smoke runs (default: the experiment's)")
    parser.add_argument("--limit", type=int, help="smoke runs: digits images used (default: the experiment's)")
    parser.add_argument("--space", type=Path, help="smoke runs: a sweep file instead of the experiment's")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 for one seed a process)")
    parser.add_argument("--save", type=Path, help="also write the picks and their predictions to this JSON file")
    parser.add_argument("--combine", type=Path, nargs="+", help="judge the picks of these --save files")
    args = parser.parse_args(argv)
    if args.combine:
        runs, targets = combine(args.combine)
        print(f"# selection: combined {' '.join(map(str, args.combine))}: sweep seeds {' '.join(map(str, sorted(runs)))}")
    else:
        shrunk = [f"{k} {v}" for k, v in (("n_trials", args.n_trials), ("budget_epochs", args.budget_epochs),
                                          ("img_size", args.img_size), ("limit", args.limit), ("space", args.space))
                  if v is not None]
        shipped = shipped_experiment(args.experiment, selection=True)[0]
        if args.n_trials and "selection" in shipped:
            fitted = fit_selection(shipped["selection"], args.n_trials)
            if fitted != {"seeds": 1, "confirm_top": 0, "baseline": False, **shipped["selection"]}:
                shrunk.append("selection " + " ".join(f"{k}={v}" for k, v in fitted.items()))
        print(header(f"selection: {args.experiment}, sweep seeds {' '.join(map(str, args.seeds))}, retrain seeds "
                     f"{' '.join(map(str, args.retrain_seeds))}, {args.threads} thread(s)"
                     + (f" (changed from the shipped experiment: {', '.join(shrunk)})" if shrunk else "")))
        runs, targets = measure(args, args.methods)
        if args.save:
            save(args.save, runs, targets)
    print("\n".join(report(runs, targets)))


if __name__ == "__main__":
    main()
