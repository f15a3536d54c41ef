"""Sweeps on a Ray cluster: two nodes on this machine (`ray.cluster_utils.Cluster`, one CPU
each) sharing a study on the loopback PostgreSQL.

Skips, saying why, without ray (`pip install -e '.[ray]'`) or without a PostgreSQL server.
"""

from __future__ import annotations

import os
import signal
import threading
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest
from optuna.trial import TrialState

from tests._sweeps import FAST_FAULTS, assert_nothing_running, load, mlflow_runs, running_trial_with_epoch, wait_for
from tests.test_databases import server_url, with_password

ray = pytest.importorskip("ray", reason="ray is not installed: pip install -e '.[ray]'")

SECRET = "s3cret-ray"
# a checkpoint after every epoch, however short: a killed trial's retry goes on from it
EVERY_EPOCH = {**FAST_FAULTS, "checkpoint_min_seconds": 0, "checkpoint_max_share": 1}


def test_without_ray_the_engine_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from pet_sweep.errors import ConfigError
    from pet_sweep.launch.ray import import_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` finds where it is not installed
    with pytest.raises(ConfigError, match=r"pip install 'pet-sweep\[ray\]'"):
        import_ray()


@pytest.mark.parametrize("args, message", [((0, 1, 0), "--workers must be >= 1, but got 0"),
                                           ((2, 0, 0), "cpus_per_worker must be > 0, but got 0"),
                                           ((2, 1, 1.5), "gpus_per_worker must be a fraction of one GPU or a whole")])
def test_resources_are_checked(args: tuple[int, float, float], message: str) -> None:
    from pet_sweep.errors import ConfigError
    from pet_sweep.launch.ray import check_resources

    with pytest.raises(ConfigError, match=message):
        check_resources(*args)
    check_resources(4, 0.5, 0.25)  # fractions pack small workers on one core or card


def test_the_claim_lock_is_a_lease_a_killed_holder_loses() -> None:
    import asyncio

    from pet_sweep.launch.ray_worker import Coordinator

    async def scenario() -> list[bool]:
        lock = Coordinator(lease_s=0.3)
        await lock.acquire("a")
        seen = [lock._take("b")]                      # held: the other worker waits
        seen.append(await lock.renew("a"))            # the holder renews while it holds it
        await lock.release("b")                       # someone else's release changes nothing
        seen.append(lock._take("b"))
        await asyncio.sleep(0.4)                      # "a" was killed: no renewal for a lease
        seen.append(lock._take("b"))
        seen.append(await lock.renew("a"))            # too late: "b" holds it now
        await lock.release("b")
        await asyncio.wait_for(lock.acquire("c"), 1)  # free again
        return seen

    assert asyncio.run(scenario()) == [False, True, False, True, False]


def test_the_claim_lock_travels_unheld() -> None:
    import pickle

    from pet_sweep.launch.ray_worker import RayClaimLock
    from pet_sweep.sweep.budget import WorkerRole

    lock = RayClaimLock("coordinator handle")
    lock._token = "held here"
    role = WorkerRole(claim_lock=lock)
    copy = pickle.loads(pickle.dumps(role))
    assert copy.claim_lock._token is None and copy.claim_lock.coordinator == "coordinator handle"
    assert copy == role and WorkerRole.decode(role.encode()).claim_lock is None  # --worker uses the lock file


@pytest.fixture(scope="module")
def cluster() -> Any:
    """Two Ray nodes with one CPU each, this process their driver; shut down whatever happens."""
    from ray.cluster_utils import Cluster

    nodes = Cluster(initialize_head=True, connect=False,
                    head_node_args={"num_cpus": 1, "include_dashboard": True, "dashboard_port": 0})
    try:
        nodes.add_node(num_cpus=1)
        nodes.wait_for_nodes()
        ray.init(address=nodes.address, log_to_driver=False)
        yield nodes
    finally:
        ray.shutdown()
        nodes.shutdown()


class ArgvWatch:
    """Samples every process's command line (Ray's daemons and workers included) until stopped."""

    def __init__(self) -> None:
        import psutil

        self.psutil, self.seen, self._stop = psutil, {}, threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            for proc in self.psutil.process_iter(["cmdline"]):
                self.seen[proc.pid] = " ".join(proc.info["cmdline"] or [])

    def stop(self) -> dict[int, str]:
        self._stop.set()
        self._thread.join()
        return self.seen


def ray_state_text() -> str:
    """What Ray's dashboard and state API show of tasks, actors and jobs, in detail."""
    from ray.util.state import list_actors, list_jobs, list_tasks

    return repr(list_tasks(detail=True, limit=10_000)) + repr(list_actors(detail=True)) + repr(list_jobs())


def experiment(write_experiments: Callable[..., Path], n_trials: int,
               faults: dict[str, Any] = FAST_FAULTS) -> tuple[Any, str, str]:
    from pet_sweep.config import load_experiment

    storage = with_password(server_url("postgres"), SECRET)
    name = f"r{uuid.uuid4().hex[:10]}"  # the server keeps other tests' studies
    config = write_experiments(study_name=name, storage=storage, budget={"n_trials": n_trials}, faults=faults)
    return load_experiment(config), storage, name


def check_the_stores(exp: Any, storage: str, name: str, n_trials: int) -> list[Any]:
    """n_trials COMPLETE (retries aside), every one with its node; one parent run, a child per trial."""
    from pet_sweep.launch.ray_worker import HOSTNAME_ATTR, NODE_ID_ATTR
    from pet_sweep.sweep.budget import is_retry

    trials = load(storage, name).get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == n_trials and len([t for t in trials if not is_retry(t)]) == n_trials, trials
    assert all(t.user_attrs.get(NODE_ID_ATTR) and t.user_attrs.get(HOSTNAME_ATTR) for t in trials)
    runs = [r for r in mlflow_runs(exp.tracking_uri, exp.tracking_experiment) if r.data.tags.get("pet_sweep.study") == name]
    parents = [r for r in runs if r.data.tags["pet_sweep.role"] == "sweep"]
    children = [r for r in runs if r.data.tags["pet_sweep.role"] == "trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED", parents
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert len(children) == len(trials), (children, trials)
    assert all(r.data.tags.get("ray.node_id") for r in children)
    assert_nothing_running(storage, name, exp.tracking_uri, exp.tracking_experiment)
    return trials


@pytest.mark.postgres
@pytest.mark.slow
def test_four_trials_on_two_nodes(cluster: Any, write_experiments: Callable[..., Path]) -> None:
    """Through the command line, as a user runs it: `pet-sweep run --workers 2 --ray ADDRESS`."""
    from click.testing import CliRunner

    from pet_sweep.cli import cli
    from pet_sweep.launch.ray_worker import NODE_ID_ATTR

    exp, storage, name = experiment(write_experiments, 4)
    watch = ArgvWatch()
    try:
        done = CliRunner().invoke(cli, ["run", "--config", str(exp.config_path), "--workers", "2",
                                        "--ray", cluster.address], catch_exceptions=False)
    finally:
        seen = watch.stop()
    assert done.exit_code == 0, done.output
    lines = done.output.splitlines()
    assert f"(+4 trials, 2 workers on Ray {cluster.address})" in done.output
    assert any(line.startswith("best         trial") for line in lines), done.output
    assert not any(line.startswith("budget ") for line in lines) and "resume" not in done.output  # all ran
    trials = check_the_stores(exp, storage, name, 4)
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert {t.user_attrs[NODE_ID_ATTR] for t in trials} == nodes, "both nodes should have run trials"
    assert {line.split("|")[0] for line in lines if "COMPLETE" in line} == {"w0", "w1"}, lines
    assert [] == [line for line in lines if SECRET in line]
    assert SECRET not in ray_state_text()
    assert [] == [pid for pid, argv in seen.items() if SECRET in argv]


def test_run_with_ray_but_without_it_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch,
                                                           write_experiments: Callable[..., Path]) -> None:
    import sys

    from click.testing import CliRunner

    from pet_sweep.cli import cli

    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` finds where it is not installed
    done = CliRunner().invoke(cli, ["run", "--config", str(write_experiments()), "--workers", "2", "--ray"])
    assert done.exit_code == 2 and "pip install 'pet-sweep[ray]'" in done.output, done.output
    # `launch: {engine: ray}` in the experiments file asks for Ray as `--ray` does
    config = write_experiments(launch={"engine": "ray", "address": "auto"})
    done = CliRunner().invoke(cli, ["run", "--config", str(config), "--workers", "2"])
    assert done.exit_code == 2 and "pip install 'pet-sweep[ray]'" in done.output, done.output
    assert "2 workers on Ray auto" in done.output


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.parametrize("proxy", [False, True], ids=["database", "storage-proxy"])
def test_a_killed_worker_is_restarted_and_its_trial_retried(cluster: Any, write_experiments: Callable[..., Path],
                                                            proxy: bool) -> None:
    """On the database Optuna's heartbeats fail the dead worker's trial; through the storage
    proxy (no heartbeats) the worker's task that Ray started again fails it. Either way the retry,
    in another worker process, goes on from the checkpoint the dead one wrote after its first epoch."""
    from pet_sweep.launch.ray import run_on_ray
    from pet_sweep.sweep.resume import CHECKPOINT_EPOCHS_ATTR, RESUMED_ATTR

    exp, storage, name = experiment(write_experiments, 3, faults=EVERY_EPOCH)
    lines: list[str] = []
    done: dict[str, Any] = {}
    driver = threading.Thread(target=lambda: done.update(result=run_on_ray(exp, 2, storage_proxy=proxy,
                                                                           echo=lines.append)))
    driver.start()
    try:
        def checkpointed() -> Any:  # a RUNNING trial whose first epoch (of 2) is in its checkpoint
            trial = running_trial_with_epoch(storage, name)
            return trial if trial is not None and trial.user_attrs.get(CHECKPOINT_EPOCHS_ATTR) == 1 else None

        victim = wait_for(checkpointed, 300, "a trial's checkpoint after its first epoch")
        os.kill(int(victim.user_attrs["worker"].rpartition(":")[2]), signal.SIGKILL)
    finally:
        driver.join(timeout=600)
    result = done["result"]
    assert (result.ran, result.stopped_by, result.left) == (3, "budget", 0), lines
    trials = check_the_stores(exp, storage, name, 3)
    assert [t.state for t in trials if t.number == victim.number] == [TrialState.FAIL]
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert [t.state for t in retries] == [TrialState.COMPLETE], lines
    retry, victim = retries[0], next(t for t in trials if t.number == victim.number)
    # a worker that is not the dead one read the checkpoint from storage and trained only the second epoch
    assert retry.user_attrs["worker"] != victim.user_attrs["worker"]
    assert retry.user_attrs[RESUMED_ATTR] == {"trial": victim.number, "epoch": 0}
    assert [r["epoch"] for r in retry.user_attrs["history"]] == [0, 1]
    assert retry.user_attrs["history"][0] == victim.user_attrs["history"][0]  # the dead trial's record, not retrained
    from ray.util.state import list_tasks

    # Ray started the killed worker's task again (its second attempt)
    attempts = [t.attempt_number for t in list_tasks(detail=True, limit=10_000) if t.name.startswith("pet-sweep-w")
                and t.job_id == ray.get_runtime_context().get_job_id()]
    assert max(attempts) >= 1, attempts
    assert SECRET not in ray_state_text()


