"""A password in a store URL never leaves the process: not on the console, not in a file,
not in MLflow, not on any process's command line (issue 13, part 1).

The sweep runs on PostgreSQL with a password in the URL (the loopback server trusts local
users and ignores it); MLflow is a sqlite file, and an http tracking URL with a password
is used where no server is needed (`export`, the remote `ui`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Callable

import pytest
import yaml
from click.testing import CliRunner

from pet_sweep import browse
from pet_sweep.cli import cli
from tests._sweeps import FAST_DATA, closed_port, pet_sweep
from tests.test_databases import server_url, with_password

SECRET = "s3cret"


def descendants_argv(root: int) -> dict[int, str]:
    """The command line of every live process descended from `root` (the test's own children)."""
    parent: dict[int, int] = {}
    argv: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # it exited meanwhile
            continue
        parent[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])

    def under(pid: int) -> bool:
        seen = set()
        while pid not in (0, 1) and pid not in seen:
            if pid == root:
                return True
            seen.add(pid)
            pid = parent.get(pid, 0)
        return False

    return {pid: text for pid, text in argv.items() if pid != root and under(pid)}


class ArgvWatch:
    """Samples the command lines of the test's child processes until stopped."""

    def __init__(self) -> None:
        self.seen: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def sample(self) -> None:
        self.seen.update(descendants_argv(os.getpid()))

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            self.sample()

    def stop(self) -> dict[int, str]:
        self._stop.set()
        self._thread.join()
        return self.seen


def invoke(capfd: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """A command in this process, with every byte it wrote to stdout and stderr (libraries' too)."""
    result = CliRunner().invoke(cli, list(args))
    out, err = capfd.readouterr()
    return result.exit_code, result.output + out + err + (repr(result.exception) if result.exception else "")


def serve_until_open(*args: str, watch: ArgvWatch) -> tuple[str, dict[int, str]]:
    """Start `pet-sweep ui`/`dashboard`, read every argv once it serves, stop it as Ctrl-C would."""
    proc = pet_sweep(*args)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:  # ends when it exits: a server that fails to start fails the test below
        lines.append(line)
        if line.startswith("open "):
            break
    argv = descendants_argv(os.getpid())
    watch.sample()
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # it should stop in seconds: say what it printed, not wait on
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"{args[0]} did not stop on SIGINT within 120 s:\n" + "".join(lines) + out + err) from None
    output = "".join(lines) + out + err
    assert any(line.startswith("open ") for line in lines), output
    return output, argv


def mlflow_texts(tracking_uri: str, experiment: str, into: Path) -> list[str]:
    """Every param, tag, metric name and run name of the experiment, and every artifact's bytes."""
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    texts = [repr(found.tags)]
    runs = client.search_runs([found.experiment_id])
    assert {r.data.tags.get("pet_sweep.role") for r in runs} >= {"sweep", "trial", "replay"}
    for run in runs:
        texts += [run.info.run_name, repr(run.data.params), repr(run.data.tags), repr(run.data.metrics)]
        local = Path(download_artifacts(run_id=run.info.run_id, dst_path=str(into / run.info.run_id),
                                        tracking_uri=tracking_uri))
        texts += [p.read_bytes().decode(errors="replace") for p in local.rglob("*") if p.is_file()]
    return texts


