"""Costs that do not move with the machine's load: one cost per (arch, image size, precision,
batch size, device, memory format), timed side by side.

A trial's own `predict_ms` is one measurement taken while it ran: it measures whatever else
the machine was doing then as much as the model (one architecture's ranged from 11 to
153 ms/image in one study on a busy machine). What a model costs to run does not depend on
the trial's learning rates or epochs, so the trials that share a `CostKey` share one cost.
`train.timing` times every key of a study in one session, interleaved, with repeats
(`pet-sweep run` at the end of the sweep, `pet-sweep report --time-costs` on demand) and
stores the session in the study (`TIMINGS_ATTR`). `CostBook` answers the recommendation's
questions from it: is this trial cheaper than that one (another key, and the timing
intervals apart), and by how much.

Pure: plain records and dicts in, no torch (the timing is in `train.timing`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import pandas as pd

from pet_sweep.report.stats import plural

TIMINGS_ATTR = "cost_timings"   # study user attr: the last timing session (`TimingSession.as_dict`)
TIMED_COSTS = ("predict_ms", "predict_ms_batch")  # timed side by side; an interval each
KEYED_COSTS = (*TIMED_COSTS, "params_m")          # properties of the key, not of the trial
CONFIDENCE = 0.95
TIME_COSTS_HINT = "pet-sweep report --time-costs"
NOT_MEASURED = "not measured"   # a cost the measurement could not see (peak memory on a CPU, `train.costs`)


@dataclass(frozen=True, order=True)
class CostKey:
    """What a model costs to run depends on these alone (not on a trial's LRs or epochs)."""

    arch: str
    img_size: int
    precision: str
    batch_size: int
    device: str          # the device type: "cpu", "cuda" ("" where a trial did not record it)
    channels_last: bool = False

    def label(self) -> str:
        return (f"{self.arch} {self.img_size}px {self.precision or '?'} bs{self.batch_size} {self.device or '?'}"
                + (" channels_last" if self.channels_last else ""))

    def as_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "img_size": self.img_size, "precision": self.precision,
                "batch_size": self.batch_size, "device": self.device, "channels_last": self.channels_last}

    def matches(self, other: "CostKey") -> bool:
        """The same cost; a trial that did not record its device matches a timing of any."""
        mine, theirs = self.as_dict(), other.as_dict()
        if not self.device or not other.device:
            mine.pop("device"), theirs.pop("device")
        return mine == theirs


def device_type(device: Any) -> str:
    return str(device or "").split(":")[0]


def key_of(record: Any, img_size: int, channels_last: bool, batch_size: int) -> CostKey:
    """The cost key of a trial record (`report.analysis.TrialRecord`); `batch_size`: the
    experiment's, where the record has none of its own."""
    return CostKey(str(record.params.get("arch")), int(img_size), str(record.precision or ""),
                   int(record.batch_size or batch_size), device_type(getattr(record, "device", "")),
                   bool(channels_last))


@dataclass(frozen=True)
class Interval:
    """The median of timed repeats and its distribution-free interval (order statistics)."""

    median: float
    low: float
    high: float
    n: int
    confidence: float = CONFIDENCE

    def text(self, digits: str = ".3g") -> str:
        return f"{self.median:{digits}} [{self.low:{digits}}, {self.high:{digits}}]"

    def below(self, other: "Interval") -> bool:
        """Apart, and lower: this interval ends before the other begins."""
        return self.high < other.low


