"""Chapter 5's claims, tested offline on `digits-transfer` with the report's own statistics.

fastbook chapter 5 compares fine-tuning choices by hand on Pets. Here each comparison is two
fixed configs (arms) on `digits-transfer` (the digits 5-9 from 10 training images a class,
fine-tuning bodies that `pet-sweep pretrain digits-source` trained on the digits 0-4):

    claim (the arm said to be better first)                          the other arm
    1 pretrained body                                                 the same arch from scratch
    2 freeze -> unfreeze                                              everything from the start, one LR
    3 discriminative slice(lo, hi) after the frozen phase             one LR for all groups
    4 a deeper body (xresnet34)                                       xresnet18, same epochs and LRs
    5 the LR finder's valley (frozen phase; unfrozen slice(v/10, v))  every rate 10x higher

Every arm is written as the standalone config `pet-sweep export` writes (`<arm>-seed<N>.yaml`
in the output folder; `pet-sweep train FILE` replays one), read back with `replay.load_replay`,
and fine-tuned by the recipe every trial runs (`recipe.fine_tune`) from the checkpoint the
sweep's trials start from (`pretrain.pretrain` of digits-source, reused from pet-sweep's cache
as `run` reuses it). It is judged on the held-out split,
699 images no arm trains or is selected on; the pretrained bodies stay fixed (source seed 0)
and `--seeds` are the fine-tunes' seeds.

Baseline (arms 1-4): xresnet18, freeze_epochs 1 at base_lr 1e-2, then 6 epochs at
slice(1e-3, 1e-2). It is the recipe sweeps/digits-transfer.yaml chose `per_class` with (so the
task was sized on it, not tuned for any claim), and it is inside that space at an ordinary
point: one frozen epoch as in fastai's `fine_tune`, lr_mult 10 (the log-middle of 1-100),
7 epochs in all (the middle of 2-10 unfrozen plus 0-3 frozen). Arms that drop the frozen
phase train 7 unfrozen epochs, so each pair trains the same number of epochs; one LR is the
slice's top, 1e-2, the rate the new head gets in the baseline. The scratch arm follows the
sweep file's comparison: no frozen phase (a frozen random body learns nothing), 7 epochs at
slice(1e-3, 1e-2). Arm 5 takes its rates from the LR finder run on the pretrained
xresnet18 like `pet-sweep lr-find` (one frozen epoch at the frozen valley, then the unfrozen
finder), seeded like the fine-tune; `valley` is fastai's default suggestion.

Paired test: the exact McNemar test of `report.stats`, on the per-item predictions pooled over
the seeds, each (seed, item) one pair of the two arms' answers. Pooled rather than one test per
seed combined afterwards: a seed changes only the training's randomness, so under the null
that the two arms are interchangeable on every item, each discordant pair is a fair coin
whatever the seed, and pooling keeps every discordant pair (three times the discordant items
of one seed, so more power, and no choice of a p-combining rule). The items repeat across the
seeds, so the test speaks for these 699 items and this training set, as every held-out
figure of pet-sweep does. Holm-Bonferroni (`report.stats.holm_corrected`) runs across the five
claims. Verdict: `holds` when the Holm-adjusted p < 0.05 and the claimed arm errs less,
`reversed` when the other arm does, `within noise` otherwise.

    python -m bench.chapter5 [--seeds 0 1 2]
    python -m bench.chapter5 --seeds 1 --save s1.json   # one seed a process (or a machine), then:
    python -m bench.chapter5 --combine s0.json s1.json s2.json   # the table over all their seeds
    python -m bench.chapter5 --seeds 0 --img-size 16 --limit 300 --pretrain-epochs 1 --epochs 1 --num-it 30   # smoke
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.common import ROOT, header, temp_dir, wilson_text

TARGET, SOURCE = "digits-transfer", "digits-source"
BASELINE = {"arch": "xresnet18", "base_lr": 1e-2, "lr_lo": 1e-3, "lr_hi": 1e-2, "freeze_epochs": 1, "epochs": 6}
DEEPER = "xresnet34"
SUGGESTION = "valley"   # fastai's default `lr_find()` suggestion
HIGHER = 10.0           # the finder arm's rival: every rate this many times higher
FASTBOOK = "fastbook on Pets (resnet34 unless said): 5.41 % with slice(1e-6, 1e-4); 5.48 % resnet50 fp16"


@dataclass(frozen=True)
class Claim:
    text: str
    better: str   # the arm the chapter says is better
    other: str


CLAIMS = (
    Claim("pretrained body vs the same arch from scratch", "baseline", "scratch"),
    Claim("freeze -> unfreeze vs all layers from the start at one LR", "baseline", "one-lr-from-start"),
    Claim("slice(lo, hi) vs one LR for all groups", "baseline", "one-lr-unfrozen"),
    Claim(f"deeper body ({DEEPER} vs {BASELINE['arch']}) at the same epochs", "deeper", "baseline"),
    Claim(f"LR finder's {SUGGESTION} vs {HIGHER:g}x higher", "finder", "finder-x10"),
)


@dataclass
class Arm:
    """One arm's predictions on the held-out items, per seed."""

    preds: dict[int, list[int]] = field(default_factory=dict)
    seconds: dict[int, float] = field(default_factory=dict)
    params: dict[int, dict[str, Any]] = field(default_factory=dict)


