"""Where users look: the MLflow UI and optuna-dashboard on an experiment's stores,
and a summary of every study (`pet-sweep list`).

The servers are the tools' own (`mlflow server`, optuna-dashboard's `run_server`), started as
child processes in their own process group so that Ctrl-C stops them and every
worker they spawned. They bind to 127.0.0.1 unless told otherwise: neither has
any authentication.

Reading a store never creates one: a missing sqlite file is reported as such,
and Optuna storages are opened without creating tables.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from pet_sweep.config import Experiment, load_experiment, load_experiments_file
from pet_sweep.errors import PetSweepError, StudyError
from pet_sweep.invocation import command
from pet_sweep.selection import BASELINE_ATTR
from pet_sweep.tracking import artifact_root, experiment_id, open_http, redact_url, redact_url_in, sqlite_path

LOOPBACK = ("127.0.0.1", "localhost", "::1")
# MLflow 3's UI opens on its GenAI (traces) pages unless told it is model training,
# where the runs table with the sweep and its nested trials is.
MLFLOW_VIEW = "?workflowType=machine_learning"
DASHBOARD_INSTALL = "pip install 'pet-sweep[dashboard]'"
# A server's command line and the variables that carry its store URL: `ps` shows every
# user of the machine the command line, the environment only to its owner.
Command = tuple[list[str], dict[str, str]]


class ServerError(PetSweepError):
    """A UI server cannot be started (port taken, tool missing, it exited)."""


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def host_warning(host: str) -> str | None:
    """The warning for binding a UI beyond this machine (None on loopback)."""
    if host in LOOPBACK:
        return None
    return (f"warning: binding to {host} makes the UI reachable from other machines, "
            "with no authentication; use the default 127.0.0.1 unless you mean it")


def url_host(host: str) -> str:
    """The host part of a URL a browser on this machine can open."""
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


# -- MLflow ---------------------------------------------------------------------


def mlflow_experiment_id(exp: Experiment) -> str:
    """The MLflow experiment id of `exp` in its (local or database) tracking store."""
    db = sqlite_path(exp.tracking_uri)
    if db is not None and not db.exists():
        raise StudyError(f"no MLflow store at {db}; run `{command('run', exp.name)}` first")
    found = experiment_id(exp.tracking_uri, exp.tracking_experiment)
    if found is None:
        raise StudyError(f"no MLflow experiment {exp.tracking_experiment!r} in {redact_url(exp.tracking_uri)}; "
                         f"run `{command('run', exp.name)}` first")
    return found


def mlflow_experiment_url(base: str, experiment_id: str) -> str:
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}{MLFLOW_VIEW}"


def remote_experiment_url(server: str, experiment: str, timeout: float = 5.0) -> tuple[str, str | None]:
    """The URL of `experiment` on a remote MLflow server, and a note when its page cannot be found.

    Asks the server's REST API for the id; when the server cannot be reached or
    has no such experiment, the server's own address is still worth printing.
    """
    base = server.rstrip("/")
    query = urllib.parse.urlencode({"experiment_name": experiment})
    try:
        with open_http(f"{base}/api/2.0/mlflow/experiments/get-by-name?{query}", timeout) as answer:
            experiment_id = json.load(answer)["experiment"]["experiment_id"]
    except urllib.error.HTTPError as err:
        note = {404: f"the server has no experiment {experiment!r} yet",
                401: "the server asks for a login", 403: "the server asks for a login"}.get(
                    err.code, f"the server answered HTTP {err.code}")
        return f"{base}/#/experiments", note
    except (OSError, ValueError, KeyError) as err:  # unreachable, timeout, not MLflow's JSON
        return f"{base}/#/experiments", (f"could not ask the server for experiment {experiment!r}: "
                                         f"{redact_url_in(str(err), server)}")
    return mlflow_experiment_url(base, experiment_id), None


def mlflow_command(tracking_uri: str, host: str, port: int) -> Command:
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port),
           # one worker is plenty for one user and spares the machine that trains
           "--workers", "1",
           # a log line per request would bury the URL we print
           "--uvicorn-opts", "--no-access-log"]
    root = artifact_root(tracking_uri)
    if root is not None:
        # experiments created from the UI keep their artifacts beside the database too
        cmd += ["--default-artifact-root", root]
    return cmd, {"MLFLOW_BACKEND_STORE_URI": tracking_uri}  # `mlflow server`'s own variable


# -- optuna-dashboard -----------------------------------------------------------


DASHBOARD_STORAGE_VAR = "PET_SWEEP_DASHBOARD_STORAGE"
# optuna-dashboard's public entry point, `run_server(storage, host, port)`, in a child process of
# its own (so that stopping it stops all it started); the storage URL comes from the environment,
# so the process's visible command line never holds it. Host and port are its arguments.
_DASHBOARD_MAIN = ("import os, sys\n"
                   "from optuna_dashboard import run_server\n"
                   f"run_server(os.environ.pop({DASHBOARD_STORAGE_VAR!r}), host=sys.argv[1], port=int(sys.argv[2]))\n")


def require_dashboard() -> None:
    """Refuse at once, saying how to install it, when optuna-dashboard is missing."""
    if importlib.util.find_spec("optuna_dashboard") is None:
        raise ServerError(f"optuna-dashboard is not installed; install it with: {DASHBOARD_INSTALL}")


def dashboard_command(storage_url: str, host: str, port: int) -> Command:
    return ([sys.executable, "-c", _DASHBOARD_MAIN, host, str(port)],
            {DASHBOARD_STORAGE_VAR: storage_url})


# -- pet-sweep list ---------------------------------------------------------------


@dataclass(frozen=True)
class StudyState:
    """One experiment's study as its storage holds it."""

    experiment: str
    study_name: str
    storage: str  # redacted
    found: bool
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    running: int = 0
    best_value: float | None = None
    best_trial: int | None = None
    study_id: int | None = None
    note: str = ""  # why the study could not be read
    best_config: str = ""  # the best config over its seeds and the baseline's mean, where the selection ran them