DRIVER = """
import sys
from pet_sweep.config import load_experiment
from pet_sweep.launch.ray import run_on_ray
result = run_on_ray(load_experiment(sys.argv[1]), 2, address=sys.argv[2], echo=lambda line: print(line, flush=True))
print("result", result.ran, result.finished, result.stopped_by, result.left, flush=True)
"""


@pytest.mark.postgres
@pytest.mark.slow
def test_ctrl_c_on_the_driver_stops_every_worker_cleanly(cluster: Any, write_experiments: Callable[..., Path]) -> None:
    import subprocess
    import sys

    from tests._sweeps import PROJECT

    exp, storage, name = experiment(write_experiments, 3)
    env = {**os.environ, "PYTHONPATH": f"{PROJECT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    # as from a terminal: SIGINT handled even where this suite runs in the background (which ignores it)
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(exp.config_path), cluster.address], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_for(lambda: running_trial_with_epoch(storage, name), 300, "a trial's first epoch", driver)
        driver.send_signal(signal.SIGINT)
        out, _ = driver.communicate(timeout=300)
    finally:
        driver.kill()
    assert driver.returncode == 0, out
    ran, finished, stopped_by, left = next(line for line in out.splitlines() if line.startswith("result ")).split()[1:]
    assert stopped_by == "interrupt" and int(finished) < 3 and int(left) > 0, out
    trials = load(storage, name).get_trials()
    # the trial that had run an epoch: Ctrl-C failed it, as interrupted (its slot is given back to the resume)
    assert "interrupted" in {t.user_attrs.get("reason") for t in trials if t.state == TrialState.FAIL}, out
    assert_nothing_running(storage, name, exp.tracking_uri, exp.tracking_experiment)
    parent = [r for r in mlflow_runs(exp.tracking_uri, exp.tracking_experiment)
              if r.data.tags.get("pet_sweep.study") == name and r.data.tags["pet_sweep.role"] == "sweep"]
    assert [r.info.status for r in parent] == ["KILLED"]
    assert SECRET not in out