def arm_params(epochs: int, finder: dict[str, float]) -> dict[str, tuple[dict[str, Any], bool]]:
    """Each arm's recipe parameters and whether it starts from the pretrained body.
    `epochs`: the baseline's unfrozen epochs; `finder`: the suggested base_lr and lr_hi."""
    base = {**BASELINE, "epochs": epochs}
    total = base["freeze_epochs"] + epochs
    top = base["lr_hi"]
    unfrozen = {"freeze_epochs": 0, "epochs": total}
    found = {**base, "base_lr": finder["base_lr"], "lr_hi": finder["lr_hi"],
             "lr_lo": finder["lr_hi"] * base["lr_lo"] / base["lr_hi"]}
    return {
        "baseline": (base, True),
        "scratch": ({**base, **unfrozen}, False),
        "one-lr-from-start": ({**base, **unfrozen, "lr_lo": top}, True),
        "one-lr-unfrozen": ({**base, "lr_lo": top}, True),
        "finder": (found, True),
        "finder-x10": ({**found, **{k: found[k] * HIGHER for k in ("base_lr", "lr_lo", "lr_hi")}}, True),
        "deeper": ({**base, "arch": DEEPER}, True),  # last: its body is the slowest to pretrain
    }


def experiments_for(folder: Path, args: argparse.Namespace) -> Path:
    """The shipped experiments.yaml and sweeps/ in `folder` (stores there too), shrunk for a smoke run."""
    shutil.copytree(ROOT / "sweeps", folder / "sweeps")
    doc = yaml.safe_load((ROOT / "experiments.yaml").read_text())
    for name in (SOURCE, TARGET):
        exp = doc["experiments"][name]
        if args.limit:
            exp["data"]["limit"] = args.limit
        if args.img_size:
            exp["model"]["img_size"] = args.img_size
    if args.pretrain_epochs:
        doc["experiments"][SOURCE]["pretrain"]["epochs"] = args.pretrain_epochs
    path = folder / "experiments.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def write_arm(folder: Path, name: str, exp: Any, model: Any, params: dict[str, Any], seed: int) -> Path:
    """The arm as the standalone config `pet-sweep export` writes (`pet-sweep train` replays it)."""
    from pet_sweep.exported import write_config
    from pet_sweep.params import params_from_dict
    from pet_sweep.replay import FORMAT, ReplayConfig

    params = params_from_dict(params).as_dict()  # as export writes them: no base_lr without a frozen phase
    doc = {"format": FORMAT, "name": f"chapter5-{name}-seed{seed}",
           "data": exp.config.data.model_dump(exclude_none=True), "model": model.model_dump(exclude_none=True),
           "params": params, "seed": seed,
           "tracking": {"uri": exp.tracking_uri, "experiment": f"{exp.tracking_experiment}-chapter5"}}
    ReplayConfig(**doc)
    return write_config(doc, folder / f"{name}-seed{seed}.yaml")


def run_arm(path: Path, data: Any) -> tuple[list[int], list[int], float]:
    """Load an arm's config as `pet-sweep train` does and fine-tune it once with the recipe."""
    from pet_sweep.params import params_from_dict
    from pet_sweep.replay import held_out_predictions, load_replay, without_training_callbacks
    from pet_sweep.train import recipe

    cfg, _ = load_replay(path)
    started = time.perf_counter()
    result = recipe.fine_tune(data.dls, params_from_dict(cfg.params), cfg.model, seed=cfg.seed, keep_learner=True)
    try:
        without_training_callbacks(result.learner)
        preds, targets = held_out_predictions(result.learner, data.splits.test)
    finally:
        recipe.release(result.learner)
    return preds, targets, time.perf_counter() - started


