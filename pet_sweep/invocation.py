"""How the user started pet-sweep, for the commands it suggests next.

`.venv/bin/pet-sweep run` works without the environment activated, but a `next` line that
says `pet-sweep report ...` would then fail as pasted: every suggested command starts the
way this one was started (`command`)."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

NAME = "pet-sweep"


def program(argv0: str | None = None) -> str:
    """`pet-sweep` where that name finds this program; otherwise the path it was started by
    (`.venv/bin/pet-sweep`), or `python -m pet_sweep` with the interpreter that runs it."""
    argv0 = sys.argv[0] if argv0 is None and sys.argv else argv0 or ""
    path = Path(argv0)
    if path.name in (NAME, f"{NAME}.exe"):
        if path.name == argv0 or _same(shutil.which(NAME), argv0):
            return NAME  # found on PATH (an active environment, an installed tool)
        return shlex.quote(argv0)
    if path.name == "__main__.py" and path.parent.name == "pet_sweep":  # python -m pet_sweep
        python = "python" if _same(shutil.which("python"), sys.executable) else shlex.quote(sys.executable)
        return f"{python} -m pet_sweep"
    return NAME  # a test runner, a notebook: the documented name


def command(*words: str) -> str:
    """A pet-sweep command line to print, started as this process was: ``command("report", "digits")``."""
    return " ".join([program(), *words])


def _same(found: str | None, path: str) -> bool:
    """Whether two paths name one file, symlinks not followed (a venv's python links to the system's)."""
    return found is not None and os.path.abspath(found) == os.path.abspath(path)
