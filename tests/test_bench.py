"""The GPU benchmark script, run end to end on the CPU with tiny sizes.

No session that wrote it had a GPU, so this is what makes sure it runs the first
time one is there: every precision and memory format, and the busy-share trial
through pet-sweep's own DataLoaders and recipe. Its figures mean nothing here.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest


@pytest.mark.train
def test_gpu_precision_script_runs_on_the_cpu(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import gpu_precision

    monkeypatch.setattr(gpu_precision, "temp_dir", lambda prefix: tmp_path / prefix)

    gpu_precision.main(["--device", "cpu", "--archs", "resnet18", "--batch-sizes", "2", "--steps", "1",
                        "--size", "32", "--trial-batch", "8"])
    out = capsys.readouterr().out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("resnet18 | ")]
    assert [row[:3] for row in rows] == [["resnet18", "2", "False"], ["resnet18", "2", "True"]]
    for row in rows:  # images/s for fp32, fp16, bf16 and both ratios, all measured
        assert all(float(cell) > 0 for cell in row[3:])
    assert re.search(r"resnet18: median fp16/fp32 speed-up \d+\.\d\dx", out)
    trial = re.search(r"resnet18 fp16 trial on digits at 32 px \(2 epochs, (\d+)s\): GPU busy (\S+)%", out)
    assert trial, out
    assert trial.group(2) == "nan"  # no GPU counter on a CPU: said as unknown, not as 0 %


def test_gpu_precision_script_without_cuda_measures_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from bench import gpu_precision

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here: the script would measure it")
    gpu_precision.main([])
    assert capsys.readouterr().out.strip() == "no CUDA GPU here: nothing to measure"


TINY_SPACE = ("arch: xresnet18\nbase_lr: 1.0e-2\nlr_hi: {low: 3.0e-3, high: 3.0e-2, log: true}\nlr_mult: 10\n"
              "freeze_epochs: 0\nepochs: 1\n")


@pytest.mark.train
def test_pruning_script_judges_each_pruner_on_epochs_and_replayed_held_out_error(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import pruning

    monkeypatch.setattr(pruning, "temp_dir", lambda prefix: tmp_path / prefix)
    (tmp_path / "tiny.yaml").write_text(TINY_SPACE)
    pruning.main(["--seeds", "0", "--n-trials", "2", "--img-size", "16", "--limit", "100",
                  "--space", str(tmp_path / "tiny.yaml"), "--pruners", "median", "schedule,min_fraction=0.5",
                  "--threads", "1", "--save", str(tmp_path / "s0.json")])
    out = capsys.readouterr().out
    assert re.search(r"^# \d{4}-\d\d-\d\d \d\d:\d\d UTC, commit \S+, \d+ cores .*torch CPU kernels", out, re.M)
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("0 | ")]
    assert [row[1] for row in rows] == ["none", "median", "schedule,min_fraction=0.5"]
    for row in rows:  # 2 trials of 1 epoch: nothing to prune
        assert row[2:4] == ["2", "0%"], row
        assert re.fullmatch(r"\d\.\d{4} \(\d+/10\) \[\d\.\d{4}, \d\.\d{4}\]", row[7]), row  # 10 held-out items
    assert "median: median saving 0% (target >= 40%)" in out and "target not met" in out
    assert out.strip().endswith("winner: none (no pruner met the target)")
    # --combine judges the saved sweeps again, without training: the same verdicts
    verdicts = out[out.index("none: held-out error"):]
    pruning.main(["--combine", str(tmp_path / "s0.json")])
    combined = capsys.readouterr().out
    assert combined.startswith(f"# pruning: combined {tmp_path / 's0.json'}: seeds 0\n")
    assert combined.endswith(verdicts)
    with pytest.raises(SystemExit, match=r"s0.json: seeds \[0\] are already in an earlier file"):
        pruning.main(["--combine", str(tmp_path / "s0.json"), str(tmp_path / "s0.json")])


def test_pruning_script_takes_a_shipped_experiment_with_its_source(tmp_path: Path) -> None:
    """`bench.pruning --experiment digits-transfer`: each sweep's experiments file holds the
    target's space and pruner as shipped, and the source its trials fine-tune from."""
    from bench.common import shipped_experiment, write_experiment
    from pet_sweep.config import load_experiment

    base, space, others = shipped_experiment("digits-transfer")
    assert base["pruner"]["name"] == "schedule" and set(space) >= {"arch", "freeze_epochs", "lr_mult"}
    assert list(others) == ["digits-source"]
    exp = load_experiment(write_experiment(tmp_path / "t", base, space, others=others))
    assert exp.config.model.pretrained_on == "digits-source" and exp.config.data.per_class == 10
    source = load_experiment(exp.config_path, "digits-source")
    assert source.config.data.classes == ["0", "1", "2", "3", "4"]
    assert shipped_experiment("digits")[2] == {}  # trained from scratch: nothing else written
    with pytest.raises(SystemExit, match=r"experiments.yaml: no experiment 'digitz' \(known: digits, "):
        shipped_experiment("digitz")


