"""The Optuna storage: opening it (SQLite, PostgreSQL, MySQL/MariaDB, journal file),
the heartbeat callback that retries a dead worker's trial, opening the study, and
the check that a resumed study still sees the split it started with."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage
from optuna.trial import FrozenTrial

from pet_sweep.config import JOURNAL_PREFIX, Experiment, FaultsConfig
from pet_sweep.errors import DataError, StudyError
from pet_sweep.invocation import command
from pet_sweep.sweep.records import SPLIT_ATTR, STALE_REASON, experimental_relied_on, retry_history
from pet_sweep.sweep.search import make_pruner, make_sampler
from pet_sweep.tracking import RUN_ID_ATTR, Tracker, redact_url, redact_url_in, sqlite_path
from pet_sweep.train.data import SplitFingerprint


class StaleTrialHandler:
    """Storage callback for a trial whose worker died: retry it and close its MLflow run.

    Optuna calls it from `fail_stale_trials` in whichever worker notices first; the
    trial's MLflow run id is in its user attrs, so that worker closes the run.
    `tracker` gives the MLflow tracker that closes it (none: the run stays open for
    `clean_leftovers`). It is a function because the handler is built with the storage,
    before MLflow is opened (`parent.tracker_when_needed`).
    """

    def __init__(self, max_retry: int, reason: str = STALE_REASON, *,
                 tracker: Callable[[], Tracker] | None = None,
                 echo: Callable[[str], None] = lambda line: None) -> None:
        with experimental_relied_on():  # experimental since Optuna 2.8
            self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
        self.max_retry, self.reason = max_retry, reason
        self.tracker, self.echo = tracker, echo
        self.closed_runs: list[str] = []  # the MLflow runs it closed

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.retry(study, trial)
        queued = self.max_retry > len(retry_history(trial))  # as the retry callback decides
        self.echo(f"trial {trial.number:>3} FAIL     {self.reason}; "
                  + ("queued to run again" if queued else f"not retried (faults.max_retry={self.max_retry})"))
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        if self.tracker is not None and run_id:
            from mlflow.exceptions import MlflowException  # heavy: mlflow

            try:
                self.tracker().finish_trial(run_id, "FAIL", tags={"reason": self.reason})
                self.closed_runs.append(run_id)
            except MlflowException:  # the run lives in another tracking store; close_stale_runs there
                pass


# the project's extras that bring a database driver, by URL scheme
DRIVER_EXTRAS = {"postgresql": "postgres", "mysql": "mysql", "mariadb": "mysql"}
GRPC_PREFIX = "grpc://"  # Optuna's gRPC storage proxy (launch.storage_proxy): grpc://HOST:PORT


def has_heartbeats(url: str) -> bool:
    """Do the trials of this storage send heartbeats (RDB storages), so a dead worker's trial is failed?"""
    return not url.startswith((JOURNAL_PREFIX, GRPC_PREFIX))


def make_storage(url: str, faults: FaultsConfig | None = None,
                 on_stale: StaleTrialHandler | None = None) -> optuna.storages.BaseStorage:
    """The Optuna storage of a URL.

    RDB URLs (sqlite, postgresql, mysql+pymysql) get heartbeats: a killed worker's
    trial is failed after the grace period and retried. ``journal:///path/optuna.log``
    is Optuna's journal file storage for a shared file system with no database
    server; it has no heartbeats, so a killed worker's trial stays RUNNING. ``grpc://HOST:PORT``
    is Optuna's gRPC storage proxy (the Ray engine's `--storage-proxy`); no heartbeats either.
    """
    faults = faults or FaultsConfig()
    try:
        if url.startswith(GRPC_PREFIX):
            host, _, port = url[len(GRPC_PREFIX):].rpartition(":")
            with experimental_relied_on():  # experimental since Optuna 4.2
                proxy = optuna.storages.GrpcStorageProxy(host=host.strip("[]"), port=int(port))
            proxy.wait_server_ready(timeout=30)
            return proxy
        if url.startswith(JOURNAL_PREFIX):
            path = Path(url[len(JOURNAL_PREFIX):])
            path.parent.mkdir(parents=True, exist_ok=True)
            # the open(O_EXCL) lock works on NFSv3+, where symlink locks may not
            return JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
        if url.startswith("sqlite:///"):
            Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
            # several workers on one file: wait for the write lock instead of "database is locked"
            engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}}
        else:
            engine_kwargs = {"pool_pre_ping": True}
        return _rdb_storage(url, faults, on_stale or StaleTrialHandler(faults.max_retry), engine_kwargs)
    except Exception as err:  # SQLAlchemy/driver errors: bad URL, server down, missing driver
        extra = next((name for prefix, name in DRIVER_EXTRAS.items() if url.startswith(prefix)), None)
        hint = (f"; install its driver with: pip install -e '.[{extra}]'"
                if extra and isinstance(err, ImportError) else "")
        raise StudyError(f"cannot open the Optuna storage {redact_url(url)}: "
                         f"{type(err).__name__}: {redact_url_in(str(err).splitlines()[0][:300], url)}{hint}") from None


def _rdb_storage(url: str, faults: FaultsConfig, on_stale: StaleTrialHandler,
                 engine_kwargs: dict[str, Any]) -> optuna.storages.RDBStorage:
    import sqlalchemy.exc  # heavy: sqlalchemy

    def open_rdb() -> optuna.storages.RDBStorage:
        with experimental_relied_on():  # heartbeats
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=faults.heartbeat_interval, grace_period=faults.grace_period,
                heartbeat_stale_trial_callback=on_stale, engine_kwargs=engine_kwargs)

    for delay in (1, 2):
        try:
            return open_rdb()
        except sqlalchemy.exc.DBAPIError as err:
            # Two processes created the tables of a new database at once (machines started
            # together, or `pet-sweep list` while a run starts); the other one won, so the
            # next try finds them. PostgreSQL says so with an IntegrityError, SQLite and
            # MySQL with "table ... already exists".
            if not (isinstance(err, sqlalchemy.exc.IntegrityError) or "already exists" in str(err)):
                raise
            time.sleep(delay)
    return open_rdb()


