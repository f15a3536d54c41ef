"""Costs that do not move with the machine's load (`report.costs`, `train.timing`): a cost is a
model's (arch, size, precision, batch size, device), timed side by side with repeats; "cheaper"
needs the timing intervals apart; trials of one model are one cost. And peak memory that a CPU
cannot see is "not measured", not a number near zero.

No assertion here is on a duration: the tests check which trials share a cost, the shape of
a timing session and the decisions drawn from it (the figures are in docs/benchmarks.md).
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from pet_sweep.report import analysis, render
from pet_sweep.report.costs import (
    TIMINGS_ATTR,
    CostBook,
    CostKey,
    Interval,
    KeyTiming,
    TimingSession,
    interval_coverage,
    median_interval,
)
from tests.test_front import cost, make_study
from tests.test_report import record
from tests.test_report_cli import invoke

BUSY_LOOP = "import time\nend = time.monotonic() + 120\nwhile time.monotonic() < end:\n    pass\n"


@pytest.fixture
def busy_cpu() -> Iterator[Any]:
    """Another process loading the CPU (a busy loop), started and stopped on demand."""
    procs: list[subprocess.Popen[bytes]] = []

    class Load:
        def start(self) -> None:
            if not procs:
                procs.append(subprocess.Popen([sys.executable, "-c", BUSY_LOOP]))

        def stop(self) -> None:
            for p in procs:
                p.kill()
                p.wait()
            procs.clear()

    load = Load()
    try:
        yield load
    finally:
        load.stop()


# -- the interval ------------------------------------------------------------------


@pytest.mark.parametrize("n", [6, 9, 15, 30])
def test_the_median_interval_is_the_narrowest_order_statistic_pair_that_covers_95_percent(n: int) -> None:
    samples = [float(x) for x in reversed(range(n))]  # any order: the interval sorts them
    got = median_interval(samples)
    j = int(got.low)  # the samples are 0..n-1, so a value is its rank
    assert got.high == n - 1 - j and got.n == n and got.median == (n - 1) / 2
    assert got.confidence == interval_coverage(n, j) >= 0.95
    assert j + 1 > (n - 1) // 2 or interval_coverage(n, j + 1) < 0.95  # one rank narrower falls short


def test_too_few_repeats_give_the_whole_range_and_say_what_it_covers() -> None:
    got = median_interval([3.0, 1.0, 2.0, 5.0, 4.0])
    assert (got.low, got.high) == (1.0, 5.0) and got.confidence == pytest.approx(1 - 2 / 2 ** 5)
    assert got.confidence < 0.95


# -- the decisions -----------------------------------------------------------------


def _costly(r: analysis.TrialRecord, predict_ms: float, params_m: float = 21.8) -> analysis.TrialRecord:
    return dataclasses.replace(r, costs={**cost(predict_ms), "params_m": params_m}, precision="fp32", device="cpu")


def _key(arch: str) -> CostKey:
    return CostKey(arch, 32, "fp32", 64, "cpu")


def test_two_trials_of_one_model_are_one_cost_whatever_their_one_shot_timings() -> None:
    # the case: one architecture, 84.9 and 11.2 ms/image measured during two trials on a busy machine
    best = _costly(record(8, "xresnet34", [0.3, 0.11], wrong=11), 84.9)
    other = _costly(record(11, "xresnet34", [0.3, 0.14], wrong=14), 11.2)
    # judged trial by trial, the load would make the second "7.58x cheaper"
    untimed = analysis.build_report([best, other], experiment="e", study_name="s", n_classes=10)
    assert untimed.recommendation.pick == 11 and "7.58x cheaper" in untimed.recommendation.text
    book = CostBook({8: _key("xresnet34"), 11: _key("xresnet34")})
    rep = analysis.build_report([best, other], experiment="e", study_name="s", n_classes=10, cost_book=book)
    assert book.same_cost(8, 11)
    assert rep.recommendation.pick == 8 and "x cheaper" not in rep.recommendation.text
    assert not [s for s in rep.next_steps if "cheaper" in s]
    _, table = render.costs_section(rep)
    assert table["trials"].tolist() == ["8, 11"]  # one row: one cost
    assert table["predict_ms (one shot, in trials)"].tolist() == ["11.2-84.9"]
    assert table["predict_ms (timed, 95% CI)"].tolist() == ["not timed"]


def _session(*timings: tuple[str, float, float, float]) -> TimingSession:
    """A stored session: (arch, median, low, high) of predict_ms per key."""
    params = {"xresnet18": 11.7, "xresnet34": 21.8}
    return TimingSession(tuple(KeyTiming(_key(arch), {"predict_ms": Interval(m, lo, hi, 15)}, params[arch], 0.1)
                               for arch, m, lo, hi in timings), "2026-12-07T00:00:00+00:00", "cpu", 1, 15, 3.0)


@pytest.mark.parametrize("low, high, cheaper", [(9.0, 10.5, True), (9.0, 12.5, False)])
def test_another_model_is_cheaper_only_where_the_timing_intervals_are_apart(low: float, high: float,
                                                                            cheaper: bool) -> None:
    best = _costly(record(0, "xresnet34", [0.3, 0.10]), 50.0)   # one-shot timings that the session replaces
    other = _costly(record(1, "xresnet18", [0.3, 0.12]), 5.0, params_m=11.7)
    session = _session(("xresnet34", 14.0, 12.0, 16.0), ("xresnet18", 10.0, low, high))  # 1.4x by the medians
    book = CostBook({0: _key("xresnet34"), 1: _key("xresnet18")}, session)
    assert book.cheaper(other, best, "predict_ms", 0.9) is cheaper
    rec = analysis.build_report([best, other], experiment="e", study_name="s", n_classes=10,
                                cost_book=book).recommendation
    assert rec.pick == (1 if cheaper else 0)
    if cheaper:
        assert rec.text.startswith("trial 1 (xresnet18): 1.40x cheaper by predict_ms")
        assert f"10 [{low:.3g}, {high:.3g}] against 14 [12, 16] ms/image" in rec.text
        assert "timed side by side 2026-12-07T00:00:00+00:00 on cpu" in rec.text
    else:
        assert "x cheaper" not in rec.text and "14 [12, 16] ms/image" in rec.text
    # parameters are the models' own: the deterministic proxy is cheaper without an interval
    assert book.cheaper(other, best, "params_m", 0.9)


def test_a_session_round_trips_through_the_study_attrs() -> None:
    session = _session(("xresnet34", 14.0, 12.0, 16.0))
    assert TimingSession.from_dict(session.as_dict()) == session
    assert TimingSession.from_dict(None) is None


# -- timing a study, one of its trials under load -----------------------------------


def _one_shot(model: Any, loaded: bool, busy: Any) -> float:
    """A trial's own predict_ms, as `train.costs` measures it during the trial."""
    import torch

    from pet_sweep.train import costs

    loaders = type("Loaders", (), {"train": type("Train", (), {"bs": 32})(),
                                   "valid": [(torch.randn(32, 3, 16, 16), torch.zeros(32))]})()
    if loaded:
        busy.start()
    try:
        return costs.predict_ms(type("Learn", (), {"model": model, "dls": loaders})(), "fp32")[0]
    finally:
        busy.stop()


