"""Shared helpers for the benchmark scripts: temporary experiments, sweeps run in-process, medians."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import tempfile
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
    gpu = ""
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f", GPU {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return f"{os.cpu_count()} cores ({cpu}){gpu}, Python {platform.python_version()}"


def write_experiment(folder: Path, experiment: dict[str, Any], space: dict[str, Any], name: str = "bench") -> Path:
    """An experiments.yaml with one experiment whose stores live in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "space.yaml").write_text(yaml.safe_dump(space))
    doc = {"default": name, "experiments": {name: {
        "sweep": "space.yaml", "storage": "sqlite:///optuna.db",
        "tracking": {"uri": "sqlite:///mlflow.db"}, **experiment}}}
    path = folder / "experiments.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def digits_space() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "sweeps" / "digits.yaml").read_text())


def default_digits() -> dict[str, Any]:
    """The shipped `digits` experiment, minus its stores and sweep file."""
    exp = yaml.safe_load((ROOT / "experiments.yaml").read_text())["experiments"]["digits"]
    return {k: v for k, v in exp.items() if k not in ("sweep", "storage", "tracking")}


def temp_dir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"pet-sweep-bench-{prefix}-"))


def epochs_trained(study: Any) -> int:
    return sum(len(t.user_attrs.get("history", [])) for t in study.get_trials(deepcopy=False))


def median(values: list[float]) -> float:
    return statistics.median(values)


def git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