def test_the_benchmarks_leave_the_selection_out_and_bench_selection_scales_it() -> None:
    from bench.common import fit_selection, shipped_experiment
    from pet_sweep.selection import SelectionConfig, check_selection

    shipped = shipped_experiment("digits", selection=True)[0]["selection"]
    assert shipped == {"seeds": 2, "confirm_top": 2, "baseline": True}
    assert "selection" not in shipped_experiment("digits")[0]  # one seed per config, as the figures were measured
    assert fit_selection(shipped, 12) == shipped               # fits: 4 of 12 reserved
    assert fit_selection(shipped, 4) == {"seeds": 2, "confirm_top": 1, "baseline": True}
    assert fit_selection(shipped, 3) == {"seeds": 2, "confirm_top": 0, "baseline": True}
    assert fit_selection(shipped, 2) == {"seeds": 1, "confirm_top": 0, "baseline": False}
    for n in range(2, 13):  # whatever the budget, what it gives passes the experiment's own check
        check_selection(SelectionConfig(**fit_selection(shipped, n)), n, file="f", experiment="e")


def test_pruning_winner_needs_the_saving_and_the_held_out_error() -> None:
    from bench.pruning import Sweep, judge, winner

    reference = [Sweep(100, 1.0, [], 0, test_errors=2, n_test=180)]
    runs = {"saves-and-holds": [Sweep(55, 1.0, [3], 1, test_errors=4, n_test=180)],
            "saves-more-but-worse": [Sweep(30, 1.0, [2], 1, test_errors=20, n_test=180)],
            "holds-but-saves-little": [Sweep(90, 1.0, [9], 1, test_errors=2, n_test=180)]}
    verdicts = judge(runs, reference)
    assert verdicts["saves-and-holds"]["met"] and not verdicts["saves-more-but-worse"]["inside"]
    assert verdicts["holds-but-saves-little"]["inside"] and not verdicts["holds-but-saves-little"]["met"]
    assert winner(verdicts) == "saves-and-holds"
    assert winner({k: v for k, v in verdicts.items() if k != "saves-and-holds"}) is None


def test_search_baseline_is_fastais_own_fine_tune(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bar is `learn.fine_tune(epochs)` with all of fastai's defaults (pct_start=0.99 frozen,
    halved base_lr, div=5 unfrozen), not the recipe's fit_one_cycle phases."""
    import argparse

    import fastai.callback.schedule  # noqa: F401 (patches fine_tune onto Learner: before our patch, not after)
    from fastai.learner import Learner

    from bench import search
    from pet_sweep.train import recipe  # noqa: F401 (imports fastai's patches too)

    monkeypatch.setattr(search, "temp_dir", lambda prefix: tmp_path / prefix)
    calls: list[tuple[tuple, dict]] = []
    monkeypatch.setattr(Learner, "fine_tune", lambda self, *args, **kwargs: calls.append((args, kwargs)),
                        raising=False)
    monkeypatch.setattr(Learner, "fit_one_cycle", lambda *a, **k: pytest.fail("the recipe's schedule"),
                        raising=False)
    args = argparse.Namespace(img_size=16, limit=100, n_trials=1)
    error = search.fastai_default_error(search.experiment("tpe", 0, args), epochs=3)
    assert calls == [((3,), {})]  # every other setting is fastai's default
    assert 0 <= error <= 1


def test_search_counts_the_same_error_as_reached() -> None:
    """7 of 180 wrong in two trials, computed in float32 as 1 - accuracy, may differ in the 8th
    digit: the first of them reaches the best, not the one that happens to round lower."""
    from bench.search import trials_to_reach

    seven = 7 / 180
    errors = [0.2889, seven + 3e-9, 0.0667, seven]
    assert trials_to_reach(errors, min(errors)) == 2
    assert trials_to_reach(errors, 0.05) == 2 and trials_to_reach(errors, 0.01) is None


