"""The progress display of `pet-sweep run`: plain lines off a terminal, a status line on one."""

from __future__ import annotations

import io
import re
import signal
import threading
from pathlib import Path
from typing import Callable

import optuna
import pytest
from click.testing import CliRunner

from pet_sweep.cli import cli
from pet_sweep.progress import Level, Progress, format_duration
from pet_sweep.sweep.records import EpochRecord, TrialOutcome

PARAMS = {"arch": "resnet18", "base_lr": 1e-2, "lr_lo": 1e-3, "lr_hi": 1e-2, "freeze_epochs": 1, "epochs": 2}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(epoch: int, error: float) -> EpochRecord:
    return EpochRecord(epoch=epoch, phase="frozen" if epoch == 0 else "unfrozen", train_loss=1.0,
                       valid_loss=1.5, error_rate=error, seconds=10.0)


def drive(progress: Progress, clock: Clock) -> None:
    """Two trials: trial 0 completes at 0.25 after 3 epochs, trial 1 fails in its first epoch."""
    progress.trial_started(0, PARAMS)
    for epoch, error in enumerate((0.5, 0.3, 0.25)):
        clock.now += 10
        progress.epoch_done(0, record(epoch, error))
    outcome = TrialOutcome(0, "COMPLETE", 0.25, PARAMS, 30.0)
    progress.echo("trial   0 COMPLETE error_rate=0.2500")
    progress.trial_finished(outcome, (0.25, 0))
    progress.trial_started(1, PARAMS)
    clock.now += 5
    failed = TrialOutcome(1, "FAIL", None, PARAMS, 5.0, "CUDA out of memory")
    progress.echo("trial   1 FAIL     error_rate=-")
    progress.trial_finished(failed, (0.25, 0))
    progress.close()


def test_plain_output_is_one_line_per_event() -> None:
    out, err, clock = io.StringIO(), io.StringIO(), Clock()
    progress = Progress(4, stream=out, err=err, clock=clock)
    assert not progress.live  # a StringIO is not a terminal
    drive(progress, clock)
    lines = out.getvalue().splitlines()
    assert lines == [
        "trial   0 started  arch=resnet18 freeze_epochs=1 epochs=2  [0/4 done, elapsed 0s]",
        "trial   0 COMPLETE error_rate=0.2500",
        "trial   1 started  arch=resnet18 freeze_epochs=1 epochs=2  [1/4 done, best 0.2500 (trial 0), elapsed 30s]",
        "trial   1 FAIL     error_rate=-",
    ]
    assert "\r" not in out.getvalue() and err.getvalue() == ""


def test_verbose_adds_one_line_per_epoch() -> None:
    out, clock = io.StringIO(), Clock()
    drive(Progress(4, level="verbose", stream=out, err=io.StringIO(), clock=clock), clock)
    epochs = [line for line in out.getvalue().splitlines() if " epoch " in line]
    # the epoch's number from 0 (as the report and MLflow name it), then the count done
    assert epochs[0] == ("trial   0 epoch 0 (1/3, frozen) train_loss=1.0000 valid_loss=1.5000 "
                         "error_rate=0.5000 (10.0s)")
    assert [line.split()[3:5] for line in epochs] == [["0", "(1/3,"], ["1", "(2/3,"], ["2", "(3/3,"]]


def test_off_a_terminal_a_long_trial_prints_an_epoch_line_at_most_every_minute() -> None:
    def epochs(level: Level) -> list[str]:
        out, clock = io.StringIO(), Clock()
        progress = Progress(4, level=level, stream=out, err=io.StringIO(), clock=clock)
        progress.trial_started(0, {**PARAMS, "epochs": 4})
        # epochs end 30, 65, 100, 130 and 150 s into the trial
        for epoch, seconds in enumerate((30, 35, 35, 30, 20)):
            clock.now += seconds
            progress.epoch_done(0, record(epoch, 0.5 - epoch / 10))
        progress.close()
        return [line for line in out.getvalue().splitlines() if " epoch " in line]

    assert epochs("normal") == ["trial   0 epoch 1 (2/5) error_rate=0.4000 (1m05s into the trial)",
                                "trial   0 epoch 3 (4/5) error_rate=0.2000 (2m10s into the trial)"]
    assert epochs("quiet") == []
    assert len(epochs("verbose")) == 5  # verbose prints every epoch anyway


def test_quiet_prints_only_failed_trials_on_stderr() -> None:
    out, err, clock = io.StringIO(), io.StringIO(), Clock()
    drive(Progress(4, level="quiet", stream=out, err=err, clock=clock, live=True), clock)
    assert out.getvalue() == ""  # no status line either, even on a terminal
    assert err.getvalue().startswith("trial   1 FAIL")
    assert "reason: CUDA out of memory" in err.getvalue()


