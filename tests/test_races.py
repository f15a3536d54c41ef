"""Two workers, one study: the races a shared study used to leave open (issue 13, part 2).

Each race is provoked on SQLite and on PostgreSQL (the `postgres` cases skip, saying why,
without PET_SWEEP_TEST_POSTGRES_URL). One study name per test: a shared server keeps old ones.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import optuna
import pytest
from click.testing import CliRunner
from optuna.trial import TrialState

from pet_sweep.cli import cli
from pet_sweep.config import load_experiment
from pet_sweep.sweep.budget import Budget, WorkerRole, is_retry
from pet_sweep.sweep.lifecycle import stale_trial_numbers
from pet_sweep.sweep.records import INVOCATION_ATTR, WORKER_ATTR
from pet_sweep.sweep.storage import open_study, quiet_optuna
from pet_sweep.tracking import PARENT_RUN_ATTR, RUN_ID_ATTR, Tracker
from tests._sweeps import (
    FAST_DATA,
    FAST_FAULTS,
    PROJECT,
    RANDOM_SPACE,
    assert_nothing_running,
    load,
    mlflow_runs,
    pet_sweep,
    printed_command,
    running_trial_with_epoch,
    wait_for,
)
from tests.test_databases import server_url

STORES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
LONG_TRIALS = {**RANDOM_SPACE, "epochs": 3}  # long enough to be killed after its first epoch
HOST = socket.gethostname()


def storage_for(kind: str, tmp_path: Path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path}/shared.db"
    if not os.environ.get("PET_SWEEP_TEST_POSTGRES_URL"):
        pytest.skip("PET_SWEEP_TEST_POSTGRES_URL is unset: no PostgreSQL server to provoke the race on")
    return server_url("postgres")


def sweep_runs(exp: Any, name: str) -> list[Any]:
    return [r for r in mlflow_runs(exp.tracking_uri, exp.tracking_experiment)
            if r.data.tags.get("pet_sweep.role") == "sweep" and r.data.tags.get("pet_sweep.study") == name]


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def two_workers_mid_trial(write_experiments: Callable[..., Path], storage: str,
                          n_trials: int) -> tuple[Path, Any, str, subprocess.Popen]:
    """`pet-sweep run --workers 2` on a new study, once a trial is past its first epoch."""
    name = f"w{uuid.uuid4().hex[:10]}"
    config = write_experiments(space=LONG_TRIALS, data=FAST_DATA, faults=FAST_FAULTS, study_name=name,
                               storage=storage)
    exp = load_experiment(config)
    proc = pet_sweep("run", "--config", str(config), "--workers", "2", "--n-trials", str(n_trials))
    wait_for(lambda: running_trial_with_epoch(exp.storage_url, name), 600, "a trial past epoch 0", proc)
    return config, exp, name, proc


# -- 1. two parent runs -----------------------------------------------------------


@pytest.mark.parametrize("kind", STORES)
def test_two_processes_opening_a_new_study_together_keep_one_parent_run(
        kind: str, write_experiments: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    from pet_sweep.sweep.parent import open_parent_run

    name = f"p{uuid.uuid4().hex[:10]}"
    exp = load_experiment(write_experiments(data=FAST_DATA, study_name=name, storage=storage_for(kind, tmp_path)))
    studies = [open_study(exp), open_study(exp)]  # each machine opens the new study
    Tracker(exp.tracking_uri, exp.tracking_experiment)  # the MLflow experiment exists (its own race is handled)
    together = threading.Barrier(2, timeout=120)
    real_create = MlflowClient.create_run

    def create_together(self: MlflowClient, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("run_name", "").startswith("sweep-"):
            together.wait()  # both found no parent run and create one at the same moment
        return real_create(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "create_run", create_together)
    opened: dict[int, str] = {}
    errors: list[BaseException] = []

    def open_parent(i: int) -> None:
        try:
            opened[i] = open_parent_run(exp, studies[i], Tracker(exp.tracking_uri, exp.tracking_experiment))
        except BaseException as err:  # reported below, not lost in the thread
            errors.append(err)

    threads = [threading.Thread(target=open_parent, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    assert opened[0] == opened[1], "the two processes went on with different parent runs"
    (parent,) = sweep_runs(exp, name)  # the loser's run is deleted
    assert parent.info.run_id == opened[0] and parent.info.status == "RUNNING"
    assert parent.data.params["n_trials"]  # the winner's settings are logged
    assert load(exp.storage_url, name).user_attrs[PARENT_RUN_ATTR] == opened[0]


# -- 2. resume overruns the budget --------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", STORES)
def test_the_resume_after_every_worker_is_killed_runs_what_the_budget_has_left(
        kind: str, write_experiments: Callable[..., Path], tmp_path: Path) -> None:
    import psutil

    config, exp, name, proc = two_workers_mid_trial(write_experiments, storage_for(kind, tmp_path), 3)
    for worker in psutil.Process(proc.pid).children():
        worker.kill()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, out + err
    (hint,) = [line for line in err.splitlines() if "resume with:" in line]
    trials = load(exp.storage_url, name).get_trials()
    slots = sum(not is_retry(t) for t in trials)  # each killed trial used its slot; its retry is queued
    assert any(t.state == TrialState.WAITING for t in trials), out + err
    command = printed_command(hint.split("resume with: ", 1)[1])
    assert command[-2:] == ["--n-trials", str(3 - slots)], hint

    resumed = pet_sweep(*command, cwd=str(config.parent))
    out, err = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, out + err
    trials = load(exp.storage_url, name).get_trials()
    ran = [t.number for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(ran) == 3, f"the budget is 3 trials, {len(ran)} ran: {out}"
    assert sum(not is_retry(t) for t in trials) == 3  # slots: the retries ran free
    assert_nothing_running(exp.storage_url, name, exp.tracking_uri, exp.tracking_experiment)


def test_is_retry_reads_optunas_retry_mark_without_an_experimental_warning() -> None:
    import warnings

    from optuna.trial import create_trial

    # Optuna's heartbeat retry marks the new trial with the dead one's number (a system attr);
    # reading it through Optuna's experimental API warned on every budget check of a worker
    with warnings.catch_warnings():
        warnings.simplefilter("error", optuna.exceptions.ExperimentalWarning)
        assert is_retry(create_trial(value=1.0, system_attrs={"failed_trial": 3}))
        assert is_retry(create_trial(value=1.0, user_attrs={"oom_retry_of": 2}))
        assert not is_retry(create_trial(value=1.0))


def test_budget_left_gives_back_interrupted_slots_and_keeps_retried_ones() -> None:
    study = optuna.create_study()
    mine = {INVOCATION_ATTR: "inv"}
    budget = Budget(WorkerRole("inv"), n_trials=4)
    study.add_trial(optuna.create_trial(state=TrialState.COMPLETE, value=0.1, user_attrs=mine))
    study.add_trial(optuna.create_trial(state=TrialState.FAIL, user_attrs=mine))  # killed worker: retry queued
    study.add_trial(optuna.create_trial(state=TrialState.WAITING, user_attrs=mine, system_attrs={"failed_trial": 1}))
    study.add_trial(optuna.create_trial(state=TrialState.FAIL, user_attrs={**mine, "reason": "interrupted"}))
    assert budget.finished(study.get_trials()) == 1  # what the old hint subtracted: 3 more would run, +1 retry
    assert budget.left(study.get_trials()) == 2  # 4 - 3 slots used + 1 interrupted, not queued again
    assert Budget(WorkerRole("inv"), n_trials=2).left(study.get_trials()) == 0  # only the queued retry is left


@pytest.mark.train
@pytest.mark.parametrize("kind", STORES)
def test_n_trials_0_runs_only_the_queued_retries(kind: str, write_experiments: Callable[..., Path],
                                                 tmp_path: Path) -> None:
    name = f"z{uuid.uuid4().hex[:10]}"
    config = write_experiments(space=RANDOM_SPACE, data=FAST_DATA, study_name=name,
                               storage=storage_for(kind, tmp_path))
    exp = load_experiment(config)
    study = open_study(exp)
    killed = study.ask()
    study.tell(killed, state=TrialState.FAIL)
    optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)(study, study.trials[0])  # what a worker queues
    result = CliRunner().invoke(cli, ["run", "--config", str(config), "--n-trials", "0"])
    assert result.exit_code == 0, result.output
    trials = load(exp.storage_url, name).get_trials()
    assert [(t.state, t.system_attrs.get("failed_trial")) for t in trials] == [
        (TrialState.FAIL, None), (TrialState.COMPLETE, 0)], result.output
    assert "[retry of trial 0]" in result.output


def test_n_trials_below_0_is_refused(write_experiments: Callable[..., Path]) -> None:
    result = CliRunner().invoke(cli, ["run", "--config", str(write_experiments()), "--n-trials", "-1"])
    assert result.exit_code == 2 and "--n-trials must be >= 0, but got -1" in result.output


# -- 3. a killed supervisor leaves things behind -------------------------------------

OPENER = """
import sys, time
from pet_sweep.config import load_experiment
from pet_sweep.sweep.parent import open_parent_run
from pet_sweep.sweep.storage import open_study
from pet_sweep.tracking import Tracker
from pet_sweep.sweep.budget import Budget, WorkerRole

