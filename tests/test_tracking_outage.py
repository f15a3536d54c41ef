"""When the MLflow tracking server goes away mid-sweep: training goes on, its writes wait in
the spool and reach the server when it answers again; a server away too long stops the sweep
like a Ctrl-C. A real `mlflow server` on a loopback port, killed and started again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import pytest
from click.testing import CliRunner
from optuna.trial import TrialState

from pet_sweep.cli import cli
from pet_sweep.config import load_experiment
from pet_sweep.sweep.loop import run_sweep
from pet_sweep.sweep.storage import quiet_optuna
from pet_sweep.tracking import RUN_ID_ATTR, RUN_STATUS
from pet_sweep.tracking_spool import CLIENT_BOUNDS, LOCAL_PREFIX, SpoolFile, spool_dir
from tests._sweeps import FAST_DATA, closed_port, load, pet_sweep, running_trial_with_epoch, trial_runs, wait_for

MLFLOW = str(Path(sys.executable).with_name("mlflow"))


class MlflowServer:
    """`mlflow server` on a sqlite store in `root`, on one port across restarts."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.port = root, closed_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [MLFLOW, "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=(self.root / "server.log").open("a"), start_new_session=True)
        wait_for(self.answers, 180, "the mlflow server to answer")

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.uri + "/health", timeout=2):
                return True
        except OSError:
            assert self.proc is not None and self.proc.poll() is None, (self.root / "server.log").read_text()
            return False

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)  # the server and its workers, as an OOM kill or a lost VM
        self.proc.wait()


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    for name in CLIENT_BOUNDS:  # the bounds a sweep sets in its process: undone after the test
        monkeypatch.delenv(name, raising=False)
    server = MlflowServer(tmp_path / "server")
    server.start()
    yield server
    if server.proc is not None and server.proc.poll() is None:
        server.kill()


def runs_of(server: MlflowServer, exp: Any) -> dict[int, Any]:
    return trial_runs(server.uri, exp.tracking_experiment, exp.study_name)


def assert_epochs_logged(server: MlflowServer, run: Any, n_epochs: int) -> None:
    """Each epoch's metrics once, at its step (the global epoch counter)."""
    from mlflow import MlflowClient

    history = MlflowClient(server.uri).get_metric_history(run.info.run_id, "error_rate")
    assert sorted(m.step for m in history) == list(range(n_epochs)), history


def test_a_spool_replays_in_order_once_and_goes_on_where_a_failure_stopped_it(tmp_path: Path) -> None:
    class Client:  # the two MlflowClient calls a trial's writes need; the second batch fails once
        def __init__(self) -> None:
            self.calls: list[tuple[str, Any]] = []
            self.fail_next_batch = True

        def create_run(self, experiment_id: str, **kwargs: Any) -> Any:
            self.calls.append(("create", kwargs["tags"]))
            return type("Run", (), {"info": type("Info", (), {"run_id": f"real{len(self.calls)}"})})

        def log_batch(self, run: str, metrics: Any, params: Any, tags: Any) -> None:
            if metrics and self.fail_next_batch:
                self.fail_next_batch = False
                raise ConnectionError("refused")
            self.calls.append(("batch", (run, [(m.key, m.step) for m in metrics])))

    spool = SpoolFile.create(tmp_path)
    local = LOCAL_PREFIX + "1"
    spool.add({"op": "create_run", "local": local, "experiment_id": "1", "run_name": "trial-0",
               "tags": {"mlflow.parentRunId": "p"}, "time": 1})
    for step in (0, 1):
        spool.add({"op": "log_batch", "run": local, "metrics": [("error_rate", 0.5, 2, step)]})
    client = Client()
    from pet_sweep.tracking_spool import apply

    with pytest.raises(ConnectionError):
        spool.replay(lambda op, ids: apply(client, op, ids))
    assert spool.pending() == 2 and SpoolFile(spool.path).ids == {local: "real1"}  # read back from disk
    assert spool.replay(lambda op, ids: apply(client, op, ids)) == 2
    assert client.calls == [("create", {"mlflow.parentRunId": "p"}), ("batch", ("real1", [("error_rate", 0)])),
                            ("batch", ("real1", [("error_rate", 1)]))]
    assert spool.pending() == 0