def test_two_trials_of_one_arch_one_timed_under_load_are_one_cost_and_neither_is_cheaper(
        tmp_path: Path, busy_cpu: Any) -> None:
    import optuna
    from torch.utils.flop_counter import FlopCounterMode

    from pet_sweep.config import load_experiment
    from pet_sweep.report.read import cost_book, recommendation_of, trial_records
    from pet_sweep.sweep.storage import open_study
    from pet_sweep.train import timing

    model = timing.build_model("resnet18", 10).eval()
    idle, loaded = _one_shot(model, False, busy_cpu), _one_shot(model, True, busy_cpu)
    path, _ = make_study(tmp_path, ["error_rate"], [(range(2), "resnet18", cost(idle)),
                                                    (range(4), "resnet18", cost(loaded))])
    exp = load_experiment(path)
    study = open_study(exp, create=False)

    rounds = 6  # the fewest whose order-statistic interval reaches 95 % (`ROUNDS` at the end of a sweep)

    def load_half(round_: int) -> None:  # the machine gets busy halfway through the session
        if round_ == rounds // 2:
            busy_cpu.start()

    session = timing.time_study(study, exp, echo=lambda line: None, rounds=rounds, device="cpu", between=load_half)
    busy_cpu.stop()
    stored = optuna.load_study(study_name=exp.study_name, storage=exp.storage_url).user_attrs[TIMINGS_ATTR]
    assert TimingSession.from_dict(stored) == session
    (timed,) = session.timings  # one model, so one timing for both trials
    assert timed.key == CostKey("resnet18", 16, "", 32, "", False)
    assert {name: i.n for name, i in timed.intervals.items()} == {"predict_ms": rounds, "predict_ms_batch": rounds}
    assert all(i.low <= i.median <= i.high for i in timed.intervals.values())
    counter = FlopCounterMode(display=False)
    with counter:
        model(__import__("torch").randn(1, 3, 16, 16))
    assert timed.gflops == pytest.approx(counter.get_total_flops() / 1e9)
    assert timed.params_m == pytest.approx(sum(p.numel() for p in model.parameters()) / 1e6)

    records = trial_records(study, 32)
    book = cost_book(exp, study, records)
    assert book.same_cost(0, 1) and book.timing(0) == book.timing(1) == timed
    rec = recommendation_of(exp, study)
    assert rec.pick == 0 and "x cheaper" not in rec.text
    result = invoke("export", "--config", path, "--pick", "cheapest", "-o", tmp_path / "cheap.yaml")
    assert result.exit_code == 0 and "trial 0 of study" in result.output, result.output


