"""Who runs the worker loops of a sweep: the one entry point of `pet-sweep run`.

`run` picks the engine: the sweep loop in this process, `local.supervise`'s worker
processes on this machine (`--workers N`), or Ray tasks on a cluster (`--ray`,
`launch.ray.run_on_ray`). Each returns the same `SweepResult`, with why the sweep stopped.
"""

from __future__ import annotations

from dataclasses import dataclass

from pet_sweep.config import Experiment
from pet_sweep.launch import local
from pet_sweep.launch.local import Echo, nothing_ran, to_stderr
from pet_sweep.progress import Progress
from pet_sweep.sweep.loop import run_sweep
from pet_sweep.sweep.records import SweepResult


@dataclass(frozen=True)
class RayOptions:
    """Where and how the Ray engine runs the workers (`pet-sweep run --ray`)."""

    address: str | None = None  # None: the Ray this process is on, RAY_ADDRESS, or one started here
    cpus_per_worker: float = 1
    gpus_per_worker: float = 0  # a fraction packs several workers on one GPU


def run(exp: Experiment, *, workers: int = 1, gpus: str | None = None, ray: RayOptions | None = None,
        progress: Progress | None = None, echo: Echo = print, warn: Echo = to_stderr) -> SweepResult:
    """Run (or resume) `exp`'s sweep: `budget.n_trials` more trials, in this process or in `workers`.

    `progress` shows a sweep in this process (status line, trial lines) and is closed at
    the end; without it the lines go to `echo`. Supervised workers print their own
    lines through `echo` (`gpus`: "0,1", the GPUs to share out; default every visible
    one); `warn` gets a line per worker that ended with an error. With `ray`, the
    `workers` run as Ray tasks and print through `echo` too. Ctrl-C or SIGTERM
    stops the sweep with `stopped_by == "interrupt"`, not an exception.
    """
    try:
        if ray is not None:
            from pet_sweep.launch.ray import run_on_ray  # the optional ray package, on demand

            return run_on_ray(exp, workers, address=ray.address, cpus_per_worker=ray.cpus_per_worker,
                              gpus_per_worker=ray.gpus_per_worker, echo=echo)
        if workers > 1:
            return local.supervise(exp, workers, local.parse_gpus(gpus), echo=echo, warn=warn)
        if progress is None:
            return run_sweep(exp, echo=echo)
        return run_sweep(exp, echo=progress.echo, epoch_listeners=(progress.epoch_done,), trial_listeners=(progress,))
    except KeyboardInterrupt:  # before the sweep started
        return nothing_ran(exp)
    finally:
        if progress is not None:
            progress.close()
