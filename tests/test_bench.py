"""The GPU benchmark script, run end to end on the CPU with tiny sizes.

No session that wrote it had a GPU, so this is what makes sure it runs the first
time one is there: every precision and memory format, and the busy-share trial
through pet-sweep's own DataLoaders and recipe. Its figures mean nothing here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest


def test_gpu_precision_script_runs_on_the_cpu(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import gpu_precision

    monkeypatch.setattr(gpu_precision, "temp_dir", lambda prefix: tmp_path / prefix)

    gpu_precision.main(["--device", "cpu", "--archs", "resnet18", "--batch-sizes", "2", "--steps", "1",
                        "--size", "32", "--trial-batch", "8"])
    out = capsys.readouterr().out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("resnet18 | ")]
    assert [row[:3] for row in rows] == [["resnet18", "2", "False"], ["resnet18", "2", "True"]]
    for row in rows:  # images/s for fp32, fp16, bf16 and both ratios, all measured
        assert all(float(cell) > 0 for cell in row[3:])
    assert re.search(r"resnet18: median fp16/fp32 speed-up \d+\.\d\dx", out)
    trial = re.search(r"resnet18 fp16 trial on digits at 32 px \(2 epochs, (\d+)s\): GPU busy (\S+)%", out)
    assert trial, out
    assert trial.group(2) == "nan"  # no GPU counter on a CPU: said as unknown, not as 0 %


def test_gpu_precision_script_without_cuda_measures_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from bench import gpu_precision

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here: the script would measure it")
    gpu_precision.main([])
    assert capsys.readouterr().out.strip() == "no CUDA GPU here: nothing to measure"


def test_rates_keep_significant_digits_on_a_slow_machine() -> None:
    from bench.gpu_precision import significant

    # a busy 2-core CPU measured 0.4 images/s: printed as "0" it read as nothing measured
    assert [significant(v) for v in (0.4, 0.004123, 1.0, 12.345, 1234.4)] == ["0.4", "0.00412", "1", "12.3", "1234"]