@pytest.mark.postgres
@pytest.mark.slow
def test_a_removed_node_is_replaced_by_the_other(cluster: Any, write_experiments: Callable[..., Path]) -> None:
    from pet_sweep.launch.ray import run_on_ray
    from pet_sweep.launch.ray_worker import NODE_ID_ATTR
    from pet_sweep.sweep.resume import CHECKPOINT_EPOCHS_ATTR, RESUMED_ATTR

    exp, storage, name = experiment(write_experiments, 3, faults=EVERY_EPOCH)
    node = next(iter(cluster.worker_nodes))

    def training_there() -> Any:  # a trial on that node with its first epoch (of 2) in its checkpoint
        trials = load(storage, name).get_trials(states=(TrialState.RUNNING,))
        return next((t for t in trials if t.user_attrs.get(CHECKPOINT_EPOCHS_ATTR) == 1
                     and t.user_attrs.get(NODE_ID_ATTR) == node.node_id), None)

    lines: list[str] = []
    done: dict[str, Any] = {}
    driver = threading.Thread(target=lambda: done.update(result=run_on_ray(exp, 2, echo=lines.append)))
    driver.start()
    try:
        wait_for(lambda: load_or_none(storage, name) and training_there(), 300, "a trial's checkpoint on the node")
        victim = training_there()
        cluster.remove_node(node, allow_graceful=False)
    finally:
        driver.join(timeout=600)
        cluster.add_node(num_cpus=1)  # the next test finds two nodes again
    result = done["result"]
    assert (result.ran, result.stopped_by, result.left) == (3, "budget", 0), lines
    trials = check_the_stores(exp, storage, name, 3)
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert [t.state for t in retries] == [TrialState.COMPLETE], lines
    retry, victim = retries[0], next(t for t in trials if t.number == victim.number)
    assert retry.user_attrs[NODE_ID_ATTR] != node.node_id  # the node is gone: the other one ran it ...
    # ... from the checkpoint the removed node wrote: only the second epoch trained again
    assert retry.user_attrs[RESUMED_ATTR] == {"trial": victim.number, "epoch": 0}
    assert [r["epoch"] for r in retry.user_attrs["history"]] == [0, 1]
    assert retry.user_attrs["history"][0] == victim.user_attrs["history"][0]


