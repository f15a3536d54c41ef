"""Advice that needs evidence: the epochs range read against the curve, LR advice from failed trials."""

from __future__ import annotations

import pandas as pd

from pet_sweep.report import verdicts
from pet_sweep.report.advice import converged_step, curve_agrees, learning_failures
from tests.test_report import history


def test_a_converged_best_with_fewer_epochs_is_never_told_to_widen_epochs_upward() -> None:
    # best from epoch 2 on, run for 10 epochs: converged, 3 epochs reach it
    a = verdicts.analyse_history(history([1.0, .5, .3] + [.2] * 7, [1.0, .5, .3] + [.3] * 7,
                                         [.5, .2, .1] + [.1] * 7), n_valid=1000)
    assert a.verdict == verdicts.CONVERGED and a.recommended_epochs < 10
    assert not curve_agrees("epochs", True, 10, a) and curve_agrees("epochs", False, 10, a)
    assert curve_agrees("lr_hi", True, 1e-2, a)  # the curve speaks for epochs only
    assert f"epochs={a.recommended_epochs} reach its best" in converged_step(a, {"epochs": 10})


def frame(rows: list[tuple[str, str, float, str]]) -> pd.DataFrame:
    return pd.DataFrame([{"state": s, "verdict": v, "lr_hi": lr, "reason": r} for s, v, lr, r in rows])


def test_lr_advice_only_where_the_lr_separates_failed_trials_from_those_that_learned() -> None:
    # the case: the best learned at 6.79e-3, above the trial that stayed at chance
    mixed = learning_failures(frame([("COMPLETE", "converged", 6.79e-3, ""), ("COMPLETE", "converged", 1e-3, ""),
                                     ("COMPLETE", "never learned", 6.2e-3, "")]))
    assert mixed == ["1 trial never learned (stayed near chance) (lr_hi 0.0062), among learning rates that also "
                     "learned (lr_hi 0.001–0.0068): the learning rate alone does not explain it, so the LR ranges "
                     "can stay"]
    above = learning_failures(frame([("COMPLETE", "converged", 1e-3, ""), ("COMPLETE", "diverged", 5e-2, ""),
                                     ("PRUNED", "", 3e-2, "diverged: loss rose from 2 to 40 by batch 16")]))
    assert len(above) == 1 and above[0].startswith("2 trials diverged (the loss blew up)")
    assert above[0].endswith("lower the top of the LR ranges below 0.03")
    below = learning_failures(frame([("COMPLETE", "converged", 1e-2, ""), ("COMPLETE", "never learned", 1e-5, "")]))
    assert below[0].endswith("raise the bottom of the LR ranges above 1e-05")
    assert learning_failures(frame([("COMPLETE", "converged", 1e-2, "")])) == []
