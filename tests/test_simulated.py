"""`bench.scale --simulated` in small: 4 workers of the local supervisor, forked with the stand-in
training (`bench.simulated`), share a budget of 12 trials; one worker is killed with SIGKILL
in the middle of a trial. The budget still ends exact, the killed trial is retried, and no
MLflow run is left RUNNING."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from pet_sweep.sweep.budget import is_retry
from pet_sweep.sweep.records import HISTORY_ATTR, WORKER_ATTR, retried_trial_number


def kill_a_worker_mid_trial(exp: object, killed: list[int], stop: threading.Event) -> None:
    """SIGKILL the worker of the first trial that has reported an epoch."""
    while not stop.wait(0.2):
        try:
            study = optuna.load_study(study_name=exp.study_name, storage=exp.storage_url)
        except (KeyError, Exception):  # not created yet
            continue
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if trial.user_attrs.get(HISTORY_ATTR) and WORKER_ATTR in trial.user_attrs:
                pid = int(trial.user_attrs[WORKER_ATTR].rpartition(":")[2])
                os.kill(pid, signal.SIGKILL)
                killed.append(trial.number)
                return


@pytest.mark.slow  # about 90 s on the shared 2-core machine: 12 one-second trials, a grace period, MLflow on SQLite
def test_simulated_workers_end_at_the_exact_budget_after_a_kill(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from bench.common import experiment_in
    from bench.scale_run import space
    from bench.simulated import Zygote
    from pet_sweep.launch.local import supervise

    zygote = Zygote(tmp_path, pace=0.3, valid_items=20)  # before any connection or thread of the test
    exp = experiment_in(tmp_path / "sweep", {
        "budget": {"n_trials": 12}, "sampler": {"name": "random"},
        "faults": {"heartbeat_interval": 1, "grace_period": 3, "max_retry": 3},
        "data": {"source": "digits", "limit": 100}, "model": {"pretrained": False}}, space(3), "sim")
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(target=kill_a_worker_mid_trial, args=(exp, killed, stop), daemon=True)
    killer.start()
    lines: list[str] = []
    try:
        result = supervise(exp, 4, [], echo=lines.append, warn=lines.append, start=zygote.start)
    finally:
        stop.set()
        killer.join()
        zygote.close()
    assert killed, "no worker was killed mid-trial"
    trials = optuna.load_study(study_name="sim", storage=exp.storage_url).get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 12 and sum(not is_retry(t) for t in trials) == 12, lines
    assert result.finished == result.ran == 12
    states = {t.number: t.state for t in trials}
    assert states[killed[0]] == TrialState.FAIL
    retries = [t for t in trials if retried_trial_number(t) == killed[0]]
    assert len(retries) == 1 and retries[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert any("was killed by signal SIGKILL" in line for line in lines), lines
    client = MlflowClient(exp.tracking_uri)
    experiment = client.get_experiment_by_name(exp.tracking_experiment)
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    assert not [r.info.run_id for r in runs if r.info.status == "RUNNING"]
    assert len(runs) == len(trials) + 1  # a run per trial (the killed one and its retry apart) and the parent
