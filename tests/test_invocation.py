"""The commands pet-sweep suggests start the way the user started it (`invocation.command`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from pet_sweep.invocation import command, program


def _script(folder: Path) -> Path:
    folder.mkdir(parents=True)
    script = folder / "pet-sweep"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    return script


def test_a_script_not_on_path_is_suggested_by_the_path_it_was_run_by(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = _script(tmp_path / ".venv" / "bin")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "elsewhere"))
    monkeypatch.setattr(sys, "argv", [".venv/bin/pet-sweep", "run"])
    assert command("report", "digits") == ".venv/bin/pet-sweep report digits"
    # the environment activated: the name finds the same file
    monkeypatch.setenv("PATH", str(script.parent))
    assert command("report", "digits") == "pet-sweep report digits"
    monkeypatch.setattr(sys, "argv", ["pet-sweep", "run"])  # started by its name
    assert program() == "pet-sweep"
    monkeypatch.setattr(sys, "argv", [str(tmp_path / "my tools" / "pet-sweep")])
    assert program() == f"'{tmp_path / 'my tools' / 'pet-sweep'}'"  # quoted to paste


def test_python_m_pet_sweep_is_suggested_with_its_interpreter(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    import pet_sweep.__main__ as main

    monkeypatch.setattr(sys, "argv", [main.__file__, "run"])
    monkeypatch.setenv("PATH", str(tmp_path))  # no `python` there
    assert command("ui") == f"{sys.executable} -m pet_sweep ui"
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable))
    assert command("ui") == ("python -m pet_sweep ui" if Path(sys.executable).name == "python"
                             else f"{sys.executable} -m pet_sweep ui")