def missing_store_file(url: str) -> Path | None:
    """The file of a sqlite or journal storage URL when it does not exist (opening it would create it)."""
    path = Path(url[len(JOURNAL_PREFIX):]) if url.startswith(JOURNAL_PREFIX) else sqlite_path(url)
    return path if path is not None and not path.is_file() else None


def open_study(exp: Experiment, *, create: bool = True,
               on_stale: StaleTrialHandler | None = None) -> optuna.Study:
    """Create the experiment's study, or load it to resume (same name = same study).

    With ``create=False`` (report, export, bench) nothing is created: a sqlite or
    journal file that does not exist is an error, not a new empty store.
    """
    if not create:
        missing = missing_store_file(exp.storage_url)
        if missing is not None:
            raise StudyError(f"no Optuna storage at {missing}; run `{command('run', exp.name)}` first")
    storage = make_storage(exp.storage_url, exp.config.faults, on_stale)
    if not create:
        try:
            return optuna.load_study(study_name=exp.study_name, storage=storage,
                                     sampler=make_sampler(exp), pruner=make_pruner(exp))
        except KeyError:
            raise StudyError(f"no study named {exp.study_name!r} in {redact_url(exp.storage_url)}; "
                             f"run `{command('run', exp.name)}` first") from None
    objectives = list(exp.config.objectives)
    # An existing study is loaded whatever its directions (Optuna checks nothing): compared below.
    study = optuna.create_study(study_name=exp.study_name, storage=storage, sampler=make_sampler(exp),
                                pruner=make_pruner(exp), directions=["minimize"] * len(objectives),
                                load_if_exists=True)
    if len(study.directions) != len(objectives):
        raise other_objectives(exp, study)
    if "experiment" not in study.user_attrs:
        study.set_user_attr("experiment", exp.name)
        study.set_user_attr("metric", "error_rate")
        with experimental_relied_on():  # experimental since Optuna 3.2
            study.set_metric_names(objectives)  # optuna-dashboard and `optuna trials` name the values
    elif study.metric_names is not None and list(study.metric_names) != objectives:
        raise other_objectives(exp, study)  # as many objectives, but other costs: their values would mix
    return study


def other_objectives(exp: Experiment, study: optuna.Study) -> StudyError:
    """The error of a study resumed with other `objectives:` than it was created with."""
    names = study.metric_names or [f"{len(study.directions)} unnamed objective(s)"]
    directions = ", ".join(d.name.lower() for d in study.directions)
    return StudyError(f"{exp.where}: experiment '{exp.name}': study {exp.study_name!r} in "
                      f"{redact_url(exp.storage_url)} was created with objectives [{', '.join(names)}] "
                      f"(directions: {directions}), but `objectives` asks for [{', '.join(exp.config.objectives)}]; "
                      "restore `objectives` or start a new study (--study-name)")


def check_split(study: optuna.Study, exp: Experiment, fingerprint: SplitFingerprint,
                echo: Callable[[str], None] = print) -> None:
    """Record the split's fingerprint in a new study; refuse to resume one on another split.

    Trials of one study are compared on the same validation items, and `train` calls the
    test split held out only when its fingerprint matches the one recorded here.
    """
    recorded = study.user_attrs.get(SPLIT_ATTR)
    if recorded is None:
        if study.get_trials(deepcopy=False):
            # its earlier trials ran before fingerprints were recorded: on which split is unknown
            echo(f"note         study {exp.study_name!r} predates split fingerprints: its split stays unrecorded, "
                 "and `pet-sweep train` will call its test error unverifiable")
            return
        study.set_user_attr(SPLIT_ATTR, fingerprint.model_dump())
        return
    changes = SplitFingerprint.model_validate(recorded).changes(fingerprint)
    if changes:
        raise DataError(f"{exp.where}: experiment '{exp.name}': study {exp.study_name!r} was run on another "
                        f"split of the data ({'; '.join(changes)}), so new trials would be judged on other items; "
                        "restore the data (data.path, data.limit, data.split_seed, data.valid_pct, data.test_pct) "
                        "or start a new study (--study-name)")


class _NoInterruptTraceback(logging.Filter):
    """Drop Optuna's two warnings about a trial that Ctrl-C stopped (the first with a traceback)."""

    def __init__(self) -> None:
        super().__init__()
        self.next_line = ""  # Optuna's second line about the same trial

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.next_line and message.startswith(self.next_line):
            self.next_line = ""
            return False
        if record.exc_info and record.exc_info[0] is not None and issubclass(record.exc_info[0], KeyboardInterrupt):
            self.next_line = " ".join(message.split()[:2]) + " failed with value"  # "Trial 3 failed with value"
            return False
        return True


def quiet_optuna() -> None:
    """Optuna logs every trial at INFO; pet-sweep prints its own one line per trial."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Ctrl-C (or SIGTERM) in a trial: Optuna logs the trial's failure with the whole
    # traceback through fastai and torch; pet-sweep says it in one line with the resume command
    optimize_log = logging.getLogger("optuna.study._optimize")
    if not any(isinstance(f, _NoInterruptTraceback) for f in optimize_log.filters):
        optimize_log.addFilter(_NoInterruptTraceback())