def median_interval(samples: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """The median of `samples` with the order-statistic interval that holds the true median
    with probability >= `confidence` whatever the distribution (binomial(n, 1/2) ranks).
    Fewer than 6 samples cannot reach 95 %: the interval is then the whole range, and its
    `confidence` says what it does reach."""
    xs = sorted(float(x) for x in samples)
    n = len(xs)
    if n == 0:
        raise ValueError("median_interval needs at least one sample")
    median = float(pd.Series(xs).median())
    j = 0  # the largest j whose [x_(j), x_(n-1-j)] still covers the median with `confidence`
    while j + 1 <= (n - 1) // 2 and interval_coverage(n, j + 1) >= confidence:
        j += 1
    return Interval(median, xs[j], xs[n - 1 - j], n, interval_coverage(n, j))


def interval_coverage(n: int, j: int) -> float:
    """The probability that [x_(j), x_(n-1-j)] (0-based order statistics of n samples) holds the
    true median: the median is below x_(j) when at most j samples fall below it, B ~ binomial(n, 1/2),
    so the coverage is 1 - 2 P(B <= j)."""
    return 1 - 2 * sum(math.comb(n, i) for i in range(j + 1)) / 2 ** n


@dataclass(frozen=True)
class KeyTiming:
    """One key's timing in a session, and its deterministic proxies."""

    key: CostKey
    intervals: Mapping[str, Interval]   # TIMED_COSTS names -> Interval (ms per image)
    params_m: float
    gflops: float                       # FLOPs per image (torch's FlopCounterMode), in 1e9

    def as_dict(self) -> dict[str, Any]:
        return {**self.key.as_dict(), "params_m": self.params_m, "gflops": self.gflops,
                **{name: {"median": i.median, "low": i.low, "high": i.high, "n": i.n, "confidence": i.confidence}
                   for name, i in self.intervals.items()}}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> "KeyTiming":
        key = CostKey(str(doc["arch"]), int(doc["img_size"]), str(doc["precision"]), int(doc["batch_size"]),
                      str(doc["device"]), bool(doc.get("channels_last", False)))
        intervals = {name: Interval(float(v["median"]), float(v["low"]), float(v["high"]), int(v["n"]),
                                         float(v.get("confidence", CONFIDENCE)))
                     for name in TIMED_COSTS if isinstance(v := doc.get(name), Mapping)}
        return cls(key, intervals, float(doc["params_m"]), float(doc["gflops"]))


@dataclass(frozen=True)
class TimingSession:
    """Every key of a study timed together: the same machine, the same minutes, interleaved."""

    timings: tuple[KeyTiming, ...]
    when: str                  # ISO time (UTC) the session ended
    device: str                # the device it timed on, as torch names it
    threads: int               # torch's CPU threads
    rounds: int                # interleaved rounds (each key timed once per round)
    seconds: float             # what the session took
    skipped: tuple[str, ...] = ()  # keys it could not time here, with why

    def as_dict(self) -> dict[str, Any]:
        return {"timings": [t.as_dict() for t in self.timings], "when": self.when, "device": self.device,
                "threads": self.threads, "rounds": self.rounds, "seconds": self.seconds,
                "skipped": list(self.skipped)}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any] | None) -> "TimingSession | None":
        if not isinstance(doc, Mapping) or not isinstance(doc.get("timings"), list):
            return None
        return cls(tuple(KeyTiming.from_dict(t) for t in doc["timings"]), str(doc.get("when", "")),
                   str(doc.get("device", "")), int(doc.get("threads", 0)), int(doc.get("rounds", 0)),
                   float(doc.get("seconds", 0.0)), tuple(str(s) for s in doc.get("skipped", ())))

    def describe(self) -> str:
        return (f"timed side by side {self.when} on {self.device} with {plural(self.threads, 'thread')}: "
                f"{self.rounds} interleaved rounds, median [{CONFIDENCE:.0%} interval]")


