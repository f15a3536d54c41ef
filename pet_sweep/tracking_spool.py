"""When the MLflow tracking server goes away: a sweep's writes kept on disk, replayed in order.

A sweep's `Tracker` on an ``http(s)://`` server writes through a `Gate`. While the
server answers, each write (a run created, a batch of metrics, params and tags, an
artifact, a run ended) goes to it at once. When a write fails and the server does not
answer its ``/health``, or the watcher thread (a probe every `PROBE_S`) finds it gone,
the gate says so on the console and every write after it goes to this process's
spool file instead, so training never waits on, or dies of, the tracking server.
When the server answers again the spool is replayed, in order, before any new write.

The spool is a folder beside the Optuna storage (`spool_dir`), one JSON-lines file per
process, flock-ed by its writer for its life. Lines already sent are counted in a
``.sent`` file beside it (so a replay cut short goes on where it stopped, and nothing
is sent twice but, at worst, the one write a crash interrupted, which MLflow's metric
store deduplicates: same key, step, timestamp, value); the real run ids of runs created
while the server was away are kept in ``.ids``. A file whose writer is gone (killed,
or ended with the server still away) is replayed by the next `run`, `report` or
`pet-sweep sync` (`sync_spool`).
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import re
import shutil
import sys
import threading
import time
import urllib.error
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

from pet_sweep.errors import StudyError
from pet_sweep.urls import open_http, redact_url, redact_url_in, sqlite_path

PROBE_S = 5.0          # seconds between the watcher's /health probes
REPEAT_S = 60.0        # the "still unreachable" line, at most this often
PROBE_TIMEOUT_S = 3.0
# MLflow's client retries a failed request 7 times with a growing back-off (minutes) and
# waits 120 s for an answer: a sweep's writes would hang that long before the spool takes
# them. Read by mlflow.utils.rest_utils.http_request at each request; a user's own values win.
CLIENT_BOUNDS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
LOCAL_PREFIX = "spooled-"  # the id of a run created while the server was away, until it is replayed

Op = dict[str, Any]


def is_server(tracking_uri: str) -> bool:
    return tracking_uri.split(":", 1)[0] in ("http", "https")


def spool_dir(storage_url: str, tracking_uri: str) -> Path:
    """The spool of a tracking server: beside the Optuna storage's sqlite file, else in the user's cache."""
    db = sqlite_path(storage_url)
    base = db.parent.resolve() if db is not None else Path.home() / ".cache" / "pet-sweep"
    server = re.sub(r"[^A-Za-z0-9.-]+", "_", redact_url(tracking_uri).split("://", 1)[-1].rsplit("@", 1)[-1])
    return base / "mlflow-spool" / server.strip("_")


def answers(tracking_uri: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the server answers ``/health`` (a 5xx, a proxy before a restarting server, is no answer)."""
    try:
        with open_http(tracking_uri.rstrip("/") + "/health", timeout=timeout):
            return True
    except urllib.error.HTTPError as err:
        return err.code < 500
    except (OSError, ValueError):
        return False


def undelivered(err: BaseException) -> bool:
    """Did the write get no answer of the server's own? It timed out (a server too busy to answer in
    MLFLOW_HTTP_REQUEST_TIMEOUT), failed in the client before an answer, or got a 5xx. Such a write is
    spooled and sent again, even while /health answers: at 128 workers an MLflow server answered
    /health at once and timed out creating runs, and each of those trials had failed. Only a 4xx (the
    server refused this write) is not. A write that timed out may have been applied: sent again, a
    created run may exist twice; the copy is closed with the sweep's other stale runs."""
    from mlflow.exceptions import MlflowException, RestException  # heavy: mlflow

    if isinstance(err, RestException):
        return err.get_http_status_code() >= 500
    if isinstance(err, MlflowException):
        text = str(err)
        return ("failed with timeout exception" in text or "failed with exception" in text
                or err.get_http_status_code() >= 500)
    return isinstance(err, OSError)  # requests' ConnectionError and Timeout, socket errors


