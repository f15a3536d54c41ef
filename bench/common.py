"""Shared helpers for the benchmark scripts: temporary experiments, sweeps run in-process, medians."""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    """One line naming the machine the figures come from."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = kernels = ""
    try:
        import torch

        # which vector kernels torch picked (AVX2, AVX512): CPUs that print the same name differ here
        kernels = f", torch CPU kernels {torch.backends.cpu.get_cpu_capability()}"
        if torch.cuda.is_available():
            gpu = f", GPU {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return f"{os.cpu_count()} cores ({cpu}){kernels}{gpu}, Python {platform.python_version()}"


def hand_written_dls(img_size: int, batch_size: int) -> Any:
    """What a user writes by hand with fastai: a DataBlock over the digits PNGs, pet-sweep's split,
    decoded and resized per item every epoch."""
    from fastai.data.block import CategoryBlock, DataBlock
    from fastai.data.transforms import IndexSplitter, RegexLabeller
    from fastai.vision.augment import Resize
    from fastai.vision.data import ImageBlock
    from fastcore.xtras import using_attr

    from pet_sweep.train.data import digits_folder, image_files, split_items

    splits = split_items(image_files(digits_folder()), 0.2, 0.1, 42)
    items = list(splits.train) + list(splits.valid)
    block = DataBlock(blocks=(ImageBlock, CategoryBlock), get_y=using_attr(RegexLabeller(r"^(\d+)_"), "name"),
                      splitter=IndexSplitter(range(len(splits.train), len(items))), item_tfms=Resize(img_size))
    return block.dataloaders(items, bs=batch_size, num_workers=0)


def write_experiment(folder: Path, experiment: dict[str, Any], space: dict[str, Any], name: str = "bench",
                     others: dict[str, dict[str, Any]] | None = None) -> Path:
    """An experiments.yaml with one experiment whose stores live in `folder`; `others` are shipped
    experiments it names (`model.pretrained_on`), written as shipped beside a copy of sweeps/."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "space.yaml").write_text(yaml.safe_dump(space))
    if others and not (folder / "sweeps").exists():
        shutil.copytree(ROOT / "sweeps", folder / "sweeps")
    doc = {"default": name, "experiments": {name: {
        "sweep": "space.yaml", "storage": "sqlite:///optuna.db",
        "tracking": {"uri": "sqlite:///mlflow.db"}, **experiment}, **(others or {})}}
    path = folder / "experiments.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def experiment_in(folder: Path, experiment: dict[str, Any], space: dict[str, Any], name: str = "bench") -> Any:
    """The experiment `write_experiment` would write, built in Python (`Experiment.from_dict`):
    no YAML on disk; the stores live in `folder`."""
    import pet_sweep

    folder.mkdir(parents=True, exist_ok=True)
    return pet_sweep.Experiment.from_dict({"sweep": space, "storage": "sqlite:///optuna.db",
                                           "tracking": {"uri": "sqlite:///mlflow.db"}, **experiment},
                                          name, base_dir=folder)


def digits_space() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "sweeps" / "digits.yaml").read_text())


def default_digits() -> dict[str, Any]:
    """The shipped `digits` experiment, minus its stores and sweep file."""
    return shipped_experiment("digits")[0]


def shipped_experiment(name: str, *, selection: bool = False
                       ) -> tuple[dict[str, Any], dict[str, Any], dict[str, dict[str, Any]]]:
    """A shipped experiment minus its stores and sweep file; its search space; and the shipped
    experiments it names (the source of `model.pretrained_on`), for `write_experiment(others=)`.

    Without `selection` (the benchmarks that measure one thing: a pruner, a cost, a front), its
    `selection:` is left out: one seed per config and no baseline, as their figures were measured,
    and the baseline and the repeats take no slot of the few trials they run. `bench.selection`,
    which measures the selection, keeps it (`fit_selection` scales it to a smaller budget)."""
    shipped = yaml.safe_load((ROOT / "experiments.yaml").read_text())["experiments"]
    if name not in shipped:
        raise SystemExit(f"{ROOT / 'experiments.yaml'}: no experiment {name!r} (known: {', '.join(shipped)})")
    exp = shipped[name]
    source = (exp.get("model") or {}).get("pretrained_on")
    space = yaml.safe_load((ROOT / exp["sweep"]).read_text())
    dropped = ("sweep", "storage", "tracking") + (() if selection else ("selection",))
    return ({k: v for k, v in exp.items() if k not in dropped}, space,
            {source: shipped[source]} if source else {})


def fit_selection(selection: dict[str, Any], n_trials: int) -> dict[str, Any]:
    """`selection:` cut down to leave a trial of `n_trials` to search, as `--n-trials` cuts it
    (`pet_sweep.selection.SelectionConfig.fitted`)."""
    from pet_sweep.selection import SelectionConfig

    return SelectionConfig(**selection).fitted(n_trials).model_dump()


def temp_dir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"pet-sweep-bench-{prefix}-"))


def epochs_trained(study: Any) -> int:
    return sum(len(t.user_attrs.get("history", [])) for t in study.get_trials(deepcopy=False))


def median(values: list[float]) -> float:
    return statistics.median(values)


def git_rev() -> str:
    """The commit measured; `-dirty` when the working tree differs from it."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def header(title: str) -> str:
    """The first lines of a benchmark's output: what, when, at which commit, on which machine
    (docs/benchmarks.md names all of them for every figure)."""
    return f"# {title}\n# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, commit {git_rev()}, {machine()}"


def wilson_text(errors: int, n: int) -> str:
    """`0.0111 (2/180) [0.0031, 0.0397]`: a rate with its count and Wilson 95 % interval."""
    from pet_sweep.report.stats import wilson

    if n == 0:
        return "n/a (no items)"
    lo, hi = wilson(errors, n)
    return f"{errors / n:.4f} ({errors}/{n}) [{lo:.4f}, {hi:.4f}]"


def replay_best(exp: Any, folder: Path) -> Any:
    """Export the study's best trial and replay it with pet-sweep's own `train`, as a user does
    (`pet-sweep export` then `pet-sweep train best.yaml`): a `replay.ReplayOutcome` whose
    `test_error` is measured on the held-out split no trial saw."""
    from pet_sweep.exported import export_config, write_config
    from pet_sweep.replay import train

    doc, _ = export_config(exp)
    return train(write_config(doc, folder / "best.yaml"), echo=lambda line: None)
