"""`pet-sweep list`, `ui` and `dashboard`: argument handling, URLs, messages (no server started)."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import sys
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

import optuna
import pytest
from click.testing import CliRunner

from pet_sweep import browse
from pet_sweep.cli import cli
from pet_sweep.config import load_experiment


def invoke(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def fill_study(storage_url: str, name: str) -> None:
    """A study with 2 complete, 1 pruned and 1 failed trial, written without training."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, storage=storage_url, direction="minimize")
    for value in (0.30, 0.12):
        trial = study.ask()
        study.tell(trial, value)
    study.tell(study.ask(), state=optuna.trial.TrialState.PRUNED)
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)


@pytest.fixture
def recorded_serve(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replace the server loop: record what would have been started."""
    calls: list[dict[str, Any]] = []

    def fake_serve(cmd: list[str], *, env: dict[str, str], ready_url: str, open_url: str,
                   echo: Callable[[str], None], startup_timeout: float = 0, ready_lines: Any = ()) -> int:
        calls.append({"cmd": cmd, "env": env, "ready_url": ready_url, "open_url": open_url})
        echo(f"open {open_url}")
        for line in ready_lines:
            echo(line)
        return 0

    monkeypatch.setattr(browse, "serve", fake_serve)
    return calls


# -- list ----------------------------------------------------------------------


def test_list_reports_no_study_and_creates_nothing(write_experiments: Callable[..., Path]) -> None:
    config = write_experiments()
    result = invoke("list", "--config", str(config))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:3] == ["experiment", "study", "complete"]
    assert lines[1].startswith("tiny *") and "no study yet" in lines[1]
    # the mark is explained under the table
    assert lines[-1] == "* the default experiment (`default:` in the file): the one commands use when none is named"
    assert not (config.parent / "stores").exists()  # no sqlite file was created


def test_list_counts_trials_by_state_and_best(write_experiments: Callable[..., Path]) -> None:
    config = write_experiments(extra={"other": {"data": {"source": "digits"}, "sweep": "sweeps/tiny.yaml",
                                                "storage": "sqlite:///stores/optuna.db"}})
    storage = f"sqlite:///{config.parent / 'stores' / 'optuna.db'}"
    (config.parent / "stores").mkdir()
    fill_study(storage, "tiny")
    result = invoke("list", "--config", str(config))
    assert result.exit_code == 0, result.output
    tiny = next(line for line in result.output.splitlines() if line.startswith("tiny"))
    assert tiny.split()[2:8] == ["tiny", "2", "1", "1", "0", "0.1200"]
    assert "(trial 1)" in tiny
    other = next(line for line in result.output.splitlines() if line.startswith("other"))
    assert "no study yet" in other  # same storage, no study of that name


def test_list_leaves_a_foreign_sqlite_file_untouched(write_experiments: Callable[..., Path]) -> None:
    config = write_experiments()
    (config.parent / "stores").mkdir()
    db = config.parent / "stores" / "optuna.db"
    sqlite3.connect(db).close()  # an empty database: no Optuna tables
    result = invoke("list", "--config", str(config))
    assert "no study yet" in result.output
    with sqlite3.connect(db) as conn:
        assert conn.execute("select count(*) from sqlite_master").fetchone()[0] == 0


def test_list_names_a_bad_config_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["list", "--config", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "nope.yaml" in result.output and "file not found" in result.output


# -- ui ------------------------------------------------------------------------


class _FakeMlflow(BaseHTTPRequestHandler):
    """Answers MLflow's get-by-name for one experiment, 404 for others."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if "experiment_name=pet-sweep%2Ftiny" in self.path:
            body = json.dumps({"experiment": {"experiment_id": "42", "name": "pet-sweep/tiny"}}).encode()
            self.send_response(200)
        else:
            body = b'{"error_code": "RESOURCE_DOES_NOT_EXIST"}'
            self.send_response(404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def fake_mlflow_server() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _FakeMlflow)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ui_with_a_remote_server_prints_its_experiment_url(
        write_experiments: Callable[..., Path], fake_mlflow_server: str, recorded_serve: list[Any]) -> None:
    config = write_experiments(tracking={"uri": fake_mlflow_server + "/"})
    result = invoke("ui", "--config", str(config))
    assert result.exit_code == 0, result.output
    assert f"open {fake_mlflow_server}/#/experiments/42?workflowType=machine_learning" in result.stdout
    assert recorded_serve == []  # nothing started


def test_ui_with_an_unknown_remote_experiment_prints_the_server(
        write_experiments: Callable[..., Path], fake_mlflow_server: str) -> None:
    config = write_experiments(tracking={"uri": fake_mlflow_server, "experiment": "elsewhere"})
    result = invoke("ui", "--config", str(config))
    assert result.exit_code == 0
    assert f"open {fake_mlflow_server}/#/experiments\n" in result.stdout
    assert "no experiment 'elsewhere'" in result.stderr


def test_ui_with_an_unreachable_remote_server_still_prints_it(write_experiments: Callable[..., Path]) -> None:
    server = f"http://127.0.0.1:{free_port()}"
    config = write_experiments(tracking={"uri": server})
    result = invoke("ui", "--config", str(config))
    assert result.exit_code == 0
    assert f"open {server}/#/experiments" in result.stdout
    assert "could not ask the server" in result.stderr


def test_ui_before_any_sweep_says_what_to_run(write_experiments: Callable[..., Path]) -> None:
    config = write_experiments()
    result = CliRunner().invoke(cli, ["ui", "--config", str(config)])
    assert result.exit_code == 2
    assert "no MLflow store" in result.output and "pet-sweep run tiny" in result.output
    assert not (config.parent / "stores").exists()


@pytest.fixture
def tracked(write_experiments: Callable[..., Path]) -> tuple[Path, str]:
    """An experiments file whose MLflow experiment exists (no trial trained)."""
    from pet_sweep.tracking import Tracker

    config = write_experiments()
    exp = load_experiment(config)
    return config, Tracker(exp.tracking_uri, exp.tracking_experiment).experiment_id


def test_ui_starts_mlflow_on_the_store_and_prints_the_experiment_page(
        tracked: tuple[Path, str], recorded_serve: list[Any]) -> None:
    config, experiment_id = tracked
    port = free_port()
    result = invoke("ui", "--config", str(config), "--port", str(port))
    assert result.exit_code == 0, result.output
    assert result.stderr == ""  # loopback: no warning
    [call] = recorded_serve
    cmd = call["cmd"]
    db = (config.parent / "stores" / "mlflow.db").resolve()
    assert call["env"] == {"MLFLOW_BACKEND_STORE_URI": f"sqlite:///{db}"}  # not on the command line (`ps`)
    assert not [arg for arg in cmd if "mlflow.db" in arg]
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == str(port)
    assert cmd[cmd.index("--default-artifact-root") + 1] == (db.parent / "mlartifacts").as_uri()
    url = f"http://127.0.0.1:{port}/#/experiments/{experiment_id}?workflowType=machine_learning"
    assert call["open_url"] == url and f"open {url}" in result.stdout


def test_ui_warns_when_bound_beyond_loopback(tracked: tuple[Path, str], recorded_serve: list[Any]) -> None:
    config, experiment_id = tracked
    port = free_port()
    result = invoke("ui", "--config", str(config), "--host", "0.0.0.0", "--port", str(port))
    assert result.exit_code == 0, result.output
    assert "warning: binding to 0.0.0.0" in result.stderr and "no authentication" in result.stderr
    [call] = recorded_serve
    assert call["cmd"][call["cmd"].index("--host") + 1] == "0.0.0.0"
    assert call["open_url"].startswith(f"http://127.0.0.1:{port}/#/experiments/{experiment_id}")


def test_ui_refuses_a_port_in_use(tracked: tuple[Path, str], recorded_serve: list[Any]) -> None:
    config, _ = tracked
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(cli, ["ui", "--config", str(config), "--port", str(port)])
    assert result.exit_code == 2
    assert f"127.0.0.1:{port}" in result.output and "--port" in result.output
    assert recorded_serve == []


def test_ui_rejects_a_bad_port(write_experiments: Callable[..., Path]) -> None:
    result = CliRunner().invoke(cli, ["ui", "--config", str(write_experiments()), "--port", "70000"])
    assert result.exit_code == 2 and "70000" in result.output


# -- dashboard ---------------------------------------------------------------------


def test_dashboard_missing_says_how_to_install(write_experiments: Callable[..., Path],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = browse.importlib.util.find_spec
    monkeypatch.setattr(browse.importlib.util, "find_spec",
                        lambda name, *a: None if name == "optuna_dashboard" else real_find_spec(name, *a))
    result = CliRunner().invoke(cli, ["dashboard", "--config", str(write_experiments())])
    assert result.exit_code == 2
    assert "optuna-dashboard is not installed" in result.output
    assert "pip install 'pet-sweep[dashboard]'" in result.output


def test_dashboard_opens_the_study_page(write_experiments: Callable[..., Path], recorded_serve: list[Any]) -> None:
    config = write_experiments()
    (config.parent / "stores").mkdir()
    storage = f"sqlite:///{(config.parent / 'stores' / 'optuna.db').resolve()}"
    fill_study(storage, "tiny")
    port = free_port()
    result = invoke("dashboard", "--config", str(config), "--port", str(port), "--host", "0.0.0.0")
    assert result.exit_code == 0, result.output
    assert "warning: binding to 0.0.0.0" in result.stderr
    [call] = recorded_serve
    assert call["env"] == {browse.DASHBOARD_STORAGE_VAR: storage}  # not on the command line (`ps`)
    assert not [arg for arg in call["cmd"] if "optuna.db" in arg]
    assert call["open_url"] == f"http://127.0.0.1:{port}/dashboard/studies/1"


def test_dashboard_without_a_study_says_what_to_run(write_experiments: Callable[..., Path]) -> None:
    result = CliRunner().invoke(cli, ["dashboard", "--config", str(write_experiments())])
    assert result.exit_code == 2
    assert "no study 'tiny'" in result.output and "pet-sweep run tiny" in result.output


def test_host_warning_only_beyond_loopback() -> None:
    assert browse.host_warning("127.0.0.1") is None and browse.host_warning("localhost") is None
    assert browse.host_warning("::1") is None
    assert "0.0.0.0" in (browse.host_warning("0.0.0.0") or "")


# -- the server loop ----------------------------------------------------------------


def test_serve_prints_the_url_once_up_and_stops_the_server_on_sigterm() -> None:
    port = free_port()
    lines: list[str] = []

    def echo(line: str) -> None:
        lines.append(line)
        if line.startswith("(Ctrl-C"):  # the last line before it waits: stop as `kill` or Ctrl-C would
            threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()

    previous = signal.getsignal(signal.SIGTERM)
    code = browse.serve([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                        ready_url=f"http://127.0.0.1:{port}/", open_url="http://example/page", echo=echo)
    assert code == 0
    assert lines[0] == "open http://example/page" and lines[2] == "stopping the server"
    log = Path(lines[1].removeprefix("(Ctrl-C stops the server; its messages go to ").removesuffix(")"))
    assert log.name.startswith("pet-sweep-server-") and not log.exists()  # removed with the server
    assert signal.getsignal(signal.SIGTERM) == previous  # our handler is gone again
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0  # the server is gone


def test_serve_reports_a_server_that_exits_at_once() -> None:
    fails = "import sys; print('Address already in use', file=sys.stderr); raise SystemExit(3)"
    with pytest.raises(browse.ServerError, match="exited with code 3 before it answered; its last messages:\n"
                                                 "Address already in use"):
        browse.serve([sys.executable, "-c", fails], ready_url=f"http://127.0.0.1:{free_port()}/",
                     open_url="-", echo=lambda line: None)


def test_dashboard_server_serves_the_study_on_its_port_and_stops(tmp_path: Path) -> None:
    """optuna-dashboard's `run_server` in the child `dashboard_command` starts: it answers on the
    port and host given, reads the storage from the environment, and is gone after SIGTERM."""
    pytest.importorskip("optuna_dashboard", reason="optuna-dashboard is not installed")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    fill_study(storage, "tiny")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    answers: list[Any] = []

    def echo(line: str) -> None:
        if line.startswith("(Ctrl-C"):  # it answers: ask it for the studies, then stop it as `kill` would
            with urllib.request.urlopen(f"{base}/api/studies", timeout=30) as answer:
                answers.append(json.load(answer))
            threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()

    cmd, env = browse.dashboard_command(storage, "127.0.0.1", port)
    assert not [arg for arg in cmd if "optuna.db" in arg]  # the URL travels in the environment only
    code = browse.serve(cmd, env=env, ready_url=f"{base}/api/studies", open_url=None, echo=echo)
    assert code == 0
    [studies] = answers
    assert [(s["study_name"], s["directions"]) for s in studies["study_summaries"]] == [("tiny", ["minimize"])]
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0  # the server is gone


SERVE_IGNORING_SIGINT = """
import signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)  # what a shell gives a job it starts in the background
from pet_sweep.browse import serve
port = sys.argv[1]
code = serve([sys.executable, "-m", "http.server", port, "--bind", "127.0.0.1"],
             ready_url=f"http://127.0.0.1:{port}/", open_url=f"http://127.0.0.1:{port}/",
             echo=lambda line: print(line, flush=True))
print("exit", code, signal.getsignal(signal.SIGINT) == signal.SIG_IGN, flush=True)
"""


def test_a_ui_started_in_the_background_still_stops_on_sigint() -> None:
    import subprocess

    from tests._sweeps import PROJECT

    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{PROJECT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-c", SERVE_IGNORING_SIGINT, str(port)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip())
        if line.startswith("open "):
            break
    proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    lines += out.splitlines()
    assert proc.returncode == 0 and "stopping the server" in lines, lines
    assert lines[-1] == "exit 0 True", lines  # stopped, and the ignored SIGINT put back as it was
    with socket.socket() as sock:  # the server went with it
        assert sock.connect_ex(("127.0.0.1", port)) != 0