WHERE_TRACKING = "tracking.uri, --tracking-uri or PET_SWEEP_TRACKING_URI"
_ANSWERED: set[str] = set()  # servers that answered in this process: asked once, not by every caller


def check_server(tracking_uri: str, timeout: float = 10.0) -> None:
    """Refuse at once an ``http(s)://`` tracking server that does not answer.

    MLflow's client retries a refused connection for minutes (7 tries, growing
    back-off) before it raises, and only then would a run find out. Any HTTP
    answer, even an error status, means a server is there; only a connection that
    fails or times out is refused. MLflow keeps its own retries for the sweep itself,
    so a server that restarts mid-sweep is waited for (and one that answered once in
    this process is not asked again: `run` checks before building the data, `Tracker` after).
    """
    if urlsplit(tracking_uri).scheme not in ("http", "https") or tracking_uri in _ANSWERED:
        return
    try:
        with open_http(tracking_uri.rstrip("/") + "/health", timeout=timeout):
            _ANSWERED.add(tracking_uri)
            return
    except urllib.error.HTTPError:
        _ANSWERED.add(tracking_uri)
        return  # an answer: a server (perhaps behind a proxy or asking for a login) is there
    except (OSError, ValueError) as err:  # URLError, refused, timed out, bad host
        reason = getattr(err, "reason", err)
        raise StudyError(f"cannot reach the MLflow tracking server {redact_url(tracking_uri)} "
                         f"({redact_url_in(str(reason), tracking_uri)}); "
                         f"start it, or point {WHERE_TRACKING} at one that runs") from None


def apply(client: Any, op: Op, ids: Mapping[str, str]) -> str | None:
    """Send one write to MLflow (a run id in it that was spooled is replaced by its real one);
    a created run's id is returned."""
    from mlflow.entities import Metric, Param, RunTag  # heavy: mlflow

    run = ids.get(op.get("run", ""), op.get("run"))
    kind = op["op"]
    if run is not None and run.startswith(LOCAL_PREFIX):  # its creation was kept by no spool: no such run
        return None
    if kind == "create_run":
        tags = {k: ids.get(v, v) for k, v in op["tags"].items()}
        return client.create_run(op["experiment_id"], start_time=op["time"], tags=tags,
                                 run_name=op["run_name"]).info.run_id
    if kind == "log_batch":
        client.log_batch(run, metrics=[Metric(k, v, ts, step) for k, v, ts, step in op.get("metrics", ())],
                         params=[Param(k, v) for k, v in op.get("params", ())],
                         tags=[RunTag(k, v) for k, v in op.get("tags", ())])
    elif kind == "terminate":
        client.set_terminated(run, status=op["status"], end_time=op["time"])
    elif kind == "artifact":
        client.log_artifact(run, op["path"], op.get("artifact_path"))
    else:
        raise ValueError(f"unknown spooled write {kind!r}")
    return None


