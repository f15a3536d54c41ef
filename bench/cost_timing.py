"""What the end-of-sweep cost timing (`train.timing`) costs for the default experiment, and
what it says with the machine idle against loaded by a busy-loop process.

The keys are those a `digits-transfer` sweep ends with: every architecture of its space at its
image size, batch size and precision on this machine's device. Each repetition runs the two
arms back to back in alternating order: a session on the machine as it is ("as is") and a
session while one busy-loop subprocess runs ("busy loop"). Printed per arm: the session's
seconds (median over repetitions), each key's predict_ms median [95 % interval], and whether
the deeper architecture's interval lies apart from the shallower one's (what "cheaper" needs).

    python -m bench.cost_timing [--reps 3] [--experiment digits-transfer]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from typing import Any

from bench.common import header, median, shipped_experiment

BUSY_LOOP = "while True:\n    pass\n"


def keys_of(name: str) -> tuple[list[Any], int]:
    """The cost keys a sweep of the shipped experiment ends with, and its number of classes."""
    from fastai.torch_core import default_device

    from pet_sweep.report.costs import CostKey, device_type
    from pet_sweep.train.recipe import precision_for

    exp, space, _ = shipped_experiment(name)
    model, data = exp["model"], exp["data"]
    device = default_device()
    archs = space["arch"]["choices"] if isinstance(space["arch"], dict) else [space["arch"]]
    precision = precision_for(model.get("precision", "auto"), device)
    keys = [CostKey(a, int(model["img_size"]), precision, int(model["batch_size"]), device_type(device),
                    bool(model.get("channels_last", False))) for a in archs]
    return keys, len(data.get("classes") or range(10))


def session(keys: list[Any], n_out: int, busy: bool) -> Any:
    from pet_sweep.train.timing import time_keys

    load = subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) if busy else None
    try:
        return time_keys(keys, n_out)
    finally:
        if load is not None:
            load.kill()
            load.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--experiment", default="digits-transfer")
    args = parser.parse_args(argv)
    from pet_sweep.train.timing import ROUNDS

    keys, n_out = keys_of(args.experiment)
    print(header(f"end-of-sweep cost timing: {args.experiment}, {len(keys)} keys, {ROUNDS} rounds, "
                 f"{args.reps} repetitions per arm"))
    arms = {"as is": False, "busy loop": True}
    sessions: dict[str, list[Any]] = {arm: [] for arm in arms}
    for rep in range(args.reps):
        order = list(arms) if rep % 2 == 0 else list(reversed(arms))  # alternate which arm goes first
        for arm in order:
            sessions[arm].append(session(keys, n_out, arms[arm]))
    for arm, done in sessions.items():
        print(f"{arm}: session {median([s.seconds for s in done]):.1f} s (median of {len(done)}; "
              f"{', '.join(f'{s.seconds:.1f}' for s in done)})")
        for s in done:
            cells = [f"{t.key.arch} {t.intervals['predict_ms'].text()} ms" for t in s.timings]
            by_arch = {t.key.arch: t.intervals["predict_ms"] for t in s.timings}
            ordered = sorted(by_arch.values(), key=lambda i: i.median)
            apart = len(ordered) > 1 and ordered[0].below(ordered[-1])
            ratio = ordered[-1].median / ordered[0].median if len(ordered) > 1 else 1.0
            print(f"  {'; '.join(cells)}; dearest/cheapest {ratio:.2f}x, intervals {'apart' if apart else 'overlap'}"
                  f"; GFLOPs/image {', '.join(f'{t.key.arch} {t.gflops:.3f}' for t in s.timings)}")


if __name__ == "__main__":
    main()