def _open_storage_readonly(url: str) -> Any:
    import optuna  # heavy: optuna and SQLAlchemy, not needed by `ui`

    # no table creation, no migration check: `list` must leave every store as it found it
    return optuna.storages.RDBStorage(url, skip_compatibility_check=True, skip_table_creation=True)


# how SQLite, PostgreSQL and MySQL say a table is missing
_NO_TABLE = ("no such table", "does not exist", "doesn't exist")


def _root_cause(err: BaseException) -> BaseException:
    # Optuna wraps SQLAlchemy's error (which names the problem) in StorageInternalError
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def study_state(exp: Experiment, storages: dict[str, Any] | None = None) -> StudyState:
    """Read `exp`'s study (trial counts by state, best error rate) without creating anything."""
    from optuna.trial import TrialState  # heavy: optuna

    url = exp.storage_url
    base = {"experiment": exp.name, "study_name": exp.study_name, "storage": redact_url(url)}
    db = sqlite_path(url)
    if db is not None and not db.exists():
        return StudyState(**base, found=False)
    storages = {} if storages is None else storages
    try:
        if url not in storages:
            storages[url] = _open_storage_readonly(url)
        storage = storages[url]
        study_id = storage.get_study_id_from_name(exp.study_name)
        trials = storage.get_all_trials(study_id, deepcopy=False)
    except KeyError:
        return StudyState(**base, found=False)
    except Exception as err:  # SQLAlchemy/driver errors: server down, not an Optuna database
        root = _root_cause(err)
        message = str(root).splitlines()[0][:200] if str(root) else type(root).__name__
        if any(sign in message for sign in _NO_TABLE):  # a database Optuna never wrote to
            return StudyState(**base, found=False)
        return StudyState(**base, found=False, note=f"cannot read: {redact_url_in(message, url)}")
    counts = {state: sum(t.state == state for t in trials)
              for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)}
    # values[0]: the error rate; the baseline (fastai's fine_tune defaults) is a reference, never the best
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.values and not t.user_attrs.get(BASELINE_ATTR)]
    best = min(done, key=lambda t: (t.values[0], t.number)) if done else None
    return StudyState(**base, found=True, complete=counts[TrialState.COMPLETE], pruned=counts[TrialState.PRUNED],
                      failed=counts[TrialState.FAIL], running=counts[TrialState.RUNNING],
                      best_value=None if best is None else float(best.values[0]),
                      best_trial=None if best is None else best.number, study_id=study_id,
                      best_config=_best_config(trials, exp.config.seed))


def _best_config(trials: list[Any], seed: int) -> str:
    """``config 3: 12.2% ± 3.1% (sd) over 2 seeds (trials 3, 5); baseline 16.4%``: what `list` shows in the
    place of the best trial where configs ran on several seeds or a baseline ran."""
    from pet_sweep.report.seeds import selection_of  # heavy: optuna, through sweep.confirm
    from pet_sweep.sweep.confirm import completed_runs

    sel = selection_of(completed_runs(trials, seed))
    if sel is None:
        return ""
    base = f"; baseline {sel.baseline.mean:.1%} over {sel.baseline.n_seeds} seed(s)" if sel.baseline else ""
    return f"{sel.best.name}: {sel.best.text()}{base}"


def list_studies(config_path: str, storage: str | None = None) -> tuple[list[StudyState], str | None]:
    """Every experiment of the file with its study's state, and the file's default
    (`storage`: one storage for them all, as `--storage` gives `run`)."""
    parsed, path = load_experiments_file(config_path)
    storages: dict[str, Any] = {}
    states = [study_state(load_experiment(path, name).with_overrides(storage=storage), storages)
              for name in parsed.experiments]
    for storage in storages.values():
        storage.engine.dispose()
    return states, parsed.default