def finder_rates(data: Any, model: Any, seed: int, num_it: int | None) -> dict[str, float]:
    """The LR finder's suggestions on the pretrained baseline arch: the frozen phase's (base_lr),
    then, after one frozen epoch at it, the unfrozen phase's (lr_hi)."""
    from pet_sweep.space import PHASES
    from pet_sweep.train.lrfind import Protocol, find_lrs

    protocol = Protocol(BASELINE["freeze_epochs"], "the bench's baseline", None)
    found = find_lrs(data.dls, BASELINE["arch"], model, seed=seed, phases=PHASES, protocol=protocol,
                     num_it=num_it)
    return {"base_lr": found["frozen"].suggestions[SUGGESTION], "lr_hi": found["unfrozen"].suggestions[SUGGESTION]}


def run_seed(seed: int, exp: Any, data: Any, bodies: Bodies, folder: Path, args: argparse.Namespace,
             arms: dict[str, Arm]) -> list[int]:
    """Every arm once with this seed; the held-out targets (the same items for every arm)."""
    finder = finder_rates(data, bodies.model(BASELINE["arch"]), seed, args.num_it)
    print(f"seed {seed}: LR finder ({SUGGESTION}) frozen {finder['base_lr']:.2e}, "
          f"unfrozen {finder['lr_hi']:.2e}", flush=True)
    scratch = exp.config.model.model_copy(update={"pretrained": False, "pretrained_on": None, "weights": None})
    targets: list[int] = []
    for name, (params, from_body) in arm_params(args.epochs, finder).items():
        model = bodies.model(params["arch"]) if from_body else scratch
        path = write_arm(folder, name, exp, model, params, seed)
        preds, seen, seconds = run_arm(path, data)
        if targets and seen != targets:
            raise RuntimeError(f"arm {name}, seed {seed}: the held-out targets differ from the other arms'")
        targets = seen
        arm = arms.setdefault(name, Arm())
        arm.preds[seed], arm.seconds[seed], arm.params[seed] = preds, seconds, params
        wrong = sum(p != t for p, t in zip(preds, targets))
        print(f"{seed} | {name} | {wilson_text(wrong, len(targets))} | {seconds:.0f} | {params}", flush=True)
    return targets


def save(path: Path, arms: dict[str, Arm], targets: dict[int, list[int]], n_test: int) -> None:
    """Every arm's held-out predictions per seed, for `--combine`."""
    doc = {"n_test": n_test, "targets": targets,
           "arms": {name: {"preds": a.preds, "seconds": a.seconds, "params": a.params} for name, a in arms.items()}}
    path.write_text(json.dumps(doc))


def combine(paths: list[Path]) -> tuple[dict[str, Arm], dict[int, list[int]], int]:
    """The arms and targets of several `--save` files (each seed once, the same held-out items)."""
    arms: dict[str, Arm] = {}
    targets: dict[int, list[int]] = {}
    sizes = set()
    for path in paths:
        doc = json.loads(path.read_text())
        sizes.add(doc["n_test"])
        for seed, seen in doc["targets"].items():
            if int(seed) in targets or (targets and seen != next(iter(targets.values()))):
                raise SystemExit(f"{path}: seed {seed} is given twice, or its held-out items differ from the others'")
            targets[int(seed)] = seen
        for name, saved in doc["arms"].items():
            arm = arms.setdefault(name, Arm())
            for key in ("preds", "seconds", "params"):
                getattr(arm, key).update({int(k): v for k, v in saved[key].items()})
    return arms, targets, sizes.pop()


def verdict(comparison: Any) -> str:
    """holds / within noise / reversed, from the Holm-adjusted McNemar p and the direction."""
    if comparison.verdict != "beyond noise":
        return "within noise"
    return "holds" if comparison.best_error < comparison.other_error else "reversed"


def judge(arms: dict[str, Arm], targets: dict[int, list[int]], seeds: list[int]) -> list[Any]:
    """One paired comparison per claim on the predictions pooled over the seeds, Holm-corrected."""
    from pet_sweep.report.stats import compare_predictions, holm_corrected

    pooled = [t for s in seeds for t in targets[s]]
    found = []
    for i, claim in enumerate(CLAIMS, start=1):
        better = [p for s in seeds for p in arms[claim.better].preds[s]]
        other = [p for s in seeds for p in arms[claim.other].preds[s]]
        found.append(compare_predictions(claim.text, (0, better), (i, other), pooled))
    return holm_corrected(found)