class CostBook:
    """What each trial costs, as the recommendation reads it: the trial's key's timing where
    the study has a session, else the trial's own measurement (one shot, during the trial)."""

    TIMED = TIMED_COSTS

    def __init__(self, keys: Mapping[int, CostKey], session: TimingSession | None = None) -> None:
        self.keys = dict(keys)              # trial number -> key
        self.session = session

    def timing(self, number: int) -> KeyTiming | None:
        key = self.keys.get(number)
        if key is None or self.session is None:
            return None
        return next((t for t in self.session.timings if t.key.matches(key)), None)

    def same_cost(self, a: int, b: int) -> bool:
        """Two trials of one key are one cost: never "cheaper" than each other."""
        ka, kb = self.keys.get(a), self.keys.get(b)
        return ka is not None and kb is not None and ka.matches(kb)

    def interval(self, number: int, cost: str) -> Interval | None:
        timing = self.timing(number)
        return timing.intervals.get(cost) if timing is not None and cost in TIMED_COSTS else None

    def value(self, record: Any, cost: str) -> float | None:
        """The cost of a trial: its key's timed median, its key's parameters, else its own record."""
        interval = self.interval(record.number, cost)
        if interval is not None:
            return interval.median
        timing = self.timing(record.number)
        if cost == "params_m" and timing is not None:
            return timing.params_m
        value = record.costs.get(cost)
        return float(value) if value is not None and math.isfinite(float(value)) else None

    def cheaper(self, other: Any, best: Any, cost: str, by: float) -> bool:
        """Is `other` cheaper than `best` by `cost`, by the factor `by` (0.9: a tenth) at least?
        Never for two trials of one key (`KEYED_COSTS`); for a timing, also only where both are
        timed and their intervals are apart. Untimed, the trials' own values decide (one shot)."""
        if cost in KEYED_COSTS and self.same_cost(other.number, best.number):
            return False
        mine, theirs = self.value(best, cost), self.value(other, cost)
        if mine is None or theirs is None or not theirs < by * mine:
            return False
        if cost in TIMED_COSTS and self.session is not None:
            a, b = self.interval(other.number, cost), self.interval(best.number, cost)
            return a is not None and b is not None and a.below(b)
        return True

    def shown(self, record: Any, cost: str) -> str:
        """A cost as the recommendation prints it: with its interval where timed."""
        interval = self.interval(record.number, cost)
        if interval is not None:
            return interval.text()
        value = self.value(record, cost)
        return "-" if value is None else f"{value:.3g}"

    def how(self, cost: str) -> str:
        """Where the numbers come from, said after them."""
        if cost not in TIMED_COSTS:
            return ""
        if self.session is None:
            return f" (one shot during each trial, moved by the machine's load; {TIME_COSTS_HINT} times them)"
        return f" ({self.session.describe()})"


def one_shot_range(records: Sequence[Any], cost: str) -> str:
    values = [float(v) for r in records if (v := r.costs.get(cost)) is not None and math.isfinite(float(v))]
    if not values:
        return ""
    return f"{min(values):.3g}" if len(values) == 1 else f"{min(values):.3g}-{max(values):.3g}"


def cost_table(done: Sequence[Any], book: CostBook) -> pd.DataFrame:
    """One row per cost key of the completed trials: its trials, its timing with intervals,
    the trials' own one-shot predict_ms (their spread is the load, not the model), the proxies."""
    groups: dict[CostKey, list[Any]] = {}
    for r in sorted(done, key=lambda r: r.number):
        key = book.keys.get(r.number)
        if key is not None:
            groups.setdefault(key, []).append(r)
    rows = []
    for key, members in sorted(groups.items()):
        timing = book.timing(members[0].number)
        row: dict[str, Any] = {"cost": key.label(), "trials": ", ".join(str(r.number) for r in members)}
        for name in TIMED_COSTS:
            interval = timing.intervals.get(name) if timing else None
            row[f"{name} (timed, 95% CI)"] = interval.text() if interval else "not timed"
        row["predict_ms (one shot, in trials)"] = one_shot_range(members, "predict_ms")
        row["params_m"] = timing.params_m if timing else members[0].costs.get("params_m")
        row["GFLOPs/image"] = timing.gflops if timing else None
        rows.append(row)
    return pd.DataFrame(rows)


def session_of(study_attrs: Mapping[str, Any]) -> TimingSession | None:
    """The study's stored timing session (`TIMINGS_ATTR`), None where there is none."""
    return TimingSession.from_dict(study_attrs.get(TIMINGS_ATTR))
