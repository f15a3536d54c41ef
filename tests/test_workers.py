"""`pet-sweep run --workers N`: N processes share one study and one budget."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Callable

import pytest
from optuna.trial import TrialState

from pet_sweep.config import load_experiment
from pet_sweep.errors import ConfigError, PetSweepError
from pet_sweep.launch.local import parse_gpus, worker_envs
from pet_sweep.sweep.budget import Budget, WorkerRole
from pet_sweep.sweep.records import INVOCATION_ATTR
from tests._sweeps import FAST_DATA, FAST_FAULTS, RANDOM_SPACE, load, pet_sweep, two_workers_finish_the_budget


@pytest.mark.slow
def test_two_workers_on_sqlite_finish_exactly_n_trials(write_experiments: Callable[..., Path], tmp_path: Path) -> None:
    two_workers_finish_the_budget(write_experiments, f"sqlite:///{tmp_path}/shared.db")


@pytest.mark.slow
def test_workers_stopped_by_the_study_cap_say_so_and_exit_0(write_experiments: Callable[..., Path]) -> None:
    name = f"c{uuid.uuid4().hex[:8]}"
    config = write_experiments(space={**RANDOM_SPACE, "epochs": 2}, data=FAST_DATA, faults=FAST_FAULTS,
                               study_name=name, budget={"n_trials": 3, "max_trials": 1})
    exp = load_experiment(config)
    proc = pet_sweep("run", "--config", str(config), "--workers", "2")
    out, err = proc.communicate(timeout=1800)
    assert proc.returncode == 0, out + err  # not "the workers stopped early"
    assert [t.state for t in load(exp.storage_url, name).get_trials()] == [TrialState.COMPLETE]
    # the worker that found trial 0 running waited for it rather than start a second one
    assert "waiting      for trial(s) 0 (budget.max_trials 1 reached); retries any whose worker dies" in out, out
    assert ("budget       the study's cap is reached (budget.max_trials 1, counting trials finished or running "
            "anywhere): 1 of 3 trials ran here") in out


def test_budget_counts_slots_not_retries() -> None:
    import optuna

    role = WorkerRole("inv1")
    budget = Budget(role, n_trials=2)
    study = optuna.create_study()
    mine = {INVOCATION_ATTR: "inv1"}
    study.add_trial(optuna.create_trial(state=TrialState.FAIL, user_attrs=mine))
    study.add_trial(optuna.create_trial(state=TrialState.COMPLETE, value=0.1, user_attrs={INVOCATION_ATTR: "other"}))
    assert budget.next_step(study) == "run"  # one slot used, the other invocation's trial is not ours
    # the retry of a dead worker's trial carries the original's attrs and uses no slot
    study.add_trial(optuna.create_trial(state=TrialState.COMPLETE, value=0.2, user_attrs=mine,
                                        system_attrs={"failed_trial": 0}))
    assert budget.used(study.get_trials()) == 1
    study.add_trial(optuna.create_trial(state=TrialState.RUNNING, user_attrs=mine))
    # budget used, but a trial of ours runs: stay to retry it if its worker dies
    assert budget.next_step(study) == "wait"
    assert budget.waiting_on == "for trial(s) 3 (this run's budget is used)"
    assert Budget(role, n_trials=2, heartbeats=False).next_step(study) == "stop"
    assert Budget(role, n_trials=5, max_trials=2).next_step(study) == "stop"  # the study-wide cap


def test_max_trials_counts_trials_running_on_other_machines() -> None:
    import optuna

    study = optuna.create_study()
    study.add_trial(optuna.create_trial(state=TrialState.COMPLETE, value=0.1, user_attrs={INVOCATION_ATTR: "a"}))
    study.add_trial(optuna.create_trial(state=TrialState.RUNNING, user_attrs={INVOCATION_ATTR: "b"}))
    study.add_trial(optuna.create_trial(state=TrialState.WAITING))  # enqueued: would run if the cap allowed
    mine = WorkerRole("c")
    # one finished + one running elsewhere fill a cap of 2: start nothing, stay in case that worker dies
    capped = Budget(mine, n_trials=5, max_trials=2)
    assert capped.next_step(study) == "wait"
    assert capped.waiting_on == "for trial(s) 1 (budget.max_trials 2 reached)"  # said once when waiting
    assert Budget(mine, n_trials=5, max_trials=2, heartbeats=False).next_step(study) == "stop"
    assert Budget(mine, n_trials=5, max_trials=3).next_step(study) == "run"
    over = Budget(mine, n_trials=5, max_trials=1)
    assert over.next_step(study) == "stop" and over.capped
    # a worker whose own budget is spent stops rather than wait on other machines' trials
    study.add_trial(optuna.create_trial(state=TrialState.PRUNED, value=None, intermediate_values={0: 0.5},
                                        user_attrs={INVOCATION_ATTR: "c"}))
    spent = Budget(mine, n_trials=1, max_trials=3)
    assert spent.next_step(study) == "stop" and not spent.capped  # its own budget, not the cap
    assert Budget(mine, n_trials=2, max_trials=3).next_step(study) == "wait"


def test_worker_role_round_trips_and_gpus_are_assigned(monkeypatch: pytest.MonkeyPatch) -> None:
    role = WorkerRole("abc", 1, 2, "run123", 4)
    assert WorkerRole.decode(role.encode()) == role
    assert WorkerRole.decode(WorkerRole("abc").encode()) == WorkerRole("abc")
    envs = worker_envs(3, ["0", "1"])
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "1", "0"]
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert [e["OMP_NUM_THREADS"] for e in worker_envs(2, [])] == ["4", "4"]
    assert parse_gpus("0, 2") == ["0", "2"]
    with pytest.raises(ConfigError, match="--gpus"):
        parse_gpus("a,b")


def test_the_worker_is_a_hidden_command_whose_argv_carries_no_url(write_experiments: Callable[..., Path]) -> None:
    from click.testing import CliRunner

    from pet_sweep.cli import cli
    from pet_sweep.launch.local import worker_command

    assert cli.commands["worker"].hidden and "\n  worker " not in CliRunner().invoke(cli, ["--help"]).output
    exp = load_experiment(write_experiments(tracking={"uri": "http://u:s3cret@mlflow:5000"},
                                            budget={"n_trials": 3, "timeout": 60}))
    role = WorkerRole("abc", 1, 2, "run1", 4)
    argv = worker_command(exp, role)
    assert argv[1:] == ["-m", "pet_sweep", "worker", role.encode(), "tiny"]  # the experiment is in the environment
    assert "s3cret" not in " ".join(argv)  # the URLs travel in the environment


def test_the_supervisor_says_why_the_workers_stopped() -> None:
    from pet_sweep.launch.local import WorkerExit, why_stopped

    ok, dead = [WorkerExit(0, 0), WorkerExit(1, 0)], [WorkerExit(0, -9), WorkerExit(1, 1)]
    assert why_stopped(ok, True, short=True, capped=False, timed_out=False) == "interrupt"
    assert why_stopped(dead, False, short=False, capped=True, timed_out=True) == "workers"  # none exited 0
    assert why_stopped(ok, False, short=False, capped=True, timed_out=True) == "budget"  # every slot used
    assert why_stopped(ok, False, short=True, capped=True, timed_out=True) == "cap"  # the cap before the clock
    assert why_stopped(ok, False, short=True, capped=False, timed_out=True) == "timeout"
    assert why_stopped(ok, False, short=True, capped=False, timed_out=False) == "workers"  # slots left, no reason


def test_journal_storage_is_shared_through_a_file(write_experiments: Callable[..., Path], tmp_path: Path) -> None:
    from pet_sweep.sweep.storage import make_storage, open_study

    exp = load_experiment(write_experiments(storage="journal://stores/optuna.log"))
    assert exp.storage_url == f"journal://{tmp_path}/stores/optuna.log"  # relative to experiments.yaml
    first = open_study(exp)
    first.enqueue_trial({"x": 1})
    # a second process (or machine on the shared file system) sees the same study
    other = load_experiment(write_experiments(storage=f"journal://{tmp_path}/stores/optuna.log"))
    import optuna

    again = optuna.load_study(study_name=exp.study_name, storage=make_storage(other.storage_url))
    assert [t.state for t in again.get_trials()] == [TrialState.WAITING]


def test_faults_settings_are_checked(write_experiments: Callable[..., Path]) -> None:
    with pytest.raises(ConfigError, match="faults.*grace_period must be > heartbeat_interval"):
        load_experiment(write_experiments(faults={"heartbeat_interval": 10, "grace_period": 5}))
    exp = load_experiment(write_experiments(faults={"heartbeat_interval": 2, "grace_period": 7, "max_retry": 0}))
    from pet_sweep.sweep.storage import make_storage

    storage = make_storage(exp.storage_url, exp.config.faults)
    assert (storage.heartbeat_interval, storage.grace_period) == (2, 7)


def test_tables_created_by_another_process_at_the_same_moment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Two processes opening a new database together: the one that loses the race tries again."""
    import optuna
    import sqlalchemy.exc

    from pet_sweep.sweep.storage import make_storage

    real, calls = optuna.storages.RDBStorage, []

    def racing(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - stands in for RDBStorage
        calls.append(1)
        if len(calls) == 1:  # what SQLite says when the other process created the table first
            raise sqlalchemy.exc.OperationalError("CREATE TABLE trial_params", {},
                                                  Exception("table trial_params already exists"))
        return real(*args, **kwargs)

    monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
    monkeypatch.setattr("pet_sweep.sweep.storage.time.sleep", lambda seconds: None)
    assert isinstance(make_storage(f"sqlite:///{tmp_path}/new.db"), real) and len(calls) == 2
    # any other database error is not a race: it is reported at once
    def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        raise sqlalchemy.exc.OperationalError("SELECT", {}, Exception("disk I/O error"))

    calls.clear()
    monkeypatch.setattr(optuna.storages, "RDBStorage", broken)
    with pytest.raises(PetSweepError, match="disk I/O error"):
        make_storage(f"sqlite:///{tmp_path}/other.db")
    assert len(calls) == 1


def test_a_missing_database_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import optuna

    from pet_sweep.sweep.storage import make_storage

    def no_driver(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - what Optuna raises without psycopg
        raise ImportError("Failed to import DB access module for the specified storage URL. "
                          "Please install appropriate one.")

    monkeypatch.setattr(optuna.storages, "RDBStorage", no_driver)
    with pytest.raises(PetSweepError, match=r"postgresql://u:\*\*\*@db/optuna: ImportError: .*; install its driver "
                                            r"with: pip install -e '\.\[postgres\]'"):
        make_storage("postgresql://u:pw@db/optuna")
    with pytest.raises(PetSweepError, match=r"pip install -e '\.\[mysql\]'"):
        make_storage("mysql+pymysql://root@db/optuna")


def test_the_shared_parent_run_stays_open_while_another_machine_trains() -> None:
    import optuna

    from pet_sweep.sweep.parent import close_parent_run

    closed: list[tuple[str, str]] = []

    class Tracker:  # records what would reach MLflow
        def finish_sweep(self, run_id: str, status: str) -> None:
            closed.append((run_id, status))

    study = optuna.create_study()
    study.add_trial(optuna.create_trial(state=TrialState.COMPLETE, value=0.1))
    running = study.ask()  # a trial of another machine, still training
    assert not close_parent_run(study, Tracker(), "parent", "FINISHED") and closed == []
    study.tell(running, 0.2)
    assert close_parent_run(study, Tracker(), "parent", "FINISHED") and closed == [("parent", "FINISHED")]


@pytest.mark.slow
def test_two_workers_get_their_share_of_the_cores_and_the_users_threads_win(
        write_experiments: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The documented default (launch.local.worker_threads): cores // workers torch threads each,
    read back from what each worker's trials recorded (torch.get_num_threads() in the worker)."""
    from pet_sweep.launch.local import supervise
    from tests._sweeps import trial_runs

    for user, expected in ((None, "2"), ("1", "1")):  # 4 cores, 2 workers: 2 each; OMP_NUM_THREADS=1 wins
        monkeypatch.setattr("os.cpu_count", lambda: 4)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY"):
            monkeypatch.delenv(var, raising=False)
        if user:
            monkeypatch.setenv("OMP_NUM_THREADS", user)
        name = f"t{uuid.uuid4().hex[:8]}"
        exp = load_experiment(write_experiments(space=RANDOM_SPACE, data=FAST_DATA, faults=FAST_FAULTS,
                                                study_name=name, budget={"n_trials": 2}))
        result = supervise(exp, 2, [], echo=lambda line: None, warn=lambda line: None)
        assert result.finished == 2
        runs = trial_runs(exp.tracking_uri, exp.tracking_experiment, name)
        assert sorted(run.data.params["torch_threads"] for run in runs.values()) == [expected, expected]
        # cached digits: no DataLoader process (train.data.loader_workers), logged beside the threads
        assert [run.data.params["loader_workers"] for run in runs.values()] == ["0", "0"]
    monkeypatch.setenv("OMP_NUM_THREADS", "two")
    with pytest.raises(ConfigError, match="OMP_NUM_THREADS.*'two'"):
        worker_envs(2, [])