class SpoolFile:
    """One process's spooled writes: ``<stem>.jsonl``, ``<stem>.sent`` (lines sent), ``<stem>.ids``."""

    def __init__(self, path: Path, handle: Any = None) -> None:
        self.path, self._handle = path, handle
        self.ids: dict[str, str] = {}
        self.n = len(self.ops()) if path.exists() else 0  # writes in the file
        self.done = int(self.sent_path.read_text() or 0) if self.sent_path.exists() else 0  # of them sent
        if self.ids_path.exists():
            self.ids = dict(json.loads(line) for line in self.ids_path.read_text().splitlines() if line)

    ids_path = property(lambda self: self.path.with_suffix(".ids"))
    sent_path = property(lambda self: self.path.with_suffix(".sent"))
    files = property(lambda self: self.path.parent / "files" / self.path.stem)

    @classmethod
    def create(cls, folder: Path) -> "SpoolFile":
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{time.time_ns()}-{os.getpid()}.jsonl"
        handle = path.open("a", encoding="utf-8")
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held for this process's life: not replayed by others
        return cls(path, handle)

    def add(self, op: Op) -> None:
        if op["op"] == "artifact":  # the file may be a temporary one: keep a copy
            copy = self.files / uuid.uuid4().hex / Path(op["path"]).name
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(op["path"], copy)
            op = {**op, "path": str(copy)}
        self._handle.write(json.dumps(op) + "\n")
        self._handle.flush()
        self.n += 1

    def ops(self) -> list[Op]:
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def pending(self) -> int:
        return self.n - self.done

    def replay(self, send: Callable[[Op, Mapping[str, str]], str | None]) -> int:
        """Send the writes not yet sent, in order; stops at the first that fails (raised). Returns how many."""
        first = self.done
        for op in self.ops()[self.done:]:
            created = send(op, self.ids)
            if op["op"] == "create_run" and created:
                self.ids[op["local"]] = created
                with self.ids_path.open("a") as out:
                    out.write(json.dumps([op["local"], created]) + "\n")
            self.done += 1
            self.sent_path.write_text(str(self.done))
        if self._handle is None:  # another process's, all sent: gone, but for the ids
            self.remove()
        return self.done - first

    def skip(self) -> None:
        """Count the next write as sent without sending it (one the server refuses)."""
        self.done += 1
        self.sent_path.write_text(str(self.done))

    def remove(self) -> None:
        """Delete the sent writes and their copied artifacts (the ids stay: Optuna may hold a spooled one)."""
        self.path.unlink(missing_ok=True)
        self.sent_path.unlink(missing_ok=True)
        shutil.rmtree(self.files, ignore_errors=True)


