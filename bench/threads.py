"""Threads per worker: one fixed sweep alone and beside another CPU-bound process, with torch's
default threads against 1 thread per worker and against `OMP_WAIT_POLICY=PASSIVE`, 1 and 2 workers.

    python -m bench.threads [--repeats 3] [--trials 2] [--limit 600] [--img-size 32]

Each run is a fresh `pet-sweep run` on fresh stores of the same fixed trials (one configuration,
`--trials` times): with 2 workers each runs half of them. The thread settings reach the workers as
a user sets them, in the environment (`launch.local.worker_threads`: the user's OMP_NUM_THREADS wins):
- `default`: OMP_NUM_THREADS = the machine's cores in every worker (what torch picks by itself);
- `1 thread`: OMP_NUM_THREADS=1 in every worker;
- `passive`: as `default`, with OMP_WAIT_POLICY=PASSIVE (OpenMP threads sleep instead of spinning
  while they wait for each other).
"Beside" runs start another CPU-bound process first: a numpy matmul loop with its BLAS's default
threads (all the cores), stopped when the run ends. Runs are interleaved (every setting once per
round, alone and beside alternating) and medians of the rounds are printed:
- sweep s: the first trial's start to the last trial's end (Optuna's times), start-up left out;
- wall s: the whole command; CPU s: its user + system time, workers included (os.wait4);
- vs default: the `default` setting's sweep seconds in the same group over this setting's;
- load: the 1-minute load average when the run started (others' jobs on a shared machine show here).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import ROOT, header, median, temp_dir
from bench.scale import experiment  # the same fixed trials as bench.scale

MATMUL_LOOP = "import numpy as np\na = np.random.rand(512, 512)\nwhile True:\n    a @ a\n"
CORES = os.cpu_count() or 1
MODES = {"default": {"OMP_NUM_THREADS": str(CORES), "MKL_NUM_THREADS": str(CORES)},
         "1 thread": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
         "passive": {"OMP_NUM_THREADS": str(CORES), "MKL_NUM_THREADS": str(CORES), "OMP_WAIT_POLICY": "PASSIVE"}}
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")


def sweep_seconds(config: Path) -> float:
    """From the first trial's start to the last trial's end, as the study recorded them."""
    import optuna  # heavy: only after the run

    trials = optuna.load_study(study_name="bench", storage=f"sqlite:///{config.parent / 'optuna.db'}").get_trials()
    return (max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)).total_seconds()


def timed_run(mode: str, workers: int, args: argparse.Namespace) -> dict[str, float]:
    """One fresh `pet-sweep run` in `mode`: its sweep, wall and CPU seconds and the load average."""
    config = experiment(temp_dir(f"threads-{workers}"), args.trials, args.limit, args.img_size)
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    env.update(MODES[mode], PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cmd = [sys.executable, "-m", "pet_sweep", "run", "--config", str(config), "--quiet",
           *(["--workers", str(workers)] if workers > 1 else [])]
    load = os.getloadavg()[0]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} with {workers} worker(s) failed ({proc.returncode}):\n{out}")
    return {"sweep": sweep_seconds(config), "wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "load": load}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--limit", type=int, default=600, help="digits images (of 1797)")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--workers", default="1,2")
    args = parser.parse_args(argv)
    counts = [int(w) for w in args.workers.split(",")]
    print(header(f"bench.threads: {args.trials} trials, workers {counts}, {args.repeats} interleaved rounds"),
          flush=True)
    runs: dict[tuple[str, int, str], list[dict[str, float]]] = {}
    for round_ in range(args.repeats):
        for other in ("alone", "beside") if round_ % 2 == 0 else ("beside", "alone"):
            busy = subprocess.Popen([sys.executable, "-c", MATMUL_LOOP]) if other == "beside" else None
            try:
                for workers in counts:
                    for mode in MODES:
                        run = timed_run(mode, workers, args)
                        runs.setdefault((other, workers, mode), []).append(run)
                        print(f"# round {round_ + 1} {other} x{workers} {mode}: sweep {run['sweep']:.1f} s, "
                              f"wall {run['wall']:.1f} s, CPU {run['cpu']:.1f} s, load {run['load']:.1f}", flush=True)
            finally:
                if busy is not None:
                    busy.terminate()
                    busy.wait()
    print(f"{'other':<8}{'workers':>8}  {'threads':<10}{'sweep s':>9}{'wall s':>8}{'CPU s':>8}{'vs default':>12}"
          f"{'load':>6}")
    for (other, workers, mode), measured in runs.items():
        med = {key: median([m[key] for m in measured]) for key in measured[0]}
        base = median([m["sweep"] for m in runs[other, workers, "default"]])
        print(f"{other:<8}{workers:>8}  {mode:<10}{med['sweep']:>9.1f}{med['wall']:>8.1f}{med['cpu']:>8.1f}"
              f"{base / med['sweep']:>11.2f}x{med['load']:>6.1f}")


if __name__ == "__main__":
    main()
