"""pet-sweep: Optuna sweeps of fastai fine-tunes (fastbook chapter 5), every trial logged to MLflow.

The public API (`pet_sweep.api`): `Experiment.from_dict` / `Experiment.from_yaml`, `run`,
`report`, `export`. Everything else is internal. Light to import (the heavy libraries load
on the first call), so `import pet_sweep` and `pet-sweep --help` stay instant.
"""

from __future__ import annotations

__version__ = "0.1.0"

import os

# MLflow's telemetry, off unless the user set MLFLOW_DISABLE_TELEMETRY: on a machine that cannot
# reach MLflow's servers (an offline GPU node, CI) its start-up thread gives up and removes an
# environment variable while a request of the sweep reads os.environ, and that write fails with
# KeyError('_MLFLOW_TELEMETRY_SESSION_ID') (seen in bench.scale at 128 workers). Set before any
# pet-sweep module imports mlflow, which starts that thread at import.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import pet_sweep.report  # noqa: E402, F401  a callable package: pet_sweep.report(exp) (see report/__init__.py)
from pet_sweep.api import export, run  # noqa: E402
from pet_sweep.config import Experiment  # noqa: E402

__all__ = ["Experiment", "run", "report", "export"]
