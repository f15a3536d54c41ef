"""The pure analysis: verdicts on hand-made histories, Wilson and McNemar against known values."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from dataclasses import replace
from typing import Any

import pandas as pd
import pytest

from pet_sweep.errors import StudyError
from pet_sweep.report import analysis, figures, render, stats, verdicts


def history(train: list[float], valid: list[float], error: list[float], frozen: int = 0) -> list[dict[str, Any]]:
    return [{"epoch": i, "phase": "frozen" if i < frozen else "unfrozen", "train_loss": t, "valid_loss": v,
             "error_rate": e, "seconds": 1.0} for i, (t, v, e) in enumerate(zip(train, valid, error))]


# -- verdicts ------------------------------------------------------------------


def test_still_improving_recommends_more_epochs() -> None:
    a = verdicts.analyse_history(history([1.2, 0.9, 0.5], [1.0, 0.8, 0.6], [0.3, 0.2, 0.1], frozen=1), n_valid=200)
    assert a.verdict == verdicts.STILL_IMPROVING
    assert (a.best_epoch, a.epochs_past_best, a.best_error, a.final_error) == (2, 0, 0.1, 0.1)  # numbered from 0
    assert a.recommended_total_epochs == 5 and a.recommended_epochs == 4  # one frozen epoch
    assert a.valid_loss_slope == pytest.approx(-0.2)


def test_a_one_item_new_best_on_a_flat_curve_is_not_improvement() -> None:
    flat = history([0.5, 0.3, 0.2, 0.15], [0.3, 0.25, 0.24, 0.24], [0.05, 0.04, 0.04, 0.0375])
    assert verdicts.analyse_history(flat, n_valid=400).verdict == verdicts.CONVERGED  # 16 -> 15 of 400 wrong
    # digits trial: 2.51 %, 1.39 %, 1.11 % on 359 items is a falling trend, although the last step is one item
    digits = history([0.21, 0.15, 0.105, 0.072], [0.15, 0.094, 0.075, 0.078], [0.0223, 0.0251, 0.0139, 0.0111])
    a = verdicts.analyse_history(digits, n_valid=359)
    assert a.verdict == verdicts.STILL_IMPROVING and "down 1.40 points over the last 3 epochs" in a.reason


def test_overconfident_valid_loss_rises_while_error_falls() -> None:
    # fastbook's reading: validation loss gets worse, yet accuracy still improves
    a = verdicts.analyse_history(history([0.5, 0.3, 0.2, 0.12, 0.08], [0.30, 0.25, 0.24, 0.26, 0.29],
                                   [0.10, 0.08, 0.07, 0.065, 0.064]), n_valid=1000)
    assert a.verdict == verdicts.OVERCONFIDENT
    assert a.valid_loss_slope > 0 and a.gap_trend > 0
    assert a.final_gap == pytest.approx(0.21)
    assert a.recommended_total_epochs == 4  # 6.5% is within 1.5 items of the best 6.4%


def test_overfitting_error_rises_from_its_best() -> None:
    a = verdicts.analyse_history(history([0.6, 0.3, 0.2, 0.1, 0.05], [0.5, 0.3, 0.25, 0.35, 0.5],
                                   [0.2, 0.1, 0.08, 0.12, 0.15]), n_valid=200)
    assert a.verdict == verdicts.OVERFITTING
    assert (a.best_epoch, a.epochs_past_best, a.recommended_total_epochs) == (2, 2, 3)  # epoch 2 is the third


def test_converged_and_one_image_wobble_is_not_overfitting() -> None:
    flat = verdicts.analyse_history(history([0.6, 0.3, 0.2, 0.15, 0.12], [0.5, 0.3, 0.25, 0.25, 0.25],
                                      [0.2, 0.1, 0.08, 0.08, 0.08]), n_valid=200)
    assert flat.verdict == verdicts.CONVERGED and flat.recommended_total_epochs == 3
    wobble = verdicts.analyse_history(history([0.6, 0.3, 0.2], [0.5, 0.3, 0.3], [0.10, 0.09, 0.095]), n_valid=200)
    assert wobble.verdict != verdicts.OVERFITTING  # 0.5 % is one of 200 images
    strict = verdicts.analyse_history(history([0.6, 0.3, 0.2], [0.5, 0.3, 0.3], [0.10, 0.09, 0.095]), min_change=0.0)
    assert strict.verdict == verdicts.OVERFITTING


def test_underfit_train_loss_above_valid_loss_and_stalled() -> None:
    a = verdicts.analyse_history(history([1.5, 1.4, 1.35, 1.3], [1.2, 1.1, 1.05, 1.05], [0.5, 0.4, 0.4, 0.4]), n_valid=500)
    assert a.verdict == verdicts.UNDERFIT and a.final_gap < 0
    assert a.recommended_total_epochs == 6


@pytest.mark.parametrize("train, valid, error, kwargs", [
    ([1.0, math.nan], [1.0, 1.0], [0.5, 0.5], {}),                   # NaN loss
    ([1.0, 2.0, 5.0], [1.0, 3.0, 9.0], [0.5, 0.8, 0.9], {}),         # training loss blew up
    ([1.0, 0.9, 0.95], [1.0, 1.0, 1.0], [0.2, 0.1, 0.6], {}),         # error rate rose far above its start
])
def test_diverged(train: list[float], valid: list[float], error: list[float], kwargs: dict[str, Any]) -> None:
    a = verdicts.analyse_history(history(train, valid, error), n_valid=100, **kwargs)
    assert a.verdict == verdicts.DIVERGED and a.recommended_epochs is None


@pytest.mark.parametrize("error", [[0.9, 0.9, 0.9],       # at chance level
                                   [0.95, 0.87, 0.86]])  # 86 of 100: p=0.34
def test_never_learned_is_told_apart_from_a_blow_up(error: list[float]) -> None:
    """Near chance from start to end, nothing non-finite or rising: "never learned", not "diverged"."""
    a = verdicts.analyse_history(history([2.3, 2.3, 2.29], [2.3, 2.3, 2.3], error), n_valid=100, n_classes=10)
    assert a.verdict == verdicts.NEVER_LEARNED and a.recommended_epochs is None and "chance" in a.reason


def test_chance_is_decided_by_a_binomial_test() -> None:
    # pets: 37 classes, chance 97.30 %; 97 % of 1,478 is 1,434 wrong, four items under chance (p=0.28)
    pets = [0.99, 0.98, 0.97]
    at_chance = verdicts.analyse_history(history([3.7, 3.6, 3.55], [3.7, 3.62, 3.6], pets), n_valid=1478, n_classes=37)
    assert at_chance.verdict == verdicts.NEVER_LEARNED and "no better than chance" in at_chance.reason
    assert stats.chance_p_value(1434, 1478, 37) == pytest.approx(0.279, abs=0.01)
    # 93 % wrong is 63 items under chance: learning, however little
    better = verdicts.analyse_history(history([3.7, 3.6, 3.55], [3.7, 3.62, 3.6], [0.99, 0.95, 0.93]),
                                n_valid=1478, n_classes=37)
    assert better.verdict not in verdicts.FAILED_TO_LEARN and stats.chance_p_value(1375, 1478, 37) < 1e-6


def test_empty_history_is_refused() -> None:
    with pytest.raises(ValueError, match="empty history"):
        verdicts.analyse_history([])


def test_unfreeze_epoch() -> None:
    # epochs are numbered from 0, as in MLflow: after two frozen epochs (0, 1) the first unfrozen is epoch 2
    assert figures.unfreeze_epoch(history([1, 1, 1], [1, 1, 1], [1, 1, 1], frozen=2)) == 2
    assert figures.unfreeze_epoch(history([1, 1], [1, 1], [1, 1], frozen=0)) is None


# -- uncertainty -----------------------------------------------------------------


@pytest.mark.parametrize("k, n, low, high", [
    # Newcombe (1998), Statistics in Medicine 17:857, table I, method 3 (Wilson score)
    (81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718),
    (5, 10, 0.2366, 0.7634),
])
def test_wilson_known_values(k: int, n: int, low: float, high: float) -> None:
    lo, hi = stats.wilson(k, n)
    assert (lo, hi) == (pytest.approx(low, abs=5e-5), pytest.approx(high, abs=5e-5))


def test_wilson_refuses_impossible_counts() -> None:
    with pytest.raises(ValueError, match="n > 0"):
        stats.wilson(0, 0)
    with pytest.raises(ValueError, match="errors <= n"):
        stats.wilson(11, 10)


@pytest.mark.parametrize("b, c, p", [(1, 6, 0.125), (2, 10, 158 / 4096), (0, 1, 1.0), (3, 3, 1.0), (0, 0, 1.0),
                                     (0, 20, 2 / 2 ** 20)])
def test_mcnemar_exact_known_values(b: int, c: int, p: float) -> None:
    assert stats.mcnemar_exact(b, c) == pytest.approx(p) and stats.mcnemar_exact(c, b) == pytest.approx(p)


def test_fastbook_pets_figures_are_within_noise() -> None:
    # fastbook: 5.41 % vs 5.48 % on ~1,478 validation images: one image apart
    rates = stats.compare_rates("runner-up", (0, 0.0541), (1, 0.0548), 1478)
    assert (rates.only_best_wrong, rates.only_other_wrong) == (0, 1)
    assert rates.verdict == "within noise" and "within noise" in rates.text()
    # the same with real per-item predictions: 79 shared errors, 1 + 2 of their own
    targets = [0] * 1478
    a = [1 if i < 80 else 0 for i in range(1478)]
    b = [1 if (i < 79 or 80 <= i < 82) else 0 for i in range(1478)]
    paired = stats.compare_predictions("runner-up", (0, a), (1, b), targets)
    assert (paired.only_best_wrong, paired.only_other_wrong) == (1, 2)
    assert paired.verdict == "within noise" and paired.p_value == pytest.approx(1.0)


def test_a_real_difference_is_beyond_noise() -> None:
    targets = list(range(10)) * 30
    best = list(targets)
    other = [t if i >= 20 else (t + 1) % 10 for i, t in enumerate(targets)]
    c = stats.compare_predictions("best resnet34", (3, best), (5, other), targets)
    assert (c.only_best_wrong, c.only_other_wrong) == (0, 20)
    assert c.verdict == "beyond noise" and "beyond noise" in c.text()
    # with totals only, 0 vs 20 wrong allows one pairing (all 20 disagreements go one way)
    assert stats.compare_rates("x", (3, 0.0), (5, 20 / 300), 300).verdict == "beyond noise"


def test_totals_only_give_a_p_range_over_every_pairing() -> None:
    # 40 vs 81 of 1,478: even pairing every one of the 40 with a different item gives p < 0.05
    c = stats.compare_rates("runner-up", (0, 40 / 1478), (1, 81 / 1478), 1478)
    assert c.p_range == (pytest.approx(stats.mcnemar_exact(0, 41)), pytest.approx(stats.mcnemar_exact(40, 81)))
    assert c.p_range[1] < 0.05 and c.verdict == "beyond noise"
    # 2 vs 8 of 20 items: p runs from 0.031 (shared errors) to 0.11 (disjoint ones): the totals cannot tell
    between = stats.compare_rates("x", (0, 2 / 20), (1, 8 / 20), 20)
    assert between.p_range[0] < 0.05 <= between.p_range[1] and between.verdict == "cannot tell"
    assert "p=0.0312–0.109" in between.text()


@pytest.mark.parametrize("ka, kb, n", [(2, 8, 20), (5, 5, 12), (0, 7, 9), (9, 3, 10), (4, 11, 15)])
def test_p_range_ends_are_the_extremes_of_every_pairing(ka: int, kb: int, n: int) -> None:
    # brute force: every count w of items both get wrong that the totals allow
    ps = [stats.mcnemar_exact(ka - w, kb - w) for w in range(0, min(ka, kb) + 1) if n - (ka + kb - w) >= 0]
    assert stats.mcnemar_range(ka, kb, n) == (pytest.approx(min(ps)), pytest.approx(max(ps)))


def test_holm_adjusts_step_down() -> None:
    # Holm (1979): sorted p times m, m-1, ...; kept monotone; capped at 1
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.5, 0.001]) == pytest.approx([0.5, 0.002]) and stats.holm([]) == []
    assert stats.holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])


def test_beyond_noise_must_survive_the_correction() -> None:
    # the best trial (no error on 100 shared items) against three rivals; the runner-up is also
    # the best resnet34 of its own architecture's rivals, so it is compared (and counted) once
    targets = tuple(i % 10 for i in range(100))

    def trial(number: int, arch: str, wrong: range) -> analysis.TrialRecord:
        preds = tuple((t + 1) % 10 if i in wrong else t for i, t in enumerate(targets))
        return analysis.TrialRecord(number=number, state="COMPLETE", value=len(wrong) / 100, preds=preds, targets=targets,
                              params={"arch": arch, "lr_lo": 1e-4, "lr_hi": 1e-3, "freeze_epochs": 0, "epochs": 1})

    best = trial(1, "resnet34", range(0))
    done = [best, trial(2, "resnet34", range(6)), trial(4, "resnet18", range(10, 16)),
            trial(3, "xresnet18", range(20, 32))]
    labels = {c.label: c for c in analysis.comparisons_for(best, done)}
    assert set(labels) == {"runner-up", "best resnet18", "best xresnet18"}
    runner, r18, x18 = labels["runner-up"], labels["best resnet18"], labels["best xresnet18"]
    # uncorrected, all three are below 0.05: 2/2^6, 2/2^6, 2/2^12
    assert [c.p_value for c in (runner, r18, x18)] == pytest.approx([2 / 2 ** 6, 2 / 2 ** 6, 2 / 2 ** 12])
    # Holm: 3 x 0.00049 survives; 2 x 0.031 = 0.0625 does not
    assert x18.adjusted == (pytest.approx(3 * 2 / 2 ** 12),) * 2 and x18.verdict == "beyond noise"
    assert runner.adjusted == r18.adjusted == (pytest.approx(0.0625),) * 2
    assert runner.verdict == r18.verdict == "within noise"
    assert "exact McNemar p=0.0312, Holm-adjusted p=0.0625 on 100 shared items" in runner.text()
    # alone, the runner-up comparison would have been "beyond noise"
    assert analysis.comparisons_for(best, done[:2])[0].verdict == "beyond noise"


def test_format_rate() -> None:
    assert stats.format_rate(0.05, 100) == "5.00% (95% CI 2.15%–11.18%, 5/100 wrong)"
    assert stats.format_rate(0.05) == "5.00%" and stats.format_rate(None) == "-"


# -- the study -------------------------------------------------------------------


def record(number: int, arch: str, errors: list[float], *, state: str = "COMPLETE", wrong: int | None = None,
           lr: float = 1e-3, epochs: int | None = None, seconds: float = 10.0, freeze: int = 0) -> analysis.TrialRecord:
    n = 100
    targets = tuple(i % 10 for i in range(n))
    k = wrong if wrong is not None else round(errors[-1] * n)
    preds = tuple((t + 1) % 10 if i < k else t for i, t in enumerate(targets))
    h = history([1.0 - 0.1 * i for i in range(len(errors))], [1.0 - 0.05 * i for i in range(len(errors))], errors)
    return analysis.TrialRecord(
        number=number, state=state,
        params={"arch": arch, "base_lr": lr, "lr_lo": lr / 10, "lr_hi": lr, "freeze_epochs": freeze,
                "epochs": epochs or len(errors)},
        history=tuple(h), value=errors[-1] if state == "COMPLETE" else None,
        preds=preds if state == "COMPLETE" else (), targets=targets if state == "COMPLETE" else (), seconds=seconds)


def test_a_runner_up_that_is_also_the_best_of_its_architecture_is_one_comparison() -> None:
    best, other = record(0, "xresnet18", [0.3, 0.09]), record(1, "xresnet34", [0.3, 0.10])
    comparisons = analysis.comparisons_for(best, [best, other, record(2, "xresnet18", [0.3, 0.2])])
    assert [(c.label, c.other_trial) for c in comparisons] == [("runner-up and best xresnet34", 1)]


def test_build_report_ranks_compares_and_advises() -> None:
    records = [record(0, "resnet18", [0.3, 0.2, 0.10]), record(1, "resnet34", [0.3, 0.12, 0.05], lr=3e-3),
               record(2, "resnet34", [0.3, 0.1, 0.06], lr=1e-2), record(3, "resnet50", [0.5], state="PRUNED"),
               record(4, "resnet50", [0.6], state="RUNNING")]
    rep = analysis.build_report(records, experiment="pets", study_name="pets", importances={"lr_hi": 0.7, "arch": 0.3},
                          bounds={"lr_hi": (1e-4, 1e-2)})
    assert rep.best.number == 1 and rep.n_valid == 100 and rep.top(2) == [1, 2]
    labels = {c.label: c for c in rep.comparisons}
    assert set(labels) == {"runner-up", "best resnet18"}
    assert labels["runner-up"].other_trial == 2 and labels["runner-up"].verdict == "within noise"
    assert labels["best resnet18"].other_trial == 0 and labels["best resnet18"].paired
    assert rep.counts == {"COMPLETE": 3, "PRUNED": 1, "RUNNING": 1}
    assert 4 not in rep.analyses and rep.trials.set_index("number").loc[4, "verdict"] == "running"
    # the pruned trial 3 was cut short on purpose: no verdict counted, no epoch advice
    assert rep.verdict_counts == {verdicts.STILL_IMPROVING: 3}
    assert math.isnan(rep.trials.set_index("number").loc[3, "rec_unfrozen_epochs"])
    arch = rep.tables["architecture"].set_index("arch")
    assert arch.loc["resnet34", "completed"] == 2 and arch.loc["resnet34", "best_error"] == 0.05
    assert list(arch["depth"]) == [18, 34, 50]
    assert arch.loc["resnet50", "trials"] == 2 and math.isnan(arch.loc["resnet50", "best_error"])
    assert "lr_hi (binned)" in rep.tables and rep.tables["lr_hi (binned)"]["trials"].sum() == 5
    text = render.summary_text(rep)
    assert "(selected as the best of 3 trials on these 100 items: optimistic)" in text
    assert "5.00% (95% CI" in text and "raise epochs (try epochs=5 instead of 3)" in text
    assert "within noise of trial 2" in text and "pet-sweep train best.yaml" in text
    assert "still running" in text
    # three completed trials are too few to rank parameters: said, not ranked
    assert re.search(r"^matters most +not ranked: 3 completed trials, fewer than the 10", text, re.M), text
    assert rep.importances == {} and "## Parameter importances" not in render.markdown(rep, {})
    assert re.search(r"^verdicts +still improving 3 \(of the 3 completed trials\)$", text, re.M), text
    assert "measure the best config on the held-out split" in text
    # an experiment with no held-out split is told so, not sent to measure one
    bare = render.summary_text(analysis.build_report(records, experiment="pets", study_name="pets", test_split=False))
    assert "held-out" in bare and "none: this experiment holds no items out (data.test_pct: 0)" in bare
    assert "set data.test_pct for a new study" in bare and "pet-sweep train best.yaml" not in bare
    md = render.markdown(rep, {"loss_curves": "figures/loss_curves.png"})
    assert "![Loss curves" in md and "| number | state |" in md
    page = render.html(rep, {"loss_curves": b"\x89PNG fake"})
    assert "data:image/png;base64,iVBORyBmYWtl" in page and page.startswith("<!doctype html>")


def test_a_tie_points_at_the_cheaper_trial_only_when_there_is_one() -> None:
    def advice(best_seconds: float, rival_seconds: float) -> str:
        records = [record(0, "resnet34", [0.3, 0.1, 0.05], seconds=best_seconds),
                   record(1, "resnet18", [0.3, 0.1, 0.06], seconds=rival_seconds)]
        rep = analysis.build_report(records, experiment="e", study_name="s")
        assert rep.best.number == 0 and rep.comparisons[0].verdict == "within noise"
        return next(step for step in rep.next_steps if "within noise" in step)

    assert advice(60.0, 30.0) == ("the best trial (60s) is within noise of trial 1 (30s): prefer the cheaper "
                                  "trial 1 (pet-sweep export --trial 1), or validate on more items before choosing")
    assert advice(30.0, 60.0) == ("the best trial (30s) is within noise of trial 1 (60s): it is also the cheapest, "
                                  "so keep it; validate on more items to separate them")
    # a few per cent is timing noise, not a cheaper config
    assert "none is clearly cheaper (by a tenth), so keep it" in advice(30.0, 29.0)
    # no wall time recorded (an imported study): epochs stand in for the cost
    frame = pd.DataFrame([{"number": 0, "seconds": 0.0, "freeze_epochs": 1, "epochs": 8},
                          {"number": 1, "seconds": 0.0, "freeze_epochs": 0, "epochs": 4}])
    assert "trial 1 (4 epochs): prefer the cheaper trial 1" in analysis.tie_advice(0, [1], frame)
    # one wall time missing: epochs for both, never seconds against epochs
    frame.loc[0, "seconds"] = 60.0
    assert analysis.tie_advice(0, [1], frame).startswith("the best trial (9 epochs) is within noise of trial 1 (4 epochs)")


def test_edge_of_range_and_heldout_are_reported() -> None:
    records = [record(0, "resnet18", [0.3, 0.2, 0.10], lr=1e-2), record(1, "resnet18", [0.3, 0.2, 0.2])]
    held = analysis.HeldOut(trial=0, test_error=0.08, n_test=200, valid_error=0.10, run_id="abc")
    rep = analysis.build_report(records, experiment="e", study_name="s", bounds={"lr_hi": (1e-4, 1e-2)}, heldout=[held])
    text = render.summary_text(rep)
    assert "lr_hi=0.01 is at the top of its range" in text
    assert "8.00% (95% CI" in text and "replay of trial 0" in text and "held-out split: pet-sweep" not in text
    # the replay's split check decides the label: matched, changed, or (an older replay) unchecked
    labels = {True: "on the test split, replay", False: "on the test split (not held out: it changed after the sweep)",
              None: "on the test split (held out unverified: no split fingerprint to check)"}
    for held_out, label in labels.items():
        rep = analysis.build_report(records, experiment="e", study_name="s", heldout=[replace(held, held_out=held_out)])
        assert label in render.heldout_text(rep)


def test_importances_are_ranked_from_enough_completed_trials() -> None:
    records = [record(i, "resnet18", [0.3, 0.2, 0.10 + i / 100]) for i in range(analysis.MIN_IMPORTANCE_TRIALS)]
    rep = analysis.build_report(records, experiment="e", study_name="s", importances={"lr_hi": 0.7, "arch": 0.3},
                          importance_note="base_lr left out: it did nothing in 4 of 10 completed trials")
    assert rep.importances == {"lr_hi": 0.7, "arch": 0.3}
    assert re.search(r"^matters most +lr_hi 0\.70, arch 0\.30 \(base_lr left out: it did nothing", render.summary_text(rep),
                     re.M)
    fewer = analysis.build_report(records[:-1], experiment="e", study_name="s", importances={"lr_hi": 0.7})
    assert fewer.importances == {} and fewer.importance_note.startswith("not ranked: 9 completed trials")


def test_an_unused_base_lr_is_shown_absent_and_not_advised_on() -> None:
    # best trial 0 ran without a frozen phase; its recorded base_lr sits at the top of the range
    records = [record(0, "resnet18", [0.3, 0.2, 0.10], lr=1e-2), record(1, "resnet18", [0.3, 0.2, 0.2], freeze=1)]
    bounds = {"base_lr": (1e-4, 1e-2)}
    rep = analysis.build_report(records, experiment="e", study_name="s", bounds=bounds, always_inert=["base_lr"])
    text = render.summary_text(rep)
    assert "base_lr=" not in text.split("\n")[1] and "lr=slice(1.00e-03, 1.00e-02)" in text
    assert "widen it" not in text
    assert "base_lr does nothing in this space: freeze_epochs is 0 in every trial" in text
    frame = rep.trials.set_index("number")
    assert math.isnan(frame.loc[0, "base_lr"]) and frame.loc[1, "base_lr"] == 1e-3  # absent, not 0
    assert "| 0 | COMPLETE | resnet18 |  | 1.00e-03 |" in render.markdown_table(render.ranked(rep))
    # the same trial with a frozen phase: its base_lr acted, and is advised on
    used = [record(0, "resnet18", [0.3, 0.2, 0.10], lr=1e-2, freeze=1), records[1]]
    text = render.summary_text(analysis.build_report(used, experiment="e", study_name="s", bounds=bounds))
    assert "base_lr=1.00e-02" in text and "best base_lr=0.01 is at the top of its range" in text


def test_one_trial_is_counted_in_the_singular_and_epochs_are_numbered_from_zero() -> None:
    rep = analysis.build_report([record(0, "resnet18", [0.3, 0.2, 0.10])], experiment="e", study_name="s")
    text = render.summary_text(rep)
    assert "s (e): 1 trial (1 complete)" in text and "selected as the best of 1 trial on these 100 items" in text
    assert "(of the 1 completed trial)" in text and "not ranked: 1 completed trial, fewer" in text
    assert "1 trials" not in text and "trial(s)" not in text
    # epochs 0, 1, 2 as in MLflow: the best is the last one, epoch 2
    assert "best at epoch 2 (last: epoch 2)" in text
    # the recommended epochs say what they count
    md = render.markdown(rep, {})
    assert "| rec_unfrozen_epochs |" in md and "rec_unfrozen_epochs (the recommended `epochs`) count unfrozen" in md
    assert "1 epoch" == analysis.trial_cost({"freeze_epochs": 0, "epochs": 1}, by_time=False)[1]


def test_loss_curves_number_epochs_from_zero_and_keep_their_legend_inside() -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    frozen = analysis.TrialRecord(number=0, state="COMPLETE", value=0.1, params={"arch": "resnet18"},
                                  history=tuple(history([1.0, 0.8, 0.6], [0.9, 0.7, 0.6], [0.3, 0.2, 0.1], frozen=1)))
    rep = analysis.build_report([frozen], experiment="e", study_name="s")
    fig = figures.loss_curves(rep)  # one panel: the narrowest legend room
    assert fig.get_suptitle() == "s: loss curves of the best trial"
    ax = fig.axes[0]
    assert list(ax.lines[0].get_xdata()) == [0, 1, 2]
    assert [line.get_xdata()[0] for line in ax.lines if line.get_label() == "unfreeze"] == [0.5]
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    box, legend = fig.bbox, fig.legends[0].get_window_extent(renderer)
    assert box.x0 <= legend.x0 and legend.x1 <= box.x1 and box.y0 <= legend.y0, (box, legend)


def test_no_completed_trial_is_a_clear_error() -> None:
    with pytest.raises(StudyError, match=r"no completed trial yet \(1 pruned, 1 running\)"):
        analysis.build_report([record(0, "resnet18", [0.5], state="PRUNED"), record(1, "resnet18", [0.5], state="RUNNING")],
                        experiment="e", study_name="s")


def test_report_module_stays_pure() -> None:
    code = ("import sys, pet_sweep.report.stats, pet_sweep.report.verdicts, pet_sweep.report.analysis, "
            "pet_sweep.report.render; "
            "print(sorted(m for m in ('fastai', 'torch', 'mlflow', 'optuna', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_train_loss_above_valid_loss_on_a_run_that_fit_is_not_underfit() -> None:
    # trial 0 of the default digits sweep: dropout keeps the train loss above the valid
    # loss, but it fell from 0.93 to 0.05 and the error rate has settled at 0.84 %
    a = verdicts.analyse_history(history([0.928, 0.188, 0.245, 0.22, 0.156, 0.105, 0.071, 0.049],
                                   [4.727, 5.755, 2.282, 0.907, 0.375, 0.031, 0.029, 0.026],
                                   [0.808, 0.685, 0.309, 0.206, 0.111, 0.011, 0.008, 0.008]), n_valid=359)
    assert a.final_gap < 0 and a.verdict == verdicts.CONVERGED