exp = load_experiment(sys.argv[1])
study = open_study(exp)
role = WorkerRole()
role.own_lock()  # what `pet-sweep run` does before its first trial
with Budget(role, 1).claim():
    print(open_parent_run(exp, study, Tracker(exp.tracking_uri, exp.tracking_experiment)), role.lock_path, flush=True)
time.sleep(600)
"""


def killed_opener(config: Path) -> tuple[str, Path]:
    """A process that opened the study's parent run and holds its lock, then is killed (-9)."""
    env = {**os.environ, "PYTHONPATH": f"{PROJECT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-c", OPENER, str(config)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    proc.kill()
    proc.communicate(timeout=60)
    assert line, "the opener did not start"
    parent, lock = line.split()
    return parent, Path(lock)


# every command on SQLite; `list` on PostgreSQL too (the storage only changes how the study is read)
@pytest.mark.parametrize("kind, command", [("sqlite", "list"), ("sqlite", "report"), ("sqlite", "run"),
                                           pytest.param("postgres", "list", marks=pytest.mark.postgres)])
def test_the_next_command_cleans_up_after_a_killed_supervisor(
        kind: str, command: str, write_experiments: Callable[..., Path], tmp_path: Path) -> None:
    from mlflow import MlflowClient

    name = f"s{uuid.uuid4().hex[:10]}"
    config = write_experiments(space=RANDOM_SPACE, data=FAST_DATA, study_name=name,
                               storage=storage_for(kind, tmp_path))
    exp = load_experiment(config)
    parent, lock = killed_opener(config)
    client = MlflowClient(exp.tracking_uri)
    assert client.get_run(parent).info.status == "RUNNING" and lock.exists()  # what it leaves behind
    args = {"list": ["list"], "report": ["report", "--out", str(tmp_path / "report")],
            "run": ["run", "--n-trials", "0"]}[command]
    result = CliRunner().invoke(cli, [*args, "--config", str(config)])
    cleaned = [line for line in result.output.splitlines() if line.startswith("cleaned")]
    assert len(cleaned) == 1, result.output
    assert f"MLflow parent run of study '{name}' closed (its process " in cleaned[0]
    assert "is gone and no trial is live)" in cleaned[0] and "lock file of " in cleaned[0]
    assert not lock.exists()
    # `run` opens the parent again and closes it when it ends; the others leave it closed
    assert client.get_run(parent).info.status == ("FINISHED" if command == "run" else "KILLED"), result.output
    again = CliRunner().invoke(cli, ["list", "--config", str(config)])
    assert "cleaned" not in again.output  # nothing left to clean


@pytest.mark.parametrize("kind", STORES)
def test_a_parent_held_by_a_live_process_or_live_trial_is_not_closed(
        kind: str, write_experiments: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pet_sweep.sweep.lifecycle import abandoned_parent
    from pet_sweep.sweep.records import PARENT_OPEN_ATTR

    name = f"l{uuid.uuid4().hex[:10]}"
    exp = load_experiment(write_experiments(data=FAST_DATA, study_name=name, storage=storage_for(kind, tmp_path),
                                            faults={"heartbeat_interval": 1, "grace_period": 600}))
    study = open_study(exp)
    study.set_user_attr(PARENT_OPEN_ATTR, f"{HOST}:{os.getpid()}@{time.time():.0f}")
    assert abandoned_parent(study, 600) is None  # this process is alive
    gone = dead_pid()
    study.set_user_attr(PARENT_OPEN_ATTR, f"{HOST}:{gone}@{time.time():.0f}")
    trial = study.ask()
    study._storage.record_heartbeat(trial._trial_id)
    assert abandoned_parent(study, 600) is None  # its opener is gone, but a trial still beats
    study.tell(trial, 0.5)
    assert abandoned_parent(study, 600) == f"its process {HOST}:{gone} is gone and no trial is live"
    # opened on another machine: only once the study has been quiet for the grace period
    study.set_user_attr(PARENT_OPEN_ATTR, f"elsewhere:1@{time.time():.0f}")
    assert abandoned_parent(study, 600) is None
    later = time.time() + 700
    monkeypatch.setattr("pet_sweep.sweep.lifecycle.time", SimpleNamespace(time=lambda: later))
    assert abandoned_parent(study, 600).startswith("no live trial for 7")  # ~700 s since the trial ended


@pytest.mark.slow
@pytest.mark.parametrize("kind", STORES)
def test_kill_9_of_the_supervisor_is_cleaned_by_the_next_list(kind: str, write_experiments: Callable[..., Path],
                                                              tmp_path: Path) -> None:
    import psutil

    config, exp, name, proc = two_workers_mid_trial(write_experiments, storage_for(kind, tmp_path), 2)
    workers = psutil.Process(proc.pid).children()
    proc.kill()  # the supervisor itself
    for worker in workers:
        worker.kill()
    proc.communicate(timeout=60)
    psutil.wait_procs(workers, timeout=60)
    study = load(exp.storage_url, name)
    parent = study.user_attrs[PARENT_RUN_ATTR]
    assert sweep_runs(exp, name)[0].info.status == "RUNNING"
    running = {t.number for t in study.get_trials(states=(TrialState.RUNNING,))}
    # the killed workers' heartbeats go stale after faults.grace_period (one storage for the polling:
    # a new one per poll would hold a PostgreSQL connection each until garbage-collected)
    polled = open_study(exp, create=False)
    wait_for(lambda: stale_trial_numbers(polled) == running, 300, "stale heartbeats")
    result = CliRunner().invoke(cli, ["list", "--config", str(config)])
    assert result.exit_code == 0, result.output
    (cleaned,) = [line for line in result.output.splitlines() if line.startswith("cleaned")]
    assert f"lock file of {HOST}:{proc.pid} (gone)" in cleaned
    assert f"MLflow parent run of study '{name}' closed" in cleaned
    (run,) = sweep_runs(exp, name)
    assert run.info.run_id == parent and run.info.status == "KILLED"
    assert not [lock for lock in Path(tempfile.gettempdir()).glob("pet-sweep-*.lock")
                if lock.read_text().strip() == f"{HOST}:{proc.pid}"]


# -- 4. no command frees a stale trial ---------------------------------------------


def running_trial(exp: Any, worker: str) -> tuple[optuna.Study, int, str]:
    """A RUNNING trial with its MLflow run, as a worker that then died leaves it."""
    study = open_study(exp)
    tracker = Tracker(exp.tracking_uri, exp.tracking_experiment)
    from pet_sweep.sweep.parent import open_parent_run

    parent = open_parent_run(exp, study, tracker)
    trial = study.ask()
    run_id = tracker.start_trial(parent, exp.study_name, trial.number, {"base_lr": 0.01})
    trial.set_user_attr(RUN_ID_ATTR, run_id)
    trial.set_user_attr(WORKER_ATTR, worker)
    trial.set_user_attr(INVOCATION_ATTR, "gone")
    if hasattr(study._storage, "record_heartbeat"):
        study._storage.record_heartbeat(trial._trial_id)
    return study, trial.number, run_id


def assert_failed_and_queued(exp: Any, number: int, run_id: str, reason: str) -> None:
    from mlflow import MlflowClient

    trials = load_study(exp).get_trials()
    assert trials[number].state == TrialState.FAIL
    retries = [t.state for t in trials if t.system_attrs.get("failed_trial") == number]
    assert retries == [TrialState.WAITING]  # queued to run again
    run = MlflowClient(exp.tracking_uri).get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["reason"] == reason


def load_study(exp: Any) -> optuna.Study:
    from pet_sweep.sweep.storage import make_storage

    return optuna.load_study(study_name=exp.study_name, storage=make_storage(exp.storage_url))


@pytest.mark.parametrize("kind", STORES)
def test_fail_stale_fails_trials_whose_heartbeat_stopped(kind: str, write_experiments: Callable[..., Path],
                                                          tmp_path: Path) -> None:
    from pet_sweep.sweep.records import STALE_REASON

    quiet_optuna()
    name = f"f{uuid.uuid4().hex[:10]}"
    config = write_experiments(data=FAST_DATA, study_name=name, storage=storage_for(kind, tmp_path),
                               faults={"heartbeat_interval": 1, "grace_period": 2})
    exp = load_experiment(config)
    study, number, run_id = running_trial(exp, f"elsewhere:{dead_pid()}")
    fresh = study.ask()  # another worker's trial, beating now: not stale
    wait_for(lambda: number in stale_trial_numbers(study), 120, "the heartbeat to go stale")
    study._storage.record_heartbeat(fresh._trial_id)
    result = CliRunner().invoke(cli, ["fail-stale", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert f"trial {number:>3} FAIL     {STALE_REASON}; queued to run again" in result.output
    assert f"closed       MLflow run {run_id} (FAILED)" in result.output
    assert f"failed       trial(s) {number}\n" in result.output
    assert f"running      trial(s) {fresh.number} sent a heartbeat" in result.output
    assert_failed_and_queued(exp, number, run_id, STALE_REASON)
    assert load_study(exp).get_trials()[fresh.number].state == TrialState.RUNNING


def test_fail_stale_on_a_journal_asks_for_the_trial_and_a_confirmation(write_experiments: Callable[..., Path],
                                                                       tmp_path: Path) -> None:
    quiet_optuna()
    name = f"j{uuid.uuid4().hex[:10]}"
    config = write_experiments(data=FAST_DATA, study_name=name, storage="journal://stores/optuna.log")
    exp = load_experiment(config)
    study, number, run_id = running_trial(exp, f"{HOST}:{dead_pid()}")
    base = ["fail-stale", "--config", str(config)]

    no_trial = CliRunner().invoke(cli, base)
    assert no_trial.exit_code == 2
    assert "journal storage has no heartbeats, so no trial is known stale; name the trial whose worker is gone: " \
           f"--trial N (running: {number})" in no_trial.output
    declined = CliRunner().invoke(cli, [*base, "--trial", str(number)], input="n\n")
    assert declined.exit_code == 1 and f"fail trial {number} of study '{name}'" in declined.output
    assert load_study(exp).get_trials()[number].state == TrialState.RUNNING  # nothing changed

    done = CliRunner().invoke(cli, [*base, "--trial", str(number)], input="y\n")
    assert done.exit_code == 0, done.output
    reason = f"failed by `pet-sweep fail-stale --trial {number}`: its worker is gone"
    assert f"trial {number:>3} FAIL     {reason}; queued to run again" in done.output
    assert f"closed       MLflow run {run_id} (FAILED)" in done.output
    assert_failed_and_queued(exp, number, run_id, reason)

    finished = CliRunner().invoke(cli, [*base, "--trial", str(number), "--yes"])
    assert finished.exit_code == 2 and f"trial {number} of study '{name}' is FAIL, not RUNNING" in finished.output


def test_fail_stale_refuses_a_trial_whose_worker_runs_here(write_experiments: Callable[..., Path]) -> None:
    quiet_optuna()
    config = write_experiments(data=FAST_DATA, storage="journal://stores/optuna.log")
    exp = load_experiment(config)
    _, number, _ = running_trial(exp, f"{HOST}:{os.getpid()}")
    result = CliRunner().invoke(cli, ["fail-stale", "--config", str(config), "--trial", str(number), "--yes"])
    assert result.exit_code == 2
    assert f"trial {number}'s worker {HOST}:{os.getpid()} still runs on this machine" in result.output
    assert load_study(exp).get_trials()[number].state == TrialState.RUNNING