def test_a_write_that_got_no_answer_is_kept_and_sent_again_while_health_answers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At 128 workers an MLflow server answered /health at once while its run creations timed out; a
    write that got no answer of the server's own (a timeout, a client-side failure, a 5xx) waits in the
    spool, where it failed the trial before. A 4xx (the server refused this write) still raises."""
    from mlflow.exceptions import MlflowException, RestException

    from pet_sweep import tracking_spool
    from pet_sweep.tracking_spool import Gate, undelivered

    timeout = MlflowException("API request to http://h/api/2.0/mlflow/runs/create failed with timeout exception "
                              "HTTPConnectionPool(host='h', port=1): Read timed out. (read timeout=15).")
    race = MlflowException("API request to http://h/api/2.0/mlflow/runs/log-batch failed with exception "
                           "'_MLFLOW_TELEMETRY_SESSION_ID'")
    refused = RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "bad param"})
    busy = RestException({"error_code": "INTERNAL_ERROR", "message": "database is locked"})
    assert [undelivered(e) for e in (timeout, race, busy, ConnectionError("refused"), refused, ValueError("bug"))] \
        == [True, True, True, True, False, False]

    class Client:  # create_run times out once, then works
        def __init__(self) -> None:
            self.failures: list[BaseException] = [timeout]
            self.created: list[str] = []

        def create_run(self, experiment_id: str, **kwargs: Any) -> Any:
            if self.failures:
                raise self.failures.pop()
            self.created.append(kwargs["run_name"])
            return type("Run", (), {"info": type("Info", (), {"run_id": "real1"})})

    monkeypatch.setattr(tracking_spool, "answers", lambda uri, timeout=0: True)  # /health answers throughout
    monkeypatch.setattr(tracking_spool, "PROBE_S", 0.05)
    client, said = Client(), []
    gate = Gate(client, "http://127.0.0.1:1", tmp_path, notify=said.append)
    op = {"op": "create_run", "experiment_id": "1", "run_name": "trial-0", "tags": {}, "time": 1}
    local = gate.write(op)
    assert local is not None and local.startswith(LOCAL_PREFIX) and client.created == []
    wait_for(lambda: client.created, 10, "the kept write to be sent")
    assert client.created == ["trial-0"] and gate.resolve(local) == "real1"
    client.failures.append(refused)
    with pytest.raises(RestException):
        gate.write(op)
    gate.close()
    assert any("answers again" in line for line in said), said


def test_a_supervised_worker_asks_a_busy_server_again_and_a_lone_run_does_not(monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.exceptions import MlflowException

    from pet_sweep import tracking
    from pet_sweep.errors import StudyError

    broken = MlflowException("API request to http://h/api/2.0/mlflow/experiments/get-by-name failed with exception "
                             "('Connection broken: IncompleteRead(0 bytes read, 395 more expected)')")

    class Client:
        def __init__(self) -> None:
            self.asked = 0

        def get_experiment_by_name(self, name: str) -> Any:
            self.asked += 1
            if self.asked < 3:
                raise broken
            return type("Exp", (), {"experiment_id": "7", "tags": {tracking.EXPERIMENT_KIND_TAG[0]: "x"}})

    client = Client()
    monkeypatch.setattr(tracking, "_client", lambda uri: client)
    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)
    worker = tracking.Tracker("http://127.0.0.1:1", "pet-sweep/x", check=False)
    assert (worker.experiment_id, client.asked) == ("7", 3)
    client.asked = 0
    monkeypatch.setattr(tracking, "check_server", lambda uri, timeout=10.0: None)  # /health answered
    with pytest.raises(StudyError, match="IncompleteRead"):  # a run on its own: said at once, as before
        tracking.Tracker("http://127.0.0.1:1", "pet-sweep/x")
    assert client.asked == 1


def test_importing_pet_sweep_keeps_mlflow_telemetry_off_unless_the_user_chose() -> None:
    code = "import os, pet_sweep; print(os.environ['MLFLOW_DISABLE_TELEMETRY'])"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_DISABLE_TELEMETRY"}
    for given, expected in ((None, "true"), ("false", "false")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                             env=env if given is None else {**env, "MLFLOW_DISABLE_TELEMETRY": given})
        assert out.stdout.strip() == expected, out.stderr


@pytest.mark.train
@pytest.mark.slow
def test_a_server_killed_mid_sweep_and_restarted_gets_every_trial(
        write_experiments: Callable[..., Path], server: MlflowServer, capsys: pytest.CaptureFixture[str]) -> None:
    quiet_optuna()
    config = write_experiments(data=FAST_DATA, budget={"n_trials": 3}, tracking={"uri": server.uri})
    exp = load_experiment(config)
    said: list[tuple[float, str]] = []  # (when, stderr line)
    killed: list[float] = []

    def read_console() -> str:
        now = time.monotonic()
        said.extend((now, line) for line in capsys.readouterr().err.splitlines())
        return "\n".join(line for _, line in said)

    def server_control(number: int, record: Any) -> None:  # an epoch listener: runs in the training loop
        read_console()  # each epoch: when a line came, to an epoch's time
        if record.epoch != 0:
            return
        if number == 0:
            server.kill()
            killed.append(time.monotonic())
        elif number == 1:  # trial 1 started and trained its first epoch with the server away
            wait_for(lambda: "is unreachable" in read_console(), 30, "the unreachable line")
            server.start()
            wait_for(lambda: "answers again" in read_console(), 30, "the server's return said")

    result = run_sweep(exp, epoch_listeners=(server_control,))
    console = read_console()
    trials = load(exp.storage_url, exp.study_name).get_trials()
    assert [t.state for t in trials] and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert result.stopped_by == "budget" and len(trials) == 3
    [(when, line)] = [(when, line) for when, line in said if "is unreachable" in line]
    assert when - killed[0] < 30 and server.uri in line and "training goes on" in line
    assert "Traceback" not in console
    runs = runs_of(server, exp)
    for trial in trials:
        run = runs[trial.number]
        assert run.info.status == RUN_STATUS[trial.state.name], (trial.number, run.info)
        assert run.data.tags["optuna.state"] == trial.state.name
        assert trial.user_attrs[RUN_ID_ATTR] == run.info.run_id  # trial 1's run was made in the spool
        assert_epochs_logged(server, run, len(trial.user_attrs["history"]))
    assert not list(spool_dir(exp.storage_url, exp.tracking_uri).glob("*.jsonl"))  # all sent, none left


@pytest.mark.train
@pytest.mark.slow
def test_a_server_away_past_max_outage_stops_the_sweep_and_sync_sends_its_trials(
        write_experiments: Callable[..., Path], server: MlflowServer) -> None:
    config = write_experiments(data=FAST_DATA, budget={"n_trials": 3}, tracking={"uri": server.uri, "max_outage": 0})
    exp = load_experiment(config)
    proc = pet_sweep("run", "--config", str(config))
    wait_for(lambda: running_trial_with_epoch(exp.storage_url, exp.study_name), 600, "a trial past epoch 0", proc)
    server.kill()
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, out + err
    assert "Traceback" not in out + err
    assert f"the MLflow server {server.uri} is unreachable" in err
    [stop] = [line for line in err.splitlines() if "resume with:" in line]
    assert "tracking.max_outage" in stop and f"pet-sweep sync {exp.name}" in stop
    trials = load(exp.storage_url, exp.study_name).get_trials()
    assert len(trials) < 3 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)

    server.start()  # back: `sync` sends what the sweep kept
    synced = CliRunner().invoke(cli, ["sync", "--config", str(config)])
    assert synced.exit_code == 0, synced.output
    assert "sent" in synced.output and " 0 write" not in synced.output
    runs = runs_of(server, exp)
    for trial in trials:
        assert runs[trial.number].info.status == RUN_STATUS[trial.state.name]
        assert_epochs_logged(server, runs[trial.number], len(trial.user_attrs["history"]))
    report = CliRunner().invoke(cli, ["report", "--config", str(config), "--out", str(config.parent / "report"),
                                      "--no-mlflow-attach"])
    assert report.exit_code == 0, report.output
    assert "incomplete" not in report.output


def test_the_parent_run_failing_to_open_stops_before_any_training(
        write_experiments: Callable[..., Path], server: MlflowServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    def refused(*args: Any, **kwargs: Any) -> Any:  # what the client raises once its retries are spent
        raise MlflowException(f"API request to {server.uri}/api/2.0/mlflow/runs/create failed with exception "
                              "HTTPConnectionPool: Max retries exceeded (Connection refused)")

    monkeypatch.setattr(MlflowClient, "create_run", refused)
    config = write_experiments(data=FAST_DATA, tracking={"uri": server.uri})
    result = CliRunner().invoke(cli, ["run", "--config", str(config)])
    assert result.exit_code == 2, result.output  # as every store the sweep cannot open: a clear error
    assert "cannot open the sweep's parent run" in result.output and "no trial was started" in result.output
    exp = load_experiment(config)
    assert load(exp.storage_url, exp.study_name).get_trials() == []


def test_report_marks_trials_whose_mlflow_run_is_incomplete(write_experiments: Callable[..., Path]) -> None:
    from pet_sweep.tracking import Tracker, open_sweep_runs

    exp = load_experiment(write_experiments())
    tracker = Tracker(exp.tracking_uri, exp.tracking_experiment)
    parent = tracker.sweep_run(exp.study_name, {})
    tracker.finish_trial(tracker.start_trial(parent, exp.study_name, 0, {}), "COMPLETE")
    tracker.start_trial(parent, exp.study_name, 1, {})  # left RUNNING: its end never reached the server
    runs = open_sweep_runs(exp.tracking_uri, parent)
    assert runs.incomplete_trials(exp.study_name, {0: "COMPLETE", 1: "PRUNED", 2: "COMPLETE", 3: "RUNNING"}) == [1, 2]