def load_or_none(storage: str, name: str) -> Any:
    """The study once the driver has created it."""
    try:
        return load(storage, name)
    except KeyError:
        return None


def test_the_launch_settings_come_from_the_command_line_over_the_file(write_experiments: Callable[..., Path]) -> None:
    from pet_sweep.config import load_experiment
    from pet_sweep.errors import ConfigError
    from pet_sweep.launch import HERE, RayOptions

    local = load_experiment(write_experiments())
    assert RayOptions.resolve(local) is None
    assert RayOptions.resolve(local, HERE) == RayOptions(None, 1, 0)
    assert RayOptions.resolve(local, "auto", 2, 0.5, storage_proxy=True) == RayOptions("auto", 2, 0.5, True)
    on_ray = load_experiment(write_experiments(launch={"engine": "ray", "address": "auto", "cpus_per_worker": 4,
                                                       "gpus_per_worker": 1}))
    assert RayOptions.resolve(on_ray) == RayOptions("auto", 4, 1)
    assert RayOptions.resolve(on_ray, "ray://head:10001", None, 0.25) == RayOptions("ray://head:10001", 4, 0.25)
    assert RayOptions.resolve(on_ray).shown == "auto" and RayOptions.resolve(local, HERE).shown == HERE
    with pytest.raises(ConfigError, match="--gpus chooses GPUs for local workers"):
        RayOptions.resolve(on_ray, gpus="0,1")
    with pytest.raises(ConfigError, match="--storage-proxy serves the workers of the Ray engine"):
        RayOptions.resolve(local, storage_proxy=True)


