"""Many workers, simulated: `python -m bench.scale --simulated N[,N...]`.

N workers of the local supervisor (`launch.local.supervise`) run pet-sweep's real sweep loop
(budget, claims, heartbeats, parent and trial runs in MLflow, the stale-trial handler); only
the training is a stand-in (`bench.simulated.StandIn`: E epochs at `--pace` seconds each).
The stores are real: a PostgreSQL cluster of this benchmark's own (initdb in a temporary
folder, on `--port`, started and removed here) holds the Optuna study and the MLflow server's
backend store; `mlflow server` runs on 127.0.0.1. Two paths: the workers on the database
(`direct`), or through Optuna's gRPC storage proxy in a process of its own (`proxy`).

Per (path, N) it prints: trials finished against the budget (and duplicates, lost trials, MLflow
runs left RUNNING), trials per second, p50/p99 of ask, report and tell, PostgreSQL connections
at peak (pg_stat_activity: the Optuna database; MLflow's apart), MLflow requests per second
and errors, the peak memory (PSS) and CPU of the supervisor, the proxy, the MLflow server and
the workers. `--faults`: kill -9 a tenth of the workers mid-trial, then restart PostgreSQL.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import temp_dir
from bench.simulated import Zygote

PG_BIN = sorted(Path("/usr/lib/postgresql").glob("*/bin"))[-1] if Path("/usr/lib/postgresql").is_dir() else None
MLFLOW = str(Path(sys.executable).with_name("mlflow"))
OPTUNA_DB, MLFLOW_DB = "scale_sim_optuna", "scale_sim_mlflow"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench.scale --simulated: timed out waiting for {what}")
        time.sleep(0.3)


class Postgres:
    """A PostgreSQL cluster of this benchmark's own, in `folder`, on `port` (trust auth, loopback)."""

    def __init__(self, folder: Path, port: int, max_connections: int) -> None:
        if PG_BIN is None:
            raise SystemExit("bench.scale --simulated needs PostgreSQL's initdb and pg_ctl (/usr/lib/postgresql/*/bin)")
        root = folder / "postgres"
        root.mkdir()
        # PostgreSQL refuses to run as root: as the machine's `postgres` user then, in a folder it owns
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            folder.chmod(0o711)
            shutil.chown(root, "postgres")
        self.data, self.port = root / "data", port
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust")
        self.options = f"-p {port} -c listen_addresses=127.0.0.1 -k {root} -c max_connections={max_connections}"
        self._ctl("start", "-w", "-o", self.options, "-l", str(root / "pg.log"))
        for name in (OPTUNA_DB, MLFLOW_DB):
            self.sql("postgres", f"CREATE DATABASE {name}")

    def url(self, db: str) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{db}"

    def _run(self, program: str, *args: str) -> None:
        done = subprocess.run([*self.as_user, str(PG_BIN / program), *args], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{program} {' '.join(args)} failed: {done.stderr.strip()[-2000:]}")

    def _ctl(self, *args: str) -> None:
        self._run("pg_ctl", "-D", str(self.data), *args)

    def sql(self, db: str, statement: str) -> list[tuple[Any, ...]]:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname=db)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(statement)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    def connections(self) -> dict[str, int]:
        rows = self.sql("postgres", "SELECT datname, count(*) FROM pg_stat_activity WHERE datname IN "
                        f"('{OPTUNA_DB}', '{MLFLOW_DB}') GROUP BY datname")
        return {name: n for name, n in rows}

    def restart(self) -> float:
        """Stop (fast: every connection cut) and start again; returns the seconds it was away."""
        started = time.perf_counter()
        self._ctl("restart", "-w", "-m", "fast", "-o", self.options)
        return time.perf_counter() - started

    def stop(self) -> None:
        self._ctl("stop", "-m", "immediate")