def test_a_key_of_another_device_is_not_timed_here_and_says_why() -> None:
    from pet_sweep.train import timing

    session = timing.time_keys([CostKey("resnet18", 16, "fp16", 32, "cuda")], 10, rounds=6, device="cpu")
    assert session.timings == () and "ran on cuda, this process times on cpu" in session.skipped[0]


# -- peak memory a CPU cannot see ---------------------------------------------------


def test_a_cpu_peak_smaller_than_the_weights_and_gradients_is_not_measured() -> None:
    import torch

    from pet_sweep.train.costs import seen_peak_mb

    model = torch.nn.Linear(1024, 1024)  # 4 MiB of fp32 weights: training holds 8 MiB at least
    assert seen_peak_mb(0.0195, "vmhwm", model) is None
    assert seen_peak_mb(float("nan"), "sampled", model) is None
    assert seen_peak_mb(300.0, "vmhwm", model) == 300.0
    assert seen_peak_mb(0.0195, "cuda", model) == 0.0195  # CUDA counts the trial's own tensors


def test_measure_leaves_out_a_peak_it_could_not_see() -> None:
    import torch

    from pet_sweep.train import costs

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))
    loaders = type("Loaders", (), {"train": type("Train", (), {"bs": 4})(),
                                   "valid": [(torch.randn(5, 3, 2, 2), torch.zeros(5))]})()
    learn = type("Learn", (), {"model": model, "dls": loaders})()
    # what a CPU shows when the process's heap already held the trial's memory: no growth
    peak = type("Peak", (), {"method": "vmhwm", "stop": lambda self: 0.0})()
    measured = costs.measure(learn, "fp32", False, 1.0, peak)
    assert "peak_memory_mb" not in measured and set(measured) == {"train_seconds", "predict_ms", "predict_ms_batch",
                                                                  "params_m"}


def test_the_trial_table_says_not_measured_rather_than_a_number() -> None:
    seen = dataclasses.replace(record(0, "resnet18", [0.3, 0.1]), costs=cost(5.0))
    unseen = dataclasses.replace(record(1, "resnet18", [0.3, 0.2]),
                                 costs={k: v for k, v in cost(5.0).items() if k != "peak_memory_mb"})
    rep = analysis.build_report([seen, unseen], experiment="e", study_name="s")
    table = render.ranked(rep).set_index("number")["peak_memory_mb"]
    assert table[0] == 300.0 and table[1] == "not measured"
    assert "| not measured |" in render.markdown(rep, {})


def test_peak_memory_as_an_objective_on_a_cpu_exits_2_naming_the_key(write_experiments: Any) -> None:
    path = write_experiments(data={"limit": 150, "test_pct": 0.0}, budget={"n_trials": 1},
                             objectives=["error_rate", "peak_memory_mb"], pruner={"name": "none"})
    result = invoke("run", "--config", path)
    assert result.exit_code == 2, result.output
    assert "key 'objectives'" in result.output and "peak_memory_mb is measured on CUDA only" in result.output
    assert not (path.parent / "stores" / "optuna.db").exists()  # refused before any store


def test_bench_cost_timing_times_the_default_sweeps_models() -> None:
    from bench.cost_timing import keys_of

    keys, n_out = keys_of("digits-transfer")
    assert [k.arch for k in keys] == ["xresnet18", "xresnet34"] and n_out == 5
    assert {(k.img_size, k.batch_size) for k in keys} == {(32, 16)}


def test_a_timing_that_fails_at_the_end_of_a_sweep_is_said_and_leaves_the_sweep_standing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from pet_sweep import launch
    from pet_sweep.sweep import storage
    from pet_sweep.sweep.records import SweepResult
    from pet_sweep.train import timing

    def out_of_memory(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(storage, "open_study", lambda exp, create: None)
    monkeypatch.setattr(timing, "time_study", out_of_memory)
    lines: list[str] = []
    done = SweepResult("s", "run", ran=1, finished=1, best=(0.1, 0), stopped_by="budget", left=0)
    launch.time_costs_at_end(None, done, lines.append)  # type: ignore[arg-type]
    assert lines == ["costs        not timed (RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB): the "
                     "report judges by the trials' one-shot timings; pet-sweep report --time-costs tries again"]
    lines.clear()  # interrupted sweeps are not timed at all
    launch.time_costs_at_end(None, dataclasses.replace(done, stopped_by="interrupt"), lines.append)  # type: ignore
    assert lines == []
