"""Who runs the worker loops of a sweep: the one entry point of `pet-sweep run`.

`run` picks the engine: the sweep loop in this process, `local.supervise`'s worker
processes on this machine (`--workers N`), or Ray tasks on a cluster (`--ray`, or
`launch: {engine: ray}` in experiments.yaml; `RayOptions.resolve` decides which settings
win, `launch.ray.run_on_ray` runs them). Each returns the same `SweepResult`, with why
the sweep stopped. A sweep that ran its course ends with its models' costs timed side by
side in this process (`train.timing`, `time_costs_at_end`).
"""

from __future__ import annotations

from dataclasses import dataclass

from pet_sweep.config import Experiment
from pet_sweep.errors import ConfigError, PetSweepError
from pet_sweep.launch import local
from pet_sweep.launch.local import Echo, nothing_ran, to_stderr
from pet_sweep.progress import Progress
from pet_sweep.sweep.loop import run_sweep
from pet_sweep.sweep.records import SweepResult

HERE = "local"  # `--ray` with no address: a Ray started by this command


@dataclass(frozen=True)
class RayOptions:
    """Where and how the Ray engine runs the workers (`pet-sweep run --ray`)."""

    address: str | None = None  # None: the Ray this process is on, RAY_ADDRESS, or one started here
    cpus_per_worker: float = 1
    gpus_per_worker: float = 0  # a fraction packs several workers on one GPU
    storage_proxy: bool = False  # the workers reach the study through Optuna's gRPC proxy on the driver

    @classmethod
    def resolve(cls, exp: Experiment, address: str | None = None, cpus_per_worker: float | None = None,
                gpus_per_worker: float | None = None, *, gpus: str | None = None,
                storage_proxy: bool = False) -> "RayOptions | None":
        """The Ray settings of this run, None for the local engine: what the command line gave
        (`--ray [ADDRESS]`, `HERE` for no address; None for an option not given) over the
        experiment's `launch:` section. `gpus` (`--gpus`) and `storage_proxy` are refused
        where they do not apply."""
        settings = exp.config.launch
        if address is None and settings.engine == "ray":  # `launch: {engine: ray}` in the file
            address = settings.address or HERE
        if address is None:
            if storage_proxy:
                raise ConfigError("--storage-proxy serves the workers of the Ray engine: "
                                  "add --ray [ADDRESS] (or `launch: {engine: ray}` in the experiments file)")
            return None
        if gpus:
            raise ConfigError("--gpus chooses GPUs for local workers; with Ray use --gpus-per-worker "
                              "(Ray places them)")
        return cls(None if address == HERE else address,
                   settings.cpus_per_worker if cpus_per_worker is None else cpus_per_worker,
                   settings.gpus_per_worker if gpus_per_worker is None else gpus_per_worker, storage_proxy)

    @property
    def shown(self) -> str:
        """The address as `--ray` takes it (`HERE` for a Ray started by this command)."""
        return self.address or HERE


def run(exp: Experiment, *, workers: int = 1, gpus: str | None = None, ray: RayOptions | None = None,
        progress: Progress | None = None, echo: Echo = print, warn: Echo = to_stderr) -> SweepResult:
    """Run (or resume) `exp`'s sweep: `budget.n_trials` more trials, in this process or in `workers`.

    `progress` shows a sweep in this process or on Ray (status line, trial lines; on Ray
    each worker's lines prefixed `wN| `) and is closed at the end; without it the lines go
    to `echo`. Supervised workers print their own lines through `echo` (`gpus`: "0,1", the
    GPUs to share out; default every visible one); `warn` gets a line per worker that
    ended with an error. Ctrl-C or SIGTERM stops the sweep with `stopped_by == "interrupt"`,
    not an exception.
    """
    shown = echo if progress is None else progress.echo
    try:
        if ray is not None:
            from pet_sweep.launch.ray import run_on_ray  # the optional ray package, on demand

            result = run_on_ray(exp, workers, address=ray.address, cpus_per_worker=ray.cpus_per_worker,
                                gpus_per_worker=ray.gpus_per_worker, storage_proxy=ray.storage_proxy,
                                echo=shown, warn=warn, progress=progress)
        elif workers > 1:
            result = local.supervise(exp, workers, local.parse_gpus(gpus), echo=echo, warn=warn)
        elif progress is None:
            result = run_sweep(exp, echo=echo)
        else:
            result = run_sweep(exp, echo=progress.echo, epoch_listeners=(progress.epoch_done,),
                               trial_listeners=(progress,))
        time_costs_at_end(exp, result, shown)
        return result
    except KeyboardInterrupt:  # before the sweep started
        return nothing_ran(exp)
    finally:
        if progress is not None:
            progress.close()


def time_costs_at_end(exp: Experiment, result: SweepResult, echo: Echo) -> None:
    """Time the study's model costs side by side (`train.timing.time_study`) once its trials have
    run: not after Ctrl-C, workers that stopped early, or a sweep with no completed trial."""
    if result.stopped_by in ("interrupt", "workers") or result.best is None:
        return
    from pet_sweep.sweep.storage import open_study  # heavy: optuna
    from pet_sweep.train.timing import time_study  # heavy: torch, fastai

    try:
        time_study(open_study(exp, create=False), exp, echo)
    except KeyboardInterrupt:
        echo("costs        not timed (interrupted): pet-sweep report --time-costs times them")
    except (RuntimeError, OSError, PetSweepError) as err:  # out of memory, a model it cannot build: the trials stand
        echo(f"costs        not timed ({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}): "
             "the report judges by the trials' one-shot timings; pet-sweep report --time-costs tries again")