class MlflowServer:
    """`mlflow server` on the cluster's MLflow database; its access log counts the requests."""

    def __init__(self, folder: Path, backend: str, workers: int) -> None:
        self.port, self.log = free_port(), folder / "mlflow.log"
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [MLFLOW, "server", "--backend-store-uri", backend, "--artifacts-destination", str(folder / "artifacts"),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(workers)],
            stdout=self.log.open("a"), stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(self._answers, 180, "the mlflow server")

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise SystemExit(f"mlflow server exited:\n{self.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(self.uri + "/health", timeout=2):
                return True
        except OSError:
            return False

    def requests(self) -> tuple[int, int, int]:
        """(requests, 4xx, 5xx) in the access log so far."""
        total = client = server = 0
        for line in self.log.read_text(errors="replace").splitlines():
            if '"' not in line or "HTTP/1." not in line:
                continue
            total += 1
            status = line.rsplit('"', 1)[-1].split()
            code = int(status[0]) if status and status[0].isdigit() else 0
            client += 400 <= code < 500
            server += code >= 500
        return total, client, server

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait()


PROXY = """
import sys
from pet_sweep.launch.storage_proxy import storage_proxy
from pet_sweep.config import Experiment
space = {"arch": "resnet18", "base_lr": 1e-2, "lr_hi": 1e-2, "lr_mult": 10.0, "freeze_epochs": 1, "epochs": 1}
exp = Experiment.from_dict({"sweep": space, "storage": sys.argv[1], "data": {"source": "digits"}}, "proxy")
with storage_proxy(exp, "127.0.0.1") as seen:
    print(seen.storage_url, flush=True)
    sys.stdin.read()
"""


class Proxy:
    """Optuna's gRPC storage proxy (`launch.storage_proxy`) in a process of its own, so its CPU and memory are its own."""

    def __init__(self, storage: str) -> None:
        env = {**os.environ, "PYTHONPATH": f"{Path(__file__).resolve().parents[1]}{os.pathsep}"
                                          f"{os.environ.get('PYTHONPATH', '')}"}
        self.proc = subprocess.Popen([sys.executable, "-c", PROXY, storage], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        self.url = self.proc.stdout.readline().strip()
        if not self.url.startswith("grpc://"):
            raise SystemExit("the storage proxy did not start")

    def stop(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@dataclass
class Peaks:
    """What the sampler saw: peak connections, peak PSS (MB) and CPU seconds per process group."""

    connections: dict[str, int] = field(default_factory=dict)
    pss_mb: dict[str, float] = field(default_factory=dict)
    cpu_s: dict[str, float] = field(default_factory=dict)


class Sampler:
    """Every `every` seconds: pg_stat_activity, and the PSS and CPU time of each group of processes."""

    def __init__(self, pg: Postgres, groups: dict[str, Any], every: float = 1.0) -> None:
        import psutil

        self.psutil, self.pg, self.groups, self.every = psutil, pg, groups, every
        self.peaks = Peaks()
        self.own_cpu_s = 0.0  # this thread's CPU (in the supervisor's process), taken off the supervisor's
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _processes(self, name: str) -> list[Any]:
        found = self.groups[name]()
        return [self.psutil.Process(pid) for pid in found if self.psutil.pid_exists(pid)]

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()
            self.own_cpu_s = time.thread_time()

    def _sample(self) -> None:
        try:
            for db, n in self.pg.connections().items():
                self.peaks.connections[db] = max(self.peaks.connections.get(db, 0), n)
        except Exception:  # PostgreSQL restarting: no sample this time
            pass
        for name in self.groups:
            pss = cpu = 0.0
            for proc in self._processes(name):
                try:
                    pss += proc.memory_full_info().pss
                    times = proc.cpu_times()
                    cpu += times.user + times.system
                except self.psutil.Error:
                    pass
            self.peaks.pss_mb[name] = max(self.peaks.pss_mb.get(name, 0.0), pss / 2**20)
            self.peaks.cpu_s[name] = max(self.peaks.cpu_s.get(name, 0.0), cpu)

    def stop(self) -> Peaks:
        self._stop.set()
        self._thread.join()
        return self.peaks


def tree(pid: int) -> list[int]:
    import psutil

    try:
        root = psutil.Process(pid)
        return [root.pid, *(p.pid for p in root.children(recursive=True))]
    except psutil.Error:
        return []


def parse_counts(text: str) -> list[int]:
    counts = [int(n) for n in text.split(",") if n.strip()]
    if not counts or min(counts) < 1:
        raise SystemExit(f"--simulated must be worker counts like 8,32,128, but got {text!r}")
    return counts


def main(argv: list[str] | None = None) -> None:
    from bench.scale_run import run_case, show  # after the zygote: it imports nothing heavy before forking

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--simulated", required=True, help="worker counts, e.g. 8,32,128")
    parser.add_argument("--trials", type=int, default=1000, help="the budget of each run")
    parser.add_argument("--paths", default="direct,proxy")
    parser.add_argument("--pace", type=float, default=0.2, help="seconds per simulated epoch")
    parser.add_argument("--epochs", type=int, default=5, help="epochs per trial (1 frozen + the rest)")
    parser.add_argument("--faults", action="store_true", help="kill -9 a tenth of the workers, restart PostgreSQL")
    parser.add_argument("--port", type=int, default=55432, help="this benchmark's PostgreSQL cluster")
    parser.add_argument("--max-connections", type=int, default=400)
    parser.add_argument("--mlflow-workers", type=int, default=2)
    args = parser.parse_args(argv)
    counts = parse_counts(args.simulated)
    folder = temp_dir("scale-sim")
    zygote = Zygote(folder, args.pace, valid_items=100)  # first: no thread or connection exists yet
    pg = mlflow = None
    try:
        pg = Postgres(folder, args.port, args.max_connections)
        mlflow = MlflowServer(folder, pg.url(MLFLOW_DB), args.mlflow_workers)
        rows = []
        for n in counts:
            for path in args.paths.split(","):
                rows.append(run_case(args, zygote, pg, mlflow, path, n, folder))
                print(show([rows[-1]], header=len(rows) == 1), flush=True)
        print(show(rows, header=True))
    finally:
        if mlflow is not None:
            mlflow.stop()
        zygote.close()
        if pg is not None:
            pg.stop()
            shutil.rmtree(pg.data, ignore_errors=True)
        print(f"# logs (supervisor, workers, mlflow server) kept in {folder}")