def test_the_driver_shows_the_workers_lines_as_a_local_run_at_each_level() -> None:
    import io

    from pet_sweep.launch.ray import Relay
    from pet_sweep.progress import Progress
    from pet_sweep.sweep.records import EpochRecord, TrialOutcome

    record = EpochRecord(epoch=0, phase="frozen", train_loss=1.0, valid_loss=1.0, error_rate=0.5, seconds=1.0)
    ok = TrialOutcome(number=0, state="COMPLETE", value=0.5, params={}, seconds=1.0)
    failed = TrialOutcome(number=1, state="FAIL", value=None, params={}, seconds=1.0)
    events = [("trial_started", 0, 0, {"arch": "a"}), ("epoch_done", 0, 0, record), ("line", 0, "trial 0 COMPLETE"),
              ("trial_finished", 0, ok, (0.5, 0)), ("line", 1, "trial 1 FAIL"), ("trial_finished", 1, failed, (0.5, 0))]
    shown = {}
    for level in ("quiet", "normal", "verbose"):
        out, err = io.StringIO(), io.StringIO()
        progress = Progress(2, level=level, stream=out, err=err, live=False)
        Relay(progress.echo, progress.err.write, progress)(events)
        progress.close()
        shown[level] = (out.getvalue().splitlines(), err.getvalue().splitlines())
    assert shown["quiet"][0] == [] and [line.split()[:3] for line in shown["quiet"][1]] == [["trial", "1", "FAIL"]]
    normal = shown["normal"][0]
    assert [line for line in normal if "|" in line] == ["w0| trial 0 COMPLETE", "w1| trial 1 FAIL"]
    assert any(line.startswith("trial   0 started") for line in normal) and not any(" epoch " in line for line in normal)
    assert any(line.startswith("trial   0 epoch 0 (1/") for line in shown["verbose"][0])


def test_the_storage_proxy_serves_the_study_while_the_block_runs(write_experiments: Callable[..., Path],
                                                                 tmp_path: Path) -> None:
    import socket

    import optuna

    from pet_sweep.config import load_experiment
    from pet_sweep.errors import ConfigError
    from pet_sweep.launch.storage_proxy import storage_proxy
    from pet_sweep.sweep.storage import open_study

    exp = load_experiment(write_experiments())
    with storage_proxy(exp, "127.0.0.1") as seen:
        host, port = seen.storage_url.removeprefix("grpc://").split(":")
        assert host == "127.0.0.1" and seen.study_name == exp.study_name
        study = open_study(seen)  # as a worker opens it
        study.tell(study.ask(), 0.25)
    assert [t.value for t in optuna.load_study(study_name=exp.study_name, storage=exp.storage_url).get_trials()] == [0.25]
    with pytest.raises(ConnectionRefusedError):  # stopped with the block
        socket.create_connection((host, int(port)), timeout=5)
    journal = load_experiment(write_experiments(storage=f"journal:///{tmp_path}/optuna.log"))
    with pytest.raises(ConfigError, match="--storage-proxy serves a database .* but the experiment's storage is a journal"):
        with storage_proxy(journal, "127.0.0.1"):
            pass


class DatabaseClients:
    """Samples which processes hold a TCP connection to the database server's port, until stopped."""

    def __init__(self, port: int) -> None:
        import psutil

        self.psutil, self.port, self.pids, self._stop = psutil, port, set(), threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.3):
            self.pids |= {c.pid for c in self.psutil.net_connections(kind="tcp")
                          if c.raddr and c.raddr.port == self.port and c.pid}

    def stop(self) -> set[int]:
        self._stop.set()
        self._thread.join()
        return self.pids


@pytest.mark.postgres
@pytest.mark.slow
def test_through_the_storage_proxy_no_worker_connects_to_the_database(cluster: Any,
                                                                      write_experiments: Callable[..., Path]) -> None:
    """`--storage-proxy --quiet`: 4 trials, and of them the driver prints only the result."""
    import re

    import sqlalchemy
    from click.testing import CliRunner

    from pet_sweep.cli import cli

    exp, storage, name = experiment(write_experiments, 4)
    clients = DatabaseClients(sqlalchemy.engine.make_url(storage).port or 5432)
    try:
        done = CliRunner().invoke(cli, ["run", "--config", str(exp.config_path), "--workers", "2", "--ray",
                                        cluster.address, "--storage-proxy", "--quiet"], catch_exceptions=False)
    finally:
        connected = clients.stop()
    assert done.exit_code == 0, done.output
    lines = done.output.splitlines()
    assert [line for line in lines if line.startswith("best         trial")], done.output
    assert [line for line in lines if re.match(r"w\d\|", line) or " COMPLETE " in line] == [], done.output
    trials = check_the_stores(exp, storage, name, 4)
    workers = {int(t.user_attrs["worker"].rpartition(":")[2]) for t in trials}
    assert os.getpid() in connected, connected  # the driver (this process) holds the database's connections
    assert workers and not workers & connected, (workers, connected)