@pytest.mark.postgres
@pytest.mark.slow
def test_a_storage_password_is_nowhere(write_experiments: Callable[..., Path], tmp_path: Path,
                                       capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    storage = with_password(server_url("postgres"), SECRET)
    name = f"s{uuid.uuid4().hex[:10]}"  # the server keeps other tests' studies
    # as the README's "Scale out" sets it: in the environment, so that experiments.yaml holds no secret either
    monkeypatch.setenv("PET_SWEEP_STORAGE", storage)
    config = write_experiments(study_name=name, data=FAST_DATA | {"test_pct": 0.1}, budget={"n_trials": 1})
    tracking_uri = f"sqlite:///{(config.parent / 'stores' / 'mlflow.db').resolve()}"
    remote = f"http://user:{SECRET}@127.0.0.1/"  # no port: urllib would read the password as one
    best, remote_best = tmp_path / "best.yaml", tmp_path / "remote.yaml"
    monkeypatch.delenv("PET_SWEEP_TRACKING_URI", raising=False)
    watch = ArgvWatch()
    console: list[str] = []
    try:
        for args, code in [(("run",), 0), (("list",), 0), (("report",), 0), (("export", "-o", str(best)), 0),
                           (("export", "-o", str(remote_best), "--tracking-uri", remote), 0),
                           (("ui", "--tracking-uri", remote), 0)]:
            rc, output = invoke(capfd, *args[:1], "--config", str(config), *args[1:])
            console.append(output)
            assert rc == code, output
        for exported in (yaml.safe_load(best.read_text()), yaml.safe_load(remote_best.read_text())):
            assert ":***@" in exported["source"]["storage"], exported  # the provenance stays, not the secret
        rc, output = invoke(capfd, "train", str(best))
        console.append(output)
        assert rc == 0, output
        # the exported remote URL has no password left: train asks for it
        rc, output = invoke(capfd, "train", str(remote_best))
        console.append(output)
        assert rc == 2 and "PET_SWEEP_TRACKING_URI" in output and "tracking.uri" in output, output
        assert "open http://user:***@127.0.0.1/#/experiments" in console[5], console[5]
        output, ui_argv = serve_until_open("ui", "--config", str(config), "--port", str(closed_port()), watch=watch)
        console.append(output)
        assert not [a for a in ui_argv.values() if tracking_uri in a], ui_argv  # the store is in the environment
        output, dashboard_argv = serve_until_open("dashboard", "--config", str(config),
                                                  "--port", str(closed_port()), watch=watch)
        console.append(output)
        # the dashboard ran (optuna-dashboard's run_server, in a child process): its storage came by the environment
        assert any("run_server" in a for a in dashboard_argv.values()), dashboard_argv
    finally:
        seen = watch.stop()
    assert [] == [text for text in console if SECRET in text]
    assert [] == [pid for pid, text in seen.items() if SECRET in text], seen
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".db"  # the stores aside
              and SECRET.encode() in p.read_bytes()]
    assert leaked == []
    texts = mlflow_texts(tracking_uri, "pet-sweep/tiny", tmp_path / "downloaded")
    assert [] == [text for text in texts if SECRET in text]


def test_a_server_log_tail_hides_the_store_password() -> None:
    url = f"postgresql://postgres:{SECRET}@127.0.0.1:1/test"
    says = "import os, sys; print('cannot connect to', os.environ['STORE']); raise SystemExit(1)"
    with pytest.raises(browse.ServerError) as failed:
        browse.serve([sys.executable, "-c", says], env={"STORE": url},
                     ready_url=f"http://127.0.0.1:{closed_port()}/", open_url="-", echo=lambda line: None)
    assert "cannot connect to postgresql://postgres:***@127.0.0.1:1/test" in str(failed.value)
    assert SECRET not in str(failed.value)


def test_study_state_note_hides_the_password(write_experiments: Callable[..., Path],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"postgresql://postgres:{SECRET}@127.0.0.1:{closed_port()}/test"

    def refuse(given: str) -> None:  # some drivers quote the URL they were given
        raise RuntimeError(f"cannot connect to {given}")

    monkeypatch.setattr(browse, "_open_storage_readonly", refuse)
    result = CliRunner().invoke(cli, ["list", "--config", str(write_experiments(storage=url))])
    assert result.exit_code == 0, result.output
    assert "cannot read: cannot connect to postgresql://postgres:***@" in result.output, result.output
    assert SECRET not in result.output


def test_train_uploads_its_config_without_passwords(tmp_path: Path) -> None:
    from pet_sweep.replay import _without_passwords, load_replay

    # a hand-written (or older) config may hold the passwords export no longer writes
    path = tmp_path / "best.yaml"
    path.write_text(yaml.safe_dump({
        "format": "pet-sweep/replay-1", "name": "x", "data": {"source": "digits"}, "model": {"img_size": 16},
        "source": {"experiment": "x", "study": "x", "trial": 0,
                   "storage": f"postgresql://postgres:{SECRET}@db/optuna"},
        "params": {"arch": "resnet18", "base_lr": 0.01, "lr_hi": 0.01, "lr_lo": 0.001, "freeze_epochs": 0,
                   "epochs": 1},
        "tracking": {"uri": f"http://user:{SECRET}@mlflow:5000"}}))
    cfg, _ = load_replay(path)
    (tmp_path / "upload").mkdir()
    copy = _without_passwords(path, cfg, tmp_path / "upload")
    text = copy.read_text()
    assert copy.name == "best.yaml" and SECRET not in text
    assert "postgresql://postgres:***@db/optuna" in text and "http://user:***@mlflow:5000" in text