DEFAULT_LEGEND = "* the default experiment (`default:` in the file): the one commands use when none is named"


def format_states(states: Sequence[StudyState], default: str | None) -> list[str]:
    """The table `pet-sweep list` prints."""
    header = ("experiment", "study", "complete", "pruned", "failed", "running", "best error_rate", "storage")
    rows = [header]
    for s in states:
        name = s.experiment + (" *" if s.experiment == default else "")
        if not s.found:
            rows.append((name, s.study_name, "", "", "", "", s.note or "no study yet", s.storage))
            continue
        best = s.best_config or (f"{s.best_value:.4f} (trial {s.best_trial})" if s.best_value is not None else "-")
        rows.append((name, s.study_name, str(s.complete), str(s.pruned), str(s.failed), str(s.running),
                     best, s.storage))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
    if any(s.experiment == default for s in states):
        lines.append(DEFAULT_LEGEND)
    return lines


# -- running a server -------------------------------------------------------------


def check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # as the servers do: a port left in TIME_WAIT by a UI stopped a moment ago is free
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            raise ServerError(f"cannot listen on {host}:{port} ({err.strerror}); "
                              "choose another port with --port") from None


def wait_until_up(url: str, proc: subprocess.Popen[bytes], timeout: float, log: Path | None = None,
                  hide: Iterable[str] = ()) -> None:
    """Poll `url` until the server answers; fail when the child exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            said = log_tail(log, hide) if log else ""
            raise ServerError(f"the server exited with code {proc.returncode} before it answered"
                              + (f"; its last messages:\n{said}" if said else ""))
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers, even if not 200
        except OSError:
            time.sleep(0.3)
    raise ServerError(f"the server did not answer at {url} within {timeout:.0f}s")


def log_tail(log: Path, hide: Iterable[str] = (), lines: int = 15) -> str:
    """The log's last lines, without the passwords of the URLs in `hide` (a server may quote its store)."""
    try:
        text = "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
    for url in hide:
        text = redact_url_in(text, url)
    return text


def stop(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """Stop the server and the workers it started (its whole process group)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def open_ui(title: str, command: Command, host: str, port: int, *, ready_path: str, page_path: str | None,
            echo: Callable[[str], None], ready_lines: Sequence[str] = ()) -> int:
    """Start a UI server on `host`:`port`, print the page to open (none for a server with no
    page: `ready_lines` say how to use it), run until Ctrl-C."""
    check_port_free(host, port)
    base = f"http://{url_host(host)}:{port}"
    echo(f"starting {title}")
    cmd, env = command
    return serve(cmd, env=env, ready_url=base + ready_path, open_url=None if page_path is None else base + page_path,
                 echo=echo,
                 ready_lines=[line.replace("BASE", base) for line in ready_lines])


def serve(cmd: list[str], *, env: dict[str, str] | None = None, ready_url: str, open_url: str | None,
          echo: Callable[[str], None], startup_timeout: float = 120.0, ready_lines: Sequence[str] = ()) -> int:
    """Run a UI server until Ctrl-C (or SIGTERM); print `open_url` once it answers.

    The server's own start-up and request messages go to a log file, so the URL to
    open is not buried among them; a server that fails to start shows its last lines.
    `env`: variables added to the server's environment (its store URLs, kept off its
    command line and out of the lines shown).
    """
    env = env or {}
    log_file = tempfile.NamedTemporaryFile(prefix="pet-sweep-server-", suffix=".log", delete=False)
    log = Path(log_file.name)
    # own session: Ctrl-C reaches only us, and we stop the whole group (uvicorn/gunicorn workers)
    with log_file:
        proc = subprocess.Popen(cmd, start_new_session=True, stdout=log_file, stderr=subprocess.STDOUT,
                                env={**os.environ, **env})

    def terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    # started from a script in the background (`pet-sweep ui &`), SIGINT comes ignored (POSIX): Ctrl-C,
    # or the SIGINT a supervisor sends, must still stop the server
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        wait_until_up(ready_url, proc, startup_timeout, log, env.values())
        if open_url is not None:
            echo(f"open {open_url}")
        for line in ready_lines:  # what to do with it, once it answers
            echo(line)
        echo(f"(Ctrl-C stops the server; its messages go to {log})")
        code = proc.wait()
        if code:
            echo(f"the server stopped with code {code}; its last messages:\n{log_tail(log, env.values())}")
        return code
    except KeyboardInterrupt:
        echo("stopping the server")
        return 0
    finally:
        stop(proc)
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
        log.unlink(missing_ok=True)
