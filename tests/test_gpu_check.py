"""bench.gpu_check, end to end on the CPU with tiny sizes: every step a GPU machine will run
(the GPU tests, the three precisions with busy sampling, the generated JPEG folder, the
2-worker pets-shaped sweep, the pipeline's images/s) and the summary it writes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest


@pytest.mark.slow  # two worker processes and a pytest child: minutes on a loaded 2-core machine
@pytest.mark.train
def test_gpu_check_runs_every_step_on_the_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import gpu_check

    monkeypatch.setattr(gpu_check, "temp_dir", lambda prefix: tmp_path / prefix)
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n")
    gpu_check.main(["--device", "cpu", "--arch", "resnet18", "--size", "32", "--item-size", "40", "--batch", "8",
                    "--steps", "1", "--classes", "2", "--per-class", "12", "--jpeg-size", "50", "40",
                    "--loader-workers", "0", "--tests", "tests/test_recipe.py", "--doc", str(doc)])
    out = capsys.readouterr().out
    assert re.search(r"pytest -m gpu: exit 0: .*2 skipped", out), out  # collected, skipped without CUDA
    for precision in ("fp32", "fp16", "bf16"):
        assert re.search(rf"resnet18 {precision}: \d+\.\d images/s, GPU busy nan%", out)
    assert len(list((tmp_path / "gpu-check" / "images").glob("breed*_*.jpg"))) == 24
    assert re.search(r"input pipeline: \d+\.\d images/s", out)
    assert re.search(r"sweep: exit 0 in \d+s", out), out
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n") and text.count("## GPU check (bench.gpu_check)") == 1
    assert "| fp16 |" in text and "--workers 2" in text


def test_gpu_check_without_cuda_checks_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from bench import gpu_check

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here: the script would check it")
    gpu_check.main([])
    assert capsys.readouterr().out.startswith("no CUDA GPU here")
