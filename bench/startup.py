"""Start-up: wall time of `pet-sweep --help` (no heavy imports at CLI import time).

    python bench/startup.py [--runs 7]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from bench.common import machine, median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    command = Path(sys.executable).parent / "pet-sweep"
    times = []
    for _ in range(args.runs):
        started = time.perf_counter()
        subprocess.run([str(command), "--help"], check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    print(f"# start-up, {machine()}")
    print(f"pet-sweep --help: median {median(times):.3f}s over {args.runs} runs "
          f"(min {min(times):.3f}, max {max(times):.3f}; target <= 0.5 s)")


if __name__ == "__main__":
    main()