def table(comparisons: list[Any]) -> list[str]:
    """The markdown table: one row per claim."""
    from pet_sweep.report.stats import errors_of

    rows = ["| claim | claimed better: error [95% CI] | other: error [95% CI] | discordant (only better wrong / "
            "only other wrong) | McNemar p | Holm p | verdict |", "|---|---|---|---|---|---|---|"]
    for claim, c in zip(CLAIMS, comparisons):
        n = c.n_items
        rows.append(f"| {c.label} | {claim.better}: {wilson_text(errors_of(c.best_error, n), n)} | "
                    f"{claim.other}: {wilson_text(errors_of(c.other_error, n), n)} | "
                    f"{c.only_best_wrong} / {c.only_other_wrong} | {c.p_value:.3g} | {c.adjusted[1]:.3g} | "
                    f"{verdict(c)} |")
    return rows


class Bodies:
    """The checkpoint each arch starts from, as the sweep's trials get it (`pretrain` on the source
    experiment: reused from pet-sweep's cache, or trained and cached), made when first asked."""

    def __init__(self, exp: Any) -> None:
        from pet_sweep.config import load_experiment

        self.exp = exp
        self.source = load_experiment(exp.config_path, exp.config.model.pretrained_on)
        self.found: dict[str, Any] = {}

    def model(self, arch: str) -> Any:
        """The model settings of a fine-tune of `arch` from its pretrained body."""
        from pet_sweep.train.pretrain import pretrain, starting_model

        if arch not in self.found:
            started = time.perf_counter()
            found = self.found[arch] = pretrain(self.source, [arch], echo=lambda line: print(f"# {line}"))[0]
            print(f"# {arch} body ready in {time.perf_counter() - started:.0f}s: {found.path} "
                  f"sha256 {found.sha256[:12]}", flush=True)
        return starting_model(self.exp.config.model, self.found, arch)


def measure(args: argparse.Namespace) -> tuple[dict[str, Arm], dict[int, list[int]], int]:
    """Every arm with every seed on the (shipped or shrunk) target task."""
    from pet_sweep.config import load_experiment
    from pet_sweep.train.data import build_data

    folder = temp_dir("chapter5")
    exp = load_experiment(experiments_for(folder, args), TARGET)
    data, bodies = build_data(exp), Bodies(exp)
    print(f"# {len(data.splits.train)} training, {len(data.splits.valid)} validation, {len(data.splits.test)} "
          f"held-out items; arm configs in {folder}", flush=True)
    print("seed | arm | held-out error [95% CI] | seconds | params", flush=True)
    arms: dict[str, Arm] = {}
    targets = {seed: run_seed(seed, exp, data, bodies, folder, args, arms) for seed in args.seeds}
    if args.save:
        save(args.save, arms, targets, len(data.splits.test))
    return arms, targets, len(data.splits.test)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="fine-tune seeds (>= 3 to judge)")
    parser.add_argument("--epochs", type=int, default=BASELINE["epochs"], help="the baseline's unfrozen epochs")
    parser.add_argument("--limit", type=int, help="smoke runs: digits images per experiment (default: all)")
    parser.add_argument("--img-size", type=int, help="smoke runs: image size (default: the experiments')")
    parser.add_argument("--pretrain-epochs", type=int, help="smoke runs: digits-source's pretrain epochs")
    parser.add_argument("--num-it", type=int, help="smoke runs: LR finder steps (default: fastai's 100)")
    parser.add_argument("--save", type=Path, help="also write the arms' held-out predictions to this JSON file")
    parser.add_argument("--combine", type=Path, nargs="+", help="judge the predictions of these --save files")
    args = parser.parse_args(argv)
    import torch  # heavy: only to pin the threads

    torch.set_num_threads(2)
    shrunk = args.limit or args.img_size or args.pretrain_epochs or args.num_it or args.epochs != BASELINE["epochs"]
    what = f"files {' '.join(map(str, args.combine))}" if args.combine else f"seeds {' '.join(map(str, args.seeds))}"
    print(header(f"chapter 5's claims on {TARGET}, {what}"
                 + (" (SHRUNK for a smoke run: not the shipped task)" if shrunk else "")))
    arms, targets, n_test = combine(args.combine) if args.combine else measure(args)
    seeds = sorted(targets)
    comparisons = judge(arms, targets, seeds)
    print(f"# pooled over {len(seeds)} seeds ({' '.join(map(str, seeds))}) x {n_test} held-out items; exact "
          f"McNemar, Holm-Bonferroni across {len(CLAIMS)} claims")
    print("\n".join(table(comparisons)))
    if len(seeds) < 3:
        print(f"# {len(seeds)} seed(s): fewer than the 3 the claims are judged on")
    print(f"# {FASTBOOK}")


if __name__ == "__main__":
    main()
