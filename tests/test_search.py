"""Samplers by name (gp, cmaes, tpe, random) and warm starts from an earlier study."""

import optuna
import pytest

from pet_sweep.config import Experiment
from pet_sweep.errors import ConfigError
from pet_sweep.space import suggest
from pet_sweep.sweep.search import make_sampler, sampler_note
from pet_sweep.sweep.warm import enqueue_warm_start, plan_warm_start

SPACE = {"arch": {"choices": ["xresnet18", "xresnet34"]}, "lr_hi": {"low": 1e-3, "high": 1e-2, "log": True},
         "lr_mult": 3, "freeze_epochs": 0, "epochs": {"low": 1, "high": 3}}
D = optuna.distributions


def _exp(**extra):
    return Experiment.from_dict({"data": {"source": "digits"}, "sweep": SPACE, **extra})


@pytest.mark.parametrize("name", ["gp", "cmaes", "tpe", "random"])
def test_each_sampler_runs_trials_inside_the_space(name):
    exp = _exp(sampler={"name": name, "n_startup_trials": 1})
    study = optuna.create_study(sampler=make_sampler(exp))
    study.optimize(lambda t: suggest(exp.space, t).lr_hi, n_trials=3)
    assert len(study.trials) == 3
    assert all(1e-3 <= t.params["lr_hi"] <= 1e-2 and t.params["arch"] in SPACE["arch"]["choices"]
               for t in study.trials)


def test_cmaes_says_it_draws_the_categorical_arch_at_random():
    assert "arch drawn at random" in sampler_note(_exp(sampler={"name": "cmaes"}))
    assert sampler_note(_exp(sampler={"name": "gp"})) == "gp"


def test_cmaes_refuses_several_objectives():
    with pytest.raises(ConfigError, match="cmaes is for one objective"):
        _exp(sampler={"name": "cmaes"}, objectives=["error_rate", "predict_ms"])


@pytest.fixture
def old_study(tmp_path):
    url = f"sqlite:///{tmp_path}/o.db"
    old = optuna.create_study(study_name="old", storage=url)
    dists = {"arch": D.CategoricalDistribution(["xresnet18", "xresnet34", "xresnet50"]),
             "lr_hi": D.FloatDistribution(1e-4, 1e-1, log=True), "epochs": D.IntDistribution(1, 5)}
    for i, (arch, lr, epochs) in enumerate([("xresnet18", 5e-3, 2), ("xresnet34", 5e-2, 3), ("xresnet50", 1e-3, 2)]):
        old.add_trial(optuna.trial.create_trial(params={"arch": arch, "lr_hi": lr, "epochs": epochs},
                                                distributions=dists, value=0.1 * (i + 1)))
    return url


def test_warm_start_queues_the_top_k_clipped_to_this_space(old_study):
    exp = _exp(storage=old_study, study_name="new", sampler={"warm_start": ["old"], "top": 2})
    planned = plan_warm_start(exp)
    assert [w.params for w in planned] == [{"arch": "xresnet18", "lr_hi": 5e-3, "epochs": 2},
                                           {"arch": "xresnet34", "lr_hi": 1e-2, "epochs": 3}]
    assert planned[1].clipped == ("lr_hi 0.05 -> 0.01",)
    new = optuna.create_study(study_name="new", storage=old_study)
    said = []
    assert enqueue_warm_start(new, planned, said.append) == 2
    assert enqueue_warm_start(new, planned, said.append) == 0  # once per study
    assert "clipped" in said[0] and len(said) == 1
    new.optimize(lambda t: suggest(exp.space, t).lr_hi, n_trials=2)
    assert [t.params for t in new.trials] == [w.params for w in planned]


def test_warm_start_refuses_a_choice_this_space_lacks(old_study):
    exp = _exp(storage=old_study, study_name="new", sampler={"warm_start": ["old"], "top": 3})
    with pytest.raises(ConfigError, match="xresnet50") as err:
        plan_warm_start(exp)
    assert err.value.key == "sampler.warm_start.arch"


def test_warm_start_from_an_unknown_study_names_the_key(old_study):
    with pytest.raises(ConfigError) as err:
        plan_warm_start(_exp(storage=old_study, sampler={"warm_start": ["nope"]}))
    assert err.value.key == "sampler.warm_start" and "nope" in str(err.value)
