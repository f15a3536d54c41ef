"""The one error family of pet-sweep.

The CLI turns any `PetSweepError` into a one-line message and exit code 2;
everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence


class PetSweepError(Exception):
    """Root of every error pet-sweep raises on purpose."""


class ConfigError(PetSweepError):
    """A config file, experiment or search space is invalid.

    The message names the file, the experiment and the dotted key path.
    """

    def __init__(self, message: str, *, file: str | None = None,
                 experiment: str | None = None, key: str | None = None) -> None:
        self.reason, self.file, self.experiment, self.key = message, file, experiment, key
        where = []
        if file:
            where.append(str(file))
        if experiment:
            where.append(f"experiment '{experiment}'")
        if key:
            where.append(f"key '{key}'")
        super().__init__(f"{': '.join(where)}: {message}" if where else message)


class DataError(PetSweepError):
    """A data set cannot be found or read."""


class StudyError(PetSweepError):
    """A study or its tracking store is missing or unusable."""


class TrainingDiverged(PetSweepError):
    """The training loss became NaN or infinite."""


class TrialFailed(PetSweepError):
    """A trial failed for a reason that should not stop the sweep (out of memory, ...)."""


class LRFindError(PetSweepError):
    """The learning-rate finder gave no usable suggestion (the loss diverged at once, or NaN)."""


def validation_reason(error: Mapping[str, Any], valid_keys: Sequence[str] = (), missing: str | None = None) -> str:
    """One of pydantic's errors (an item of ``ValidationError.errors()``) in pet-sweep's words;
    the caller names the file and the key. `missing`: what to say of a missing key."""
    if error["type"] == "extra_forbidden":
        return f"unknown key {error['loc'][-1]!r}" + (f"; valid keys: {', '.join(valid_keys)}" if valid_keys else "")
    if error["type"] == "missing":
        return missing or "required key is missing"
    if error["type"] == "value_error":  # a validator's own message, which names the values
        return str(error["ctx"]["error"])
    return f"{error['msg']}, but got {error.get('input')!r}"


class TrackingAway(StudyError):
    """The MLflow tracking server stayed unreachable past `tracking.max_outage`: the sweep stops."""


class Preempted(KeyboardInterrupt):
    """SIGTERM (a spot machine reclaimed, a scheduler): stop like Ctrl-C, but leave the trial to be
    resumed from its checkpoint (`sweep.resume`). A KeyboardInterrupt, so every stop path stays one."""