def test_status_line_in_a_terminal_says_where_the_sweep_is() -> None:
    out, clock = io.StringIO(), Clock()
    progress = Progress(4, stream=out, err=io.StringIO(), clock=clock, live=True)
    progress.trial_started(0, PARAMS)
    clock.now += 10
    progress.epoch_done(0, record(0, 0.5))
    assert progress.status() == "trials 0/4 | running trial 0: 1/3 epochs done | best - | elapsed 10s | left ?"
    clock.now += 50
    progress.trial_finished(TrialOutcome(0, "COMPLETE", 0.25, PARAMS, 60.0), (0.25, 0))
    progress.trial_started(1, PARAMS)
    # one trial took 60 s, three are left
    # before its first epoch ends: no epoch yet, and nothing that reads as a missing number
    assert progress.status() == ("trials 1/4 | running trial 1: 0/3 epochs done | best 0.2500 (trial 0) | elapsed 1m00s"
                                 " | left ~3m00s")
    progress.echo("trial   0 COMPLETE error_rate=0.2500")
    text = out.getvalue()
    assert text.count("\r\x1b[K") >= 3  # redrawn in place, cleared before a printed line
    # a printed line lands on a cleared line and the status line comes back after it
    assert "\r\x1b[Ktrial   0 COMPLETE error_rate=0.2500\n\r\x1b[Ktrials 1/4" in text
    progress.close()
    assert out.getvalue().endswith("\r\x1b[K")


def test_one_ticker_per_sweep_stopped_on_close() -> None:
    before = threading.active_count()
    progress = Progress(100, stream=io.StringIO(), err=io.StringIO(), clock=Clock(), live=True)
    assert threading.active_count() == before + 1  # the status line's ticker
    progress.trial_started(0, PARAMS)
    for number in range(100):
        progress.echo(f"trial {number:>3} COMPLETE error_rate=0.5000")
    assert threading.active_count() == before + 1
    progress.close()
    assert threading.active_count() == before


def test_estimate_is_capped_by_the_timeout() -> None:
    clock = Clock()
    progress = Progress(10, timeout=100, stream=io.StringIO(), clock=clock)
    clock.now += 30
    progress.trial_finished(TrialOutcome(0, "COMPLETE", 0.5, PARAMS, 30.0), (0.5, 0))
    assert progress.eta(30) == 70  # 9 trials x 30 s would be 270 s, but the sweep stops at 100 s


def test_estimate_counts_down_during_a_trial() -> None:
    clock = Clock()
    progress = Progress(3, stream=io.StringIO(), clock=clock)
    clock.now += 40
    progress.trial_finished(TrialOutcome(0, "COMPLETE", 0.5, PARAMS, 40.0), (0.5, 0))
    assert progress.eta(40) == 80  # two trials of 40 s left
    assert progress.eta(70) == 50  # 30 s into the next one
    assert progress.eta(200) == 0  # slower than the mean: never negative


def test_format_duration() -> None:
    assert [format_duration(s) for s in (0, 59.4, 61, 3599, 3720)] == ["0s", "59s", "1m01s", "59m59s", "1h02m"]


@pytest.mark.train
def test_run_verbose_and_quiet_off_a_terminal(write_experiments: Callable[..., Path]) -> None:
    config = write_experiments(budget={"n_trials": 1})
    runner = CliRunner()
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    verbose = runner.invoke(cli, ["run", "--config", str(config), "--verbose"], catch_exceptions=False)
    assert verbose.exit_code == 0, verbose.output
    # run in-process, the command leaves the signal handlers as it found them (no SIGTERM -> Preempted
    # handler left behind for the processes this one forks later)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    lines = verbose.stdout.splitlines()
    assert lines[0].startswith("experiment   tiny")
    assert re.match(r"study +tiny  \(\+1 trial[,)]", lines[1]), lines[1]  # not "+1 trials"
    # what the data holds, before the first trial (limit 300 of the 1797 digits)
    data = next(i for i, line in enumerate(lines) if line.startswith("data "))
    assert lines[data] == "data         1797 images, 10 classes (digits); limit 300; train 210, valid 60, test 30"
    assert [line.split()[0] for line in lines[2:data]] == ["storage", "MLflow", "sampler", "selection"]
    started = next(i for i, line in enumerate(lines) if " started " in line)
    assert started > data
    assert re.fullmatch(r"trial   0 started  arch=resnet18 freeze_epochs=1 epochs=1  \[0/1 done, elapsed (\d+m)?\d+s\]", lines[started])
    assert [line.split()[3:5] for line in lines if re.match(r"trial +0 epoch ", line)] == [["0", "(1/2,"], ["1", "(2/2,"]]
    assert any(line.startswith("trial   0 COMPLETE") for line in lines)
    assert lines[-2].startswith("best         trial 0: error_rate ")
    assert "pet-sweep ui tiny" in lines[-1]
    assert "\r" not in verbose.stdout

    quiet = runner.invoke(cli, ["run", "--config", str(config), "--quiet"], catch_exceptions=False)
    assert quiet.exit_code == 0, quiet.output
    # only the summary is printed, and the study resumed: trial 1 ran
    assert len(quiet.stdout.splitlines()) == 1 and quiet.stdout.startswith("best         trial ")
    assert quiet.stderr == ""
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{config.parent / 'stores' / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]


def test_quiet_and_verbose_exclude_each_other(write_experiments: Callable[..., Path]) -> None:
    result = CliRunner().invoke(cli, ["run", "--config", str(write_experiments()), "-q", "-v"])
    assert result.exit_code == 2 and "exclude each other" in result.output