@pytest.mark.parametrize("a_times, reps, verdict", [
    ([102.0, 110.0, 101.0, 104.0, 99.0], 5, "ratio a/c 1.020, median of 5 (the orchestration alone; target <= 1.03): met"),
    ([102.0, 110.0, 104.0, 106.0, 99.0], 5, "ratio a/c 1.040, median of 5 (the orchestration alone; target <= 1.03): "
                                            "not met"),
    ([101.0, 101.0, 101.0], 3, "not judged (3 < 5 repetitions)"),
])
def test_overhead_is_judged_on_the_median_a_c_of_five_repetitions(
        a_times: list[float], reps: int, verdict: str, capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import overhead

    monkeypatch.setattr(overhead, "temp_dir", lambda prefix: tmp_path / prefix)
    timings = iter(a_times)
    monkeypatch.setattr(overhead, "with_pet_sweep", lambda path, name: next(timings))
    monkeypatch.setattr(overhead, "bare_fastai", lambda *args, dls=None: 100.0)  # (b) and (c): 100 s each
    overhead.main(["--reps", str(reps), "--limit", "100", "--img-size", "16"])
    out = capsys.readouterr().out
    assert len([line for line in out.splitlines() if re.match(r"\d \| ", line)]) == reps
    assert verdict in out.splitlines()[-1]


@pytest.mark.slow
@pytest.mark.train
def test_overhead_times_checkpoints_and_keeping_the_winner_arm_by_arm(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--checkpoints` and `--keep-winner` for real, one tiny repetition each: every arm ran, its own
    work was timed, and what it leaves (a checkpoint file, the kept models) was measured."""
    from bench import overhead

    monkeypatch.setattr(overhead, "temp_dir", lambda prefix: tmp_path / prefix)
    tiny = ["--reps", "1", "--limit", "100", "--img-size", "16"]
    overhead.main(["--checkpoints", *tiny])
    out = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"0 \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+", out[-5]), out
    every, share = (re.fullmatch(rf"median {arm}/none [\d.]+ over 1 repetitions; its own work took ([\d.]+)s in all",
                                 line) for arm, line in zip(("every epoch", "share rule"), out[-4:-2]))
    assert every and float(every[1]) > 0 and share, out  # 10 epochs saved
    assert [re.fullmatch(rf"{arch}: checkpoint file \d+ MiB, one save [\d.]+s", line) is not None
            for arch, line in zip(("resnet18", "xresnet18"), out[-2:])] == [True, True], out

    overhead.main(["--keep-winner", *tiny])
    out = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"0 \| [\d.]+ \| [\d.]+ \| [\d.]+", out[-3]), out
    spent = re.fullmatch(r"median keep on/keep off [\d.]+ over 1 repetitions; its own work took ([\d.]+)s in all",
                         out[-2])
    assert spent and float(spent[1]) > 0, out
    kept = re.fullmatch(r"arm-0: 3 trials, (\d) kept \(at most 2\), ([\d.]+) MiB in MLflow's artifacts", out[-1])
    assert kept and 1 <= int(kept[1]) <= 2 and float(kept[2]) > 1, out


def test_rates_keep_significant_digits_on_a_slow_machine() -> None:
    from bench.gpu_precision import significant

    # a busy 2-core CPU measured 0.4 images/s: printed as "0" it read as nothing measured
    assert [significant(v) for v in (0.4, 0.004123, 1.0, 12.345, 1234.4)] == ["0.4", "0.00412", "1", "12.3", "1234"]


@pytest.mark.train
def test_chapter5_script_judges_five_claims_on_the_held_out_items(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import chapter5
    from pet_sweep.replay import load_replay

    monkeypatch.setattr(chapter5, "temp_dir", lambda prefix: tmp_path / prefix)
    saved = tmp_path / "seed0.json"
    chapter5.main(["--seeds", "0", "--img-size", "16", "--limit", "200", "--pretrain-epochs", "1", "--epochs", "1",
                   "--num-it", "30", "--save", str(saved)])
    out = capsys.readouterr().out
    n_test = int(re.search(r"# \d+ training, \d+ validation, (\d+) held-out items", out).group(1))
    arms = [line.split(" | ") for line in out.splitlines() if line.startswith("0 | ")]
    assert [row[1] for row in arms] == ["baseline", "scratch", "one-lr-from-start", "one-lr-unfrozen", "finder",
                                        "finder-x10", "deeper"]
    for row in arms:  # each arm: a config `pet-sweep train` reads, judged on every held-out item
        assert re.fullmatch(rf"\d\.\d{{4}} \(\d+/{n_test}\) \[\d\.\d{{4}}, \d\.\d{{4}}\]", row[2]), row
        cfg, _ = load_replay(tmp_path / "chapter5" / f"{row[1]}-seed0.yaml")
        assert (cfg.model.weights is None) == (row[1] == "scratch"), row  # only scratch lacks the pretrained body
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 5
    for row in rows:
        p, adjusted = float(row[4]), float(row[5])
        assert 0 <= p <= adjusted <= 1  # Holm never lowers a p-value
        assert row[6].rstrip(" |") in ("holds", "within noise", "reversed")
    assert "fewer than the 3 the claims are judged on" in out
    chapter5.main(["--combine", str(saved)])  # the saved predictions give the same table
    again = capsys.readouterr().out
    assert [line for line in again.splitlines() if line.startswith("| ")] == [
        line for line in out.splitlines() if line.startswith("| ")]


def test_chapter5_verdict_needs_the_corrected_p_and_reads_the_direction() -> None:
    from bench.chapter5 import verdict
    from pet_sweep.report.stats import compare_predictions, holm_corrected

    targets = [0] * 100
    right, wrong_30 = [0] * 100, [1] * 30 + [0] * 70
    better, worse, close = (compare_predictions("c", (0, a), (i, b), targets)
                            for i, (a, b) in enumerate([(right, wrong_30), (wrong_30, right),
                                                        (right, [1] * 3 + [0] * 97)], start=1))
    assert [verdict(c) for c in holm_corrected([better, worse, close])] == ["holds", "reversed", "within noise"]
    # 6 vs 0 discordant items: p = 0.031 alone, but not below 0.05 once Holm counts five claims
    six = compare_predictions("c", (0, right), (1, [1] * 6 + [0] * 94), targets)
    assert verdict(holm_corrected([six])[0]) == "holds"
    assert verdict(holm_corrected([six] + [replace(six, other_trial=i) for i in range(2, 6)])[0]) == "within noise"


SELECTION_SPACE = ("arch: xresnet18\nbase_lr: 1.0e-2\nlr_hi: {low: 3.0e-3, high: 3.0e-2, log: true}\nlr_mult: 10\n"
                   "freeze_epochs: {low: 0, high: 1}\nepochs: 1\n")


@pytest.mark.train
@pytest.mark.slow
def test_selection_script_replays_each_methods_pick_at_equal_epochs(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end on a tiny digits task: every method's pick replayed with `train` on the retrain
    seeds, the searches at (at least) the first one's epochs, the tables, and --combine."""
    from bench import selection

    monkeypatch.setattr(selection, "temp_dir", lambda prefix: tmp_path / prefix)
    (tmp_path / "tiny.yaml").write_text(SELECTION_SPACE)
    selection.main(["--experiment", "digits", "--seeds", "0", "--n-trials", "2", "--img-size", "16", "--limit", "100",
                    "--space", str(tmp_path / "tiny.yaml"), "--retrain-seeds", "7", "8", "--threads", "1",
                    "--save", str(tmp_path / "s0.json")])
    out = capsys.readouterr().out
    assert re.search(r"^# \d{4}-\d\d-\d\d \d\d:\d\d UTC, commit \S+, \d+ cores", out, re.M)
    assert "changed from the shipped experiment: n_trials 2, img_size 16, limit 100, space " in out
    assert ", selection seeds=1 confirm_top=0 baseline=False)" in out  # the shipped selection, cut to 2 trials
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("0 | ")]
    assert [row[1] for row in rows] == list(selection.METHODS)
    budget = int(rows[0][3])  # pet-sweep's 2 trials of 1 or 2 epochs
    assert rows[0][2] == "2" and 2 <= budget <= 4
    for row in rows[1:3]:  # the other searches: at least its epochs, at most one trial (2 epochs) more
        assert budget <= int(row[3]) <= budget + 2, row
    assert rows[3][2:5] == ["0", "0", "-"]  # fine_tune: no search
    for row in rows:  # 10 held-out items, one replay per retrain seed, and their mean
        errors = [float(e) for e in row[6].split()]
        assert len(errors) == 2 and all(e * 10 == pytest.approx(round(e * 10)) for e in errors), row
        assert float(row[7]) == pytest.approx(sum(errors) / 2, abs=1e-4)
    assert "# over 1 sweep seed (0) x retrain seeds 7 8 x 10 held-out items" in out
    summary = [line for line in out.splitlines() if re.match(r"\| (pet-sweep|optuna-tpe-median|random|fine_tune) \|", line)]
    assert len(summary) == 4
    assert re.search(r"\| fine_tune \| \d\.\d{4} \(\d+/20\) \[", summary[3])
    assert min(float(line.split(" | ")[3]) for line in summary) == 0.0  # the best config's regret
    pairs = [line for line in out.splitlines() if re.match(r"\| \S+ vs \S+ \| \d", line)]
    assert len(pairs) == 6 and pairs[0].startswith("| pet-sweep vs optuna-tpe-median | ")
    assert out.strip().endswith("goal: not judged (1 < 5 sweep seeds)")
    tables = out[out.index("# over 1 sweep seed"):]
    selection.main(["--combine", str(tmp_path / "s0.json")])
    combined = capsys.readouterr().out
    assert combined.startswith(f"# selection: combined {tmp_path / 's0.json'}: sweep seeds 0\n")
    assert combined.endswith(tables)
    with pytest.raises(SystemExit, match=r"s0.json: sweep seed 0 is already in an earlier file"):
        selection.main(["--combine", str(tmp_path / "s0.json"), str(tmp_path / "s0.json")])


def _picks(errors: dict[str, list[int]], n: int = 100) -> dict[int, dict[str, Any]]:
    """Five sweep seeds; per method and seed, a pick whose 2 replays each get the first k of n items wrong."""
    from bench.selection import Pick

    return {seed: {name: Pick({}, preds={r: [1] * ks[seed] + [0] * (n - ks[seed]) for r in (0, 1)})
                   for name, ks in errors.items()} for seed in range(5)}


def test_selection_goal_is_checked_on_the_pooled_and_the_per_seed_tests() -> None:
    from bench.selection import report

    targets = [0] * 100
    wins = report(_picks({"pet-sweep": [5] * 5, "optuna-tpe-median": [30] * 5, "random": [5, 5, 5, 5, 6],
                          "fine_tune": [40] * 5}), targets)
    assert "goal: pet-sweep's pick beats optuna-tpe-median's beyond noise (pooled and over sweep seeds, " \
           "Holm p < 0.05): met" in wins
    assert "goal: pet-sweep's pick beats random's beyond noise (pooled and over sweep seeds, Holm p < 0.05): " \
           "not met" in wins
    assert any(line.startswith("| pet-sweep vs random | ") and line.endswith(" | within noise (items) |")
               for line in wins)
    assert wins[-1].endswith("never loses to fine_tune beyond noise (pooled, and on each sweep seed, "
                             "Holm across seeds): met")
    # the same picks on four sweep seeds and a far better one on the fifth: beyond the items' noise, not the seeds'
    one_seed = report(_picks({"pet-sweep": [5, 5, 5, 5, 5], "random": [5, 5, 5, 5, 40]}), targets)
    row = next(line for line in one_seed if line.startswith("| pet-sweep vs random | "))
    assert " | 0 / 0 | " not in row and row.endswith(" | 1 / 4 / 0 | 0.374 | within noise (sweep seeds) |"), row
    assert "goal: pet-sweep's pick beats random's beyond noise (pooled and over sweep seeds, Holm p < 0.05): " \
           "not met" in one_seed
    # at that spread (sd 0.157 of a mean 0.07) a paired t-test would find it at power 0.8 from 40 sweep seeds
    assert any(line.startswith("# sweep seeds a paired t-test would need") and line.endswith(": random 40")
               for line in one_seed)
    # better pooled, but far worse than fine_tune on sweep seed 3: it lost there
    lost = report(_picks({"pet-sweep": [5, 5, 5, 60, 5], "fine_tune": [20] * 5}), targets)
    assert lost[-1].endswith(": not met (loses on sweep seeds 3)")
    assert any(line.startswith("| pet-sweep | 0.1600 (160/1000) [") for line in lost)
    assert any(line.startswith("| fine_tune | 0.2000 (200/1000) [") and "| +0.1500 |" in line for line in lost)


def test_selection_fine_tune_defaults_lie_inside_the_shipped_space() -> None:
    from bench.common import shipped_experiment
    from bench.selection import fine_tune_defaults

    space = shipped_experiment("digits-transfer")[1]
    params = fine_tune_defaults(space)
    assert params == {"arch": space["arch"]["choices"][0], "base_lr": 2e-3, "lr_lo": 1e-5, "lr_hi": 1e-3,
                      "freeze_epochs": 1, "epochs": 6}
    for key in ("base_lr", "lr_hi", "freeze_epochs", "epochs"):
        assert space[key]["low"] <= params[key] <= space[key]["high"], key
    assert space["lr_mult"]["low"] <= params["lr_hi"] / params["lr_lo"] <= space["lr_mult"]["high"]