def sync_spool(folder: Path, client: Any, skip: Path | None = None) -> tuple[int, int]:
    """Replay the spool files of writers that are gone (a live writer holds its file's lock):
    (writes sent, files whose writer still runs). Raises at the first write the server refuses."""
    sent = busy = 0
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else ():
        if path == skip:
            continue
        with path.open("a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                busy += 1
                continue
            sent += SpoolFile(path).replay(functools.partial(apply, client))
    return sent, busy


def resolve(folder: Path, run_id: str) -> str:
    """The real id of a run created while the server was away (itself for any other)."""
    if not run_id.startswith(LOCAL_PREFIX) or not folder.is_dir():
        return run_id
    for ids in folder.glob("*.ids"):
        for line in ids.read_text().splitlines():
            local, real = json.loads(line)
            if local == run_id:
                return real
    return run_id


def _duration(seconds: float) -> str:
    """``45s``, ``7m02s``: how long the server has been away."""
    whole = int(seconds)
    return f"{whole}s" if whole < 60 else f"{whole // 60}m{whole % 60:02d}s"


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Gate:
    """Writes to the server while it answers, to the spool while it does not; says which, once a minute."""

    def __init__(self, client: Any, tracking_uri: str, folder: Path, max_outage: float | None = None,
                 notify: Callable[[str], None] = say) -> None:
        for name, value in CLIENT_BOUNDS.items():
            os.environ.setdefault(name, value)
        self._mlflow, self.uri, self.folder, self.notify = client, tracking_uri, folder, notify
        self.shown = redact_url(tracking_uri)
        self.limit = ("" if max_outage is None else
                      f"; the sweep stops if it stays away past tracking.max_outage {max_outage:g}s")
        self.down_since: float | None = None
        self._said = 0.0
        self._spool: SpoolFile | None = None
        self._locals: set[str] = set()  # the spooled ids of runs this gate created
        self._lock = threading.RLock()
        self._stop = threading.Event()
        # started by the first write: a sweep that stops before it (its parent run refused) leaves no thread
        self._watcher = threading.Thread(target=self._watch, name="pet-sweep-mlflow-watch", daemon=True)

    def down_for(self) -> float:
        return 0.0 if self.down_since is None else time.monotonic() - self.down_since

    def pending(self) -> int:
        return self._spool.pending() if self._spool is not None else 0

    def write(self, op: Op) -> str | None:
        """Send `op` (or spool it); a created run's id, a ``spooled-...`` one while the server is away."""
        if op["op"] == "create_run":
            op = {"local": LOCAL_PREFIX + uuid.uuid4().hex, **op}
            self._locals.add(op["local"])
        elif str(op.get("run", "")).startswith(LOCAL_PREFIX) and op["run"] not in self._locals:
            op = {**op, "run": resolve(self.folder, op["run"])}  # another process's (a dead worker's trial)
        with self._lock:
            if not self._watcher.is_alive() and not self._stop.is_set():
                self._watcher.start()
            if self.down_since is None and self.pending():
                self._replay()
            if self.down_since is None:
                try:
                    return apply(self._mlflow, op, self._ids())
                except Exception as err:  # noqa: BLE001 - MlflowException, requests' errors: asked below
                    if not undelivered(err) and answers(self.uri):
                        raise  # the server is there and refused this write: a bug to see, as before
                    self._went_down(err)
            if self._spool is None:
                self._spool = SpoolFile.create(self.folder)
            self._spool.add(op)
            return op.get("local")

    def resolve(self, run_id: str) -> str:
        return self._ids().get(run_id, run_id)

    def _ids(self) -> Mapping[str, str]:
        return self._spool.ids if self._spool is not None else {}

    def _went_down(self, err: BaseException | None = None) -> None:
        self.down_since, self._said = time.monotonic(), time.monotonic()
        self.notify(f"tracking     the MLflow server {self.shown} is unreachable: training goes on, its "
                    f"runs are kept in {self.folder} and sent when it answers{self.limit}")

    def _replay(self) -> None:
        """Send the spool; the server is back when all of it went (the "back" line), else still down."""
        down = self.down_for()
        n = self.pending()
        while self._spool is not None and self._spool.pending():
            try:
                self._spool.replay(functools.partial(apply, self._mlflow))
            except Exception as err:  # noqa: BLE001 - MlflowException, requests' errors: asked below
                if not answers(self.uri):  # gone again: the rest waits for the next answer
                    if self.down_since is None:
                        self._went_down()
                    return
                self._spool.skip()  # the server is there and refuses this one write: the others go on
                self.notify(f"tracking     the MLflow server {self.shown} refused a kept write "
                            f"({redact_url_in(str(err).splitlines()[0][:200] if str(err) else type(err).__name__, self.uri)}); "
                            "left out")
        if self.down_since is not None:
            self.notify(f"tracking     the MLflow server {self.shown} answers again after {_duration(down)}: "
                        f"sent the {n} write(s) kept meanwhile")
        self.down_since = None

    def _watch(self) -> None:
        while not self._stop.wait(PROBE_S):
            up = answers(self.uri)
            with self._lock:
                if up and self.down_since is not None:
                    self._replay()
                elif not up and self.down_since is None:
                    self._went_down()
                elif not up and time.monotonic() - self._said >= REPEAT_S:
                    self._said = time.monotonic()
                    self.notify(f"tracking     the MLflow server {self.shown} is still unreachable "
                                f"(down {_duration(self.down_for())}): training goes on, its runs are kept "
                                f"in {self.folder}{self.limit}")

    def close(self) -> None:
        """Stop watching; one last replay if the server answers; say what is left in the spool."""
        self._stop.set()
        with self._lock:
            if self.pending() and answers(self.uri):
                self._replay()
            if self._spool is not None and not self.pending():
                self._spool.remove()
            elif self._spool is not None:
                self.notify(f"tracking     {self.pending()} write(s) to the MLflow server {self.shown} are kept in "
                            f"{self.folder}; the next `pet-sweep run`, `report` or `pet-sweep sync` sends them")
