"""sweep.lifecycle's one private Optuna use, pinned: the stale-heartbeat test of `fail_stale_trials`."""

from __future__ import annotations

import time
from pathlib import Path

import optuna
import pytest

from pet_sweep.sweep.lifecycle import optuna_stale_trial_ids, stale_trial_numbers


def _study(tmp_path: Path) -> optuna.Study:
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}", heartbeat_interval=1,
                                         grace_period=1)
    return optuna.create_study(storage=storage, study_name="s")


def test_a_running_trial_whose_heartbeat_stopped_is_stale_and_a_finished_one_is_not(tmp_path: Path) -> None:
    study = _study(tmp_path)
    running, done = study.ask(), study.ask()
    for trial in (running, done):
        study._storage.record_heartbeat(trial._trial_id)
    study.tell(done, 0.5)
    assert stale_trial_numbers(study) == set()  # fresh heartbeat
    time.sleep(2.5)  # past the 1 s grace period: the heartbeat is stale
    assert optuna_stale_trial_ids(study._storage, study._study_id) == [running._trial_id]
    assert stale_trial_numbers(study) == {running.number}


def test_an_optuna_without_the_private_method_fails_clearly() -> None:
    class StorageOfAnotherOptuna:
        pass

    with pytest.raises(RuntimeError, match="StorageOfAnotherOptuna._get_stale_trial_ids.*install optuna 5"):
        optuna_stale_trial_ids(StorageOfAnotherOptuna(), 0)
