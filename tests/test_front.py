"""Error against cost: costs in the report, the recommendation (cheapest within noise of the
best, Holm-corrected with the report's other comparisons), the Pareto front of a
multi-objective study, and `export --pick`.

Studies are built by hand (`study.add_trial`) in a temporary SQLite file: each trial's
predictions on 100 shared items are chosen so that the McNemar tests come out as planned.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from pet_sweep.report import analysis, render
from pet_sweep.report.read import trial_records
from tests.test_report import record
from tests.test_report_cli import invoke, write_config

TARGETS = tuple(i % 10 for i in range(100))
PARAMS = {"arch": "resnet18", "base_lr": 1e-2, "lr_lo": 1e-3, "lr_hi": 1e-2, "freeze_epochs": 1, "epochs": 1}
OLD_COLUMNS = ("| number | state | arch | base_lr | lr_lo | lr_hi | freeze_epochs | epochs | error_rate | ci_low | "
               "ci_high | best_error | best_epoch | epochs_run | final_gap | verdict | rec_unfrozen_epochs | seconds |")


def preds(wrong: range | list[int]) -> tuple[int, ...]:
    """Predictions on the 100 items, wrong on exactly the `wrong` ones."""
    return tuple((t + 1) % 10 if i in wrong else t for i, t in enumerate(TARGETS))


def add(study: Any, wrong: range | list[int], arch: str = "resnet18", epochs: int = 1,
        costs: dict[str, float] | None = None) -> None:
    """A completed trial: its error on the 100 items, its values (error, then the study's costs)."""
    import optuna
    from optuna.distributions import CategoricalDistribution, IntDistribution

    from pet_sweep.sweep.records import PARAMS_ATTR, PREDS_ATTR, TARGETS_ATTR

    error = len(wrong) / 100
    costs = costs or {}
    names = study.user_attrs.get("objectives", ["error_rate"])
    values = [error, *(costs[n] for n in names[1:])]
    study.add_trial(optuna.trial.create_trial(
        values=values, params={"arch": arch, "epochs": epochs},
        distributions={"arch": CategoricalDistribution(["resnet18", "resnet34", "xresnet18", "xresnet34"]),
                       "epochs": IntDistribution(1, 8)},
        user_attrs={PARAMS_ATTR: {**PARAMS, "arch": arch, "epochs": epochs}, PREDS_ATTR: list(preds(wrong)),
                    TARGETS_ATTR: list(TARGETS), **costs}))


def make_study(folder: Path, objectives: list[str], trials: list[tuple[Any, ...]]) -> tuple[Path, Any]:
    """experiments.yaml (experiment "tiny") and its study: `trials` as (wrong, arch, costs)."""
    import optuna

    path = write_config(folder, objectives=objectives)
    (folder / "stores").mkdir(exist_ok=True)
    study = optuna.create_study(study_name="tiny", storage=f"sqlite:///{folder / 'stores' / 'optuna.db'}",
                                directions=["minimize"] * len(objectives))
    study.set_user_attr("objectives", objectives)
    for wrong, arch, costs in trials:
        add(study, wrong, arch, costs=costs)
    return path, study


def cost(predict_ms: float, train_seconds: float = 10.0) -> dict[str, float]:
    return {"train_seconds": train_seconds, "predict_ms": predict_ms, "predict_ms_batch": predict_ms / 4,
            "params_m": 11.2, "peak_memory_mb": 300.0}


def report_of(study: Any, objectives: list[str]) -> analysis.StudyReport:
    return analysis.build_report(trial_records(study, 32, objectives), experiment="tiny", study_name="tiny",
                                 objectives=objectives)


# -- the recommendation -----------------------------------------------------------


def test_the_cheapest_trial_within_noise_is_recommended_and_one_beyond_noise_refused(tmp_path: Path) -> None:
    # best: 2 wrong at 8 ms; trial 1: 4 wrong at 2 ms (2 discordant items: p=0.5, within noise);
    # trial 2: 20 wrong at 1 ms (18 more: beyond noise even after Holm)
    _, study = make_study(tmp_path, ["error_rate"], [
        (range(2), "resnet34", cost(8.0)), (range(4), "resnet18", cost(2.0)), (range(20), "xresnet18", cost(1.0))])
    rep = report_of(study, ["error_rate"])
    rec = rep.recommendation
    assert rep.best.number == 0 and rec.pick == 1 and rec.cost == "predict_ms"
    assert rec.ratio == pytest.approx(4.0)
    verdicts = {c.other_trial: c.verdict for c in rec.comparisons}
    assert verdicts == {2: "beyond noise", 1: "within noise"}
    assert [c.other_trial for c in rec.comparisons] == [2, 1]  # cheapest first
    assert "trial 1 (resnet18): 4.00x cheaper by predict_ms (the default cost of a single-objective study)" in rec.text
    assert "2.00 against 8.00 ms/image" not in rec.text and "2 against 8 ms/image" in rec.text
    assert "error 4.00% (95% CI 1.57%–9.84%, 4/100 wrong) against 2.00% (95% CI" in rec.text
    text = render.summary_text(rep)
    assert re.search(r"^recommend\s+trial 1 \(resnet18\): 4\.00x cheaper", text, re.M), text
    assert "ship the cheaper trial 1, within noise of the best and 4.00x cheaper by predict_ms" in text
    # the trial table shows the costs, and says what they are
    md = render.markdown(rep, {})
    assert "| seconds | train_seconds | predict_ms | params_m | peak_memory_mb |" in md
    assert "predict_ms: milliseconds to predict one image at batch size 1" in md
    assert "## Error against cost" in md and "Recommendation: trial 1" in md

    # no trial within noise: the best is shipped, and said so
    _, alone = make_study(tmp_path / "b", ["error_rate"], [(range(2), "resnet34", cost(8.0)),
                                                          (range(20), "xresnet18", cost(1.0))])
    rec = report_of(alone, ["error_rate"]).recommendation
    assert rec.pick == 0 and "none of the 1 trial a tenth or more cheaper by predict_ms" in rec.text and "ship it" in rec.text
    # the best is the cheapest: said plainly
    _, cheap = make_study(tmp_path / "c", ["error_rate"], [(range(2), "resnet34", cost(1.0)),
                                                          (range(3), "xresnet18", cost(8.0))])
    rec = report_of(cheap, ["error_rate"]).recommendation
    assert rec.pick == 0 and rec.text.startswith("the lowest-error trial 0 is also the cheapest by predict_ms")
    # a few per cent is timing noise, not a cheaper config: cheaper means by a tenth at least
    _, close = make_study(tmp_path / "d", ["error_rate"], [(range(2), "resnet34", cost(8.0)),
                                                          (range(2), "resnet34", cost(7.5))])
    rec = report_of(close, ["error_rate"]).recommendation
    assert rec.pick == 0 and "no other trial is a tenth cheaper" in rec.text


def test_a_p_below_005_that_does_not_survive_holm_is_within_noise(tmp_path: Path) -> None:
    # the best has no error; the runner-up (cheap) 6 wrong: McNemar p = 2/2^6 = 0.031 < 0.05 alone.
    # The best resnet18 (6 other wrong items, also cheaper) makes a second hypothesis:
    # Holm gives 2 x 0.031 = 0.0625, so neither is beyond noise, and the cheaper of the two is picked.
    trials = [(range(0), "resnet34", cost(8.0)), (range(6), "resnet34", cost(4.0)),
              (range(10, 16), "resnet18", cost(2.0))]
    _, study = make_study(tmp_path, ["error_rate"], trials)
    rep = report_of(study, ["error_rate"])
    rec = rep.recommendation
    by_trial = {c.other_trial: c for c in rec.comparisons}
    assert by_trial[2].p_value == pytest.approx(2 / 2 ** 6) and by_trial[2].p_value < 0.05
    assert by_trial[2].adjusted == (pytest.approx(0.0625),) * 2 and by_trial[2].verdict == "within noise"
    assert rec.pick == 2 and "Holm-adjusted p=0.0625" in rec.text
    # the report's own comparisons are corrected in the same family: the same adjusted p
    assert {c.other_trial: c.adjusted for c in rep.comparisons}[1] == (pytest.approx(0.0625),) * 2
    # with a third cheaper trial far beyond noise, the family grows but that one still fails
    _, more = make_study(tmp_path / "more", ["error_rate"], [*trials, (range(30, 60), "xresnet18", cost(1.0))])
    rec = report_of(more, ["error_rate"]).recommendation
    assert {c.other_trial: c.verdict for c in rec.comparisons}[3] == "beyond noise" and rec.pick == 2


def test_an_old_study_without_costs_reports_as_before() -> None:
    records = [record(0, "resnet18", [0.3, 0.2, 0.10]), record(1, "resnet34", [0.3, 0.12, 0.05])]
    rep = analysis.build_report(records, experiment="pets", study_name="pets")
    assert rep.recommendation is None and not rep.multi_objective and rep.front == ()
    labels = [label for label, _ in render.summary_lines(rep)]
    assert "recommend" not in labels and "note" not in labels
    md = render.markdown(rep, {})
    assert OLD_COLUMNS in md and "## Error against cost" not in md and "predict_ms" not in md
    assert "Error against cost" not in render.html(rep, {})
    # the comparisons are those of the rivals alone, corrected among themselves
    assert rep.comparisons == analysis.comparisons_for(rep.best, [r for r in records if r.state == "COMPLETE"])


# -- multi-objective: the front, its table and figure -------------------------------


def test_a_two_objective_study_gets_a_front_table_and_figure(tmp_path: Path) -> None:
    from pet_sweep.report.read import ReportBundle
    from pet_sweep.report.read import render as render_files

    objectives = ["error_rate", "predict_ms"]
    # front: 0 (2 wrong, 8 ms), 1 (4 wrong, 2 ms), 3 (30 wrong, 0.5 ms); 2 is dominated by 1
    _, study = make_study(tmp_path, objectives, [
        (range(2), "xresnet34", cost(8.0)), (range(4), "xresnet18", cost(2.0)), (range(6), "xresnet34", cost(3.0)),
        (range(30), "xresnet18", cost(0.5))])
    assert len(study.directions) == 2
    rep = report_of(study, objectives)
    assert rep.multi_objective and rep.front == (3, 1, 0)
    assert {n for n in rep.front} == {t.number for t in study.best_trials}  # Optuna's own front
    assert rep.recommendation.pick == 1 and "(the study's second objective)" in rep.recommendation.text
    assert any("Optuna does not prune multi-objective trials" in note for note in rep.notes)
    files, written = render_files(ReportBundle(rep, study, tracking=None), tmp_path / "out")
    png = tmp_path / "out" / "figures" / "pareto_front.png"
    assert png in files and png.read_bytes().startswith(b"\x89PNG")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "(figures/pareto_front.png)" in md and "Pareto front over error_rate, predict_ms: 3 trials" in md
    table = md.split("Pareto front over")[1]
    assert re.search(r"\| trial \| arch \| error_rate \(95% CI\) \| predict_ms \|", table)
    assert re.search(r"\| 1 \| xresnet18 \| 4\.00% \(95% CI 1\.57%–9\.84%, 4/100 wrong\) \| 2 \|", table)
    assert "Optuna does not prune multi-objective trials" in (tmp_path / "out" / "report.html").read_text()


def test_the_front_figure_carries_wilson_intervals(tmp_path: Path) -> None:
    from pet_sweep.report.figures import pareto_front
    from pet_sweep.report.stats import wilson

    objectives = ["error_rate", "predict_ms"]
    _, study = make_study(tmp_path, objectives, [(range(2), "xresnet34", cost(8.0)),
                                                 (range(4), "xresnet18", cost(2.0))])
    fig = pareto_front(study, report_of(study, objectives))
    ax = fig.axes[0]
    (bars,) = [c for c in ax.containers if c.get_label() == "95% interval (Wilson)"]
    segments = bars.lines[2][0].get_segments()  # (data line, caps, bar lines)
    spans = sorted((s[0][0], round(s[0][1], 6), round(s[1][1], 6)) for s in segments)
    assert spans == [(x, round(lo, 6), round(hi, 6)) for x, (lo, hi) in ((2.0, wilson(4, 100)), (8.0, wilson(2, 100)))]
    assert ax.get_xlabel() == "predict_ms (ms/image)"


# -- export --pick -----------------------------------------------------------------


def test_export_pick_cheapest_best_and_trial(tmp_path: Path) -> None:
    path, _ = make_study(tmp_path, ["error_rate", "predict_ms"], [
        (range(2), "resnet34", cost(8.0)), (range(4), "resnet18", cost(2.0)), (range(20), "xresnet18", cost(1.0))])
    out = tmp_path / "cheap.yaml"
    result = invoke("export", "--config", path, "--pick", "cheapest", "-o", out)
    assert result.exit_code == 0, result.output
    doc = yaml.safe_load(out.read_text())
    assert doc["source"]["trial"] == 1 and doc["source"]["picked_by"] == "cheapest"
    assert doc["source"]["costs"] == cost(2.0)
    assert "picked: the cheapest within noise of the lowest error" in out.read_text().splitlines()[0]
    assert "(picked: cheapest; train_seconds 10, predict_ms 2," in result.output
    from pet_sweep.replay import load_replay

    assert load_replay(out)[0].source.picked_by == "cheapest"  # `train` reads it back, strictly
    for args, trial, rule in ((["--pick", "trial", "2"], 2, "trial"), (["--pick", "trial:2"], 2, "trial"),
                              (["--pick", "best"], 0, "best"),
                              ([], 0, "best"), (["--trial", "2"], 2, "trial")):
        result = invoke("export", "--config", path, *args, "-o", out, "--force")  # another trial each time
        assert result.exit_code == 0, (args, result.output)
        source = yaml.safe_load(out.read_text())["source"]
        assert (source["trial"], source["picked_by"]) == (trial, rule), args
    # the experiment argument after `--pick trial N` still reads as the experiment
    result = invoke("export", "tiny", "--config", path, "--pick", "trial", "1", "-o", out, "--force")
    assert result.exit_code == 0 and yaml.safe_load(out.read_text())["source"]["trial"] == 1, result.output


def test_export_writes_best_yaml_only_for_the_best_and_never_replaces_another_trials(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = make_study(tmp_path, ["error_rate", "predict_ms"], [
        (range(2), "resnet34", cost(8.0)), (range(4), "resnet18", cost(2.0)), (range(20), "xresnet18", cost(1.0))])
    monkeypatch.chdir(tmp_path)
    best, cheapest = tmp_path / "best.yaml", tmp_path / "cheapest.yaml"
    # each rule has its own default file, and the line after names it
    for args, file, trial in ((["--pick", "cheapest"], cheapest, 1), ([], best, 0),
                              (["--pick", "trial", "2"], tmp_path / "trial-2.yaml", 2)):
        result = invoke("export", "--config", path, *args)
        assert result.exit_code == 0, (args, result.output)
        assert yaml.safe_load(file.read_text())["source"]["trial"] == trial, args
        assert f"pet-sweep train {file.name} " in result.output, result.output
        assert file.read_text().endswith("\n")
    # best.yaml holds trial 0: another trial is not written over it without --force
    before = best.read_bytes()
    result = invoke("export", "--config", path, "--pick", "cheapest", "-o", best)
    assert result.exit_code == 2, result.output
    assert "holds trial 0 of study 'tiny' (picked: best), not trial 1" in result.output and "--force" in result.output
    assert best.read_bytes() == before
    # the same trial again brings its file up to date; --force replaces another's
    assert invoke("export", "--config", path, "-o", best).exit_code == 0
    result = invoke("export", "--config", path, "--pick", "cheapest", "-o", best, "--force")
    assert result.exit_code == 0 and yaml.safe_load(best.read_text())["source"]["trial"] == 1, result.output
    # a file export did not write is no config to replace either
    notes = tmp_path / "notes.yaml"
    notes.write_text("my: notes\n")
    result = invoke("export", "--config", path, "-o", notes)
    assert result.exit_code == 2 and "holds no config written by `pet-sweep export`" in result.output
    assert notes.read_text() == "my: notes\n"


@pytest.mark.parametrize("args, message", [
    (["--pick", "cheap"], "Invalid value for '--pick': 'cheap': expected best, cheapest or trial N"),
    (["--pick", "trial"], "'trial': `trial` needs the trial's number: --pick trial 7"),
    (["--pick", "trial", "x"], "`trial` needs the trial's number"),
    (["--pick", "best", "--trial", "1"], "give --pick or --trial, not both"),
])
def test_a_bad_pick_exits_2_naming_it(tmp_path: Path, args: list[str], message: str) -> None:
    path, _ = make_study(tmp_path, ["error_rate"], [(range(2), "resnet34", cost(8.0))])
    result = invoke("export", "--config", path, *args, "-o", tmp_path / "best.yaml")
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "best.yaml").exists()


def test_pick_cheapest_on_a_study_without_costs_is_refused(tmp_path: Path) -> None:
    path, _ = make_study(tmp_path, ["error_rate"], [(range(2), "resnet34", None), (range(4), "resnet18", None)])
    result = invoke("export", "--config", path, "--pick", "cheapest", "-o", tmp_path / "best.yaml")
    assert result.exit_code == 2 and "recorded no costs" in result.output and "--pick best" in result.output
    assert not (tmp_path / "best.yaml").exists()
    result = invoke("export", "--config", path, "-o", tmp_path / "best.yaml")
    source = yaml.safe_load((tmp_path / "best.yaml").read_text())["source"]
    assert result.exit_code == 0 and source["picked_by"] == "best" and "costs" not in source


# -- bench.front --------------------------------------------------------------------


def test_bench_front_summary_says_how_much_cheaper_and_whether_within_noise(tmp_path: Path) -> None:
    from bench.front import summary
    from pet_sweep.config import load_experiment

    path, _ = make_study(tmp_path, ["error_rate", "predict_ms"], [
        (range(2), "xresnet34", cost(8.0, 20.0)), (range(4), "xresnet18", cost(2.0, 5.0))])
    lines = summary(load_experiment(path, "tiny"))
    assert lines[0] == "objectives error_rate, predict_ms (2 directions); 2 completed trials"
    assert lines[2] == "0 | xresnet34 | 1 | 0.0200 (2/100) [0.0055, 0.0700] | 8 | 20"
    assert lines[-1].startswith("recommended trial 1 (xresnet18, 1 epochs) vs lowest-error trial 0 (xresnet34, 1 "
                                "epochs): predict_ms 2 vs 8 (4.00x cheaper); train_seconds 5 vs 20 (4.00x cheaper); "
                                "within noise (exact McNemar p=0.5")


def test_bench_front_runs_end_to_end(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import front

    monkeypatch.setattr(front, "temp_dir", lambda prefix: tmp_path / prefix)
    front.main(["--n-trials", "2", "--limit", "100", "--img-size", "16", "--epochs", "1", "1"])
    out = capsys.readouterr().out
    assert re.search(r"^# \d{4}-\d\d-\d\d \d\d:\d\d UTC, commit \S+, \d+ cores", out, re.M)
    assert re.search(r"^objectives error_rate.*; 2 completed trials$", out, re.M), out
    rows = [line for line in out.splitlines() if re.match(r"\d \| xresnet(18|34) \| 1 \| ", line)]
    assert len(rows) == 2, out
    # with costs recorded, the comparison; on a branch without them, said so
    last = out.strip().splitlines()[-1]
    assert last.startswith(("recommended", "lowest error: trial")), last


def test_of_trials_within_a_tenth_of_the_cheapest_the_lowest_error_is_recommended(tmp_path: Path) -> None:
    # as bench.front found on digits: best 2 wrong at 12.6 ms; trial 1: 4 wrong at 5.47 ms;
    # trial 2: 6 wrong at 5.26 ms (4 % cheaper than trial 1: noise); trial 3: 3 wrong at 6.26 ms
    # (over a tenth dearer than trial 2). All three are within noise of the best.
    _, study = make_study(tmp_path, ["error_rate"], [
        (range(2), "xresnet34", cost(12.6)), (range(4), "xresnet18", cost(5.47)),
        (range(6), "xresnet18", cost(5.26)), (range(3), "xresnet18", cost(6.26))])
    rec = report_of(study, ["error_rate"]).recommendation
    assert {c.other_trial: c.verdict for c in rec.comparisons} == {1: "within noise", 2: "within noise",
                                                                   3: "within noise"}
    assert rec.pick == 1 and rec.ratio == pytest.approx(12.6 / 5.47)
    assert rec.text.startswith("trial 1 (xresnet18): 2.30x cheaper by predict_ms")
    assert rec.text.endswith("(trial 2 is cheaper still, 5.26 ms/image, but by less than a tenth, and errs more: "
                             "6.00% (95% CI 2.78%–12.48%, 6/100 wrong))")
    # a tenth or more cheaper is a real saving: the cheapest is shipped, with no aside
    _, study = make_study(tmp_path / "b", ["error_rate"], [
        (range(2), "xresnet34", cost(12.6)), (range(4), "xresnet18", cost(5.47)), (range(6), "xresnet18", cost(4.9))])
    rec = report_of(study, ["error_rate"]).recommendation
    assert rec.pick == 2 and "cheaper still" not in rec.text


def test_a_cheaper_trial_that_never_learned_is_not_recommended() -> None:
    import dataclasses

    def costly(r: analysis.TrialRecord, predict_ms: float) -> analysis.TrialRecord:
        return dataclasses.replace(r, costs=cost(predict_ms))

    # both near chance on 10 classes (85 and 88 of 100 wrong): within noise of each other, and
    # no better than guessing (diverged); the cheap one is left out, the best is the reference
    best = costly(record(0, "xresnet34", [0.9, 0.85]), 8.0)
    cheap = costly(record(1, "xresnet18", [0.9, 0.88]), 1.0)
    rep = analysis.build_report([best, cheap], experiment="e", study_name="s", n_classes=10)
    assert rep.analyses[1].verdict == "never learned" and rep.comparisons[0].verdict == "within noise"
    rec = rep.recommendation
    assert rec.pick == 0 and rec.comparisons == ()
    assert rec.text == ("the lowest-error trial 0 is also the cheapest by predict_ms (the default cost of a "
                        "single-objective study): 8 ms/image (one shot during each trial, moved by the machine's "
                        "load; pet-sweep report --time-costs times them), and no other trial that learned is a "
                        "tenth cheaper; "
                        "ship it (1 cheaper trial that diverged or never learned left out)")
    # the same trial, when it learned, is the recommendation
    learned = costly(record(1, "xresnet18", [0.3, 0.12]), 1.0)
    good = costly(record(0, "xresnet34", [0.3, 0.10]), 8.0)
    rep = analysis.build_report([good, learned], experiment="e", study_name="s", n_classes=10)
    assert rep.recommendation.pick == 1
