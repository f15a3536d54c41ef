"""Time every cost key of a study side by side: the end of `pet-sweep run`, and
`pet-sweep report --time-costs` on demand (`report.costs` says why a cost is a key's, not a trial's).

One session builds one model per key (randomly initialised: the weights do not change what
a forward pass costs), warms each up, then runs `ROUNDS` rounds; in each round every key is
timed once, in an order that rotates from round to round, so that a burst of load elsewhere
on the machine falls on every key alike rather than on one trial. A round's sample of a key
is the mean milliseconds per image of `SINGLE_PASSES` passes of one image (predict_ms) and
of one pass of a batch at the key's batch size (predict_ms_batch). Each cost is the median
of its `ROUNDS` samples, with the order-statistic interval (`report.costs.median_interval`).
Beside them the deterministic proxies: parameters, and FLOPs per image from torch's own
`torch.utils.flop_counter.FlopCounterMode` (one image, one forward pass).

Timed as `train.costs.predict_ms` times a trial: eval mode, `torch.inference_mode`, the
key's autocast (fp16/bf16 on CUDA, bf16 on a CPU) and memory format, `torch.cuda.synchronize` around each
pass on CUDA, inputs already on the device (random images of the key's size).
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any, Callable, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from pet_sweep.report.costs import (
    TIMED_COSTS,
    TIMINGS_ATTR,
    CostKey,
    KeyTiming,
    TimingSession,
    device_type,
    key_of,
    median_interval,
)
from pet_sweep.report.stats import plural
from pet_sweep.train.costs import params_m

# 15 rounds: the median's 95 % interval is then the 4th to the 12th sample (96.5 %), and the
# session stays short (`docs/benchmarks.md`, "Costs timed side by side": seconds for the default sweep).
ROUNDS = 15
SINGLE_PASSES = 3


def build_model(arch: str, n_out: int) -> torch.nn.Module:
    """The trial's model without its weights: what `vision_learner` builds (body and head)."""
    from fastai.vision.learner import create_timm_model, create_vision_model  # heavy: fastai

    from pet_sweep.train.recipe import resolve_arch  # heavy: fastai

    resolved = resolve_arch(arch)
    if isinstance(resolved, str):  # a timm name
        return create_timm_model(resolved, n_out, pretrained=False)[0]
    return create_vision_model(resolved, n_out, pretrained=False)


def flops_per_image(model: torch.nn.Module, image: torch.Tensor) -> float:
    """FLOPs of one forward pass of one image, by `torch.utils.flop_counter.FlopCounterMode`."""
    counter = FlopCounterMode(display=False)
    with counter:
        model(image[:1])
    return float(counter.get_total_flops())


class _Timed:
    """One key, ready to time: its model and inputs on the device, in eval mode."""

    def __init__(self, key: CostKey, n_out: int, device: torch.device) -> None:
        self.key = key
        model = build_model(key.arch, n_out).to(device).eval()
        images = torch.randn(key.batch_size, 3, key.img_size, key.img_size, device=device)
        if key.channels_last:
            model = model.to(memory_format=torch.channels_last)
            images = images.contiguous(memory_format=torch.channels_last)
        self.model, self.single, self.batch = model, images[:1], images
        self.cuda = device.type == "cuda"
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(key.precision)
        self.device_type = device.type
        self.samples: dict[str, list[float]] = {name: [] for name in TIMED_COSTS}
        with torch.inference_mode():
            self.gflops = flops_per_image(self.model, self.single) / 1e9
        self.params_m = params_m(self.model)

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def _ms_per_image(self, x: torch.Tensor, passes: int) -> float:
        self._sync()
        started = time.perf_counter()
        for _ in range(passes):
            self.model(x)
        self._sync()
        return (time.perf_counter() - started) * 1000 / (passes * len(x))

    def run(self, record: bool = True) -> None:
        """One sample of each cost (`record=False`: the warm-up)."""
        # CPU trials run only fp32 or bf16 (`recipe.precision_for`): a bf16 key is timed as it trained
        mixed = self.dtype is not None and (self.cuda or self.key.precision == "bf16")
        autocast = torch.autocast(self.device_type, dtype=self.dtype, enabled=mixed)
        with torch.inference_mode(), autocast:
            single = self._ms_per_image(self.single, SINGLE_PASSES)
            batch = self._ms_per_image(self.batch, 1)
        if record:
            self.samples["predict_ms"].append(single)
            self.samples["predict_ms_batch"].append(batch)

    def result(self) -> KeyTiming:
        return KeyTiming(self.key, {name: median_interval(s) for name, s in self.samples.items()},
                         self.params_m, self.gflops)


def time_keys(keys: Sequence[CostKey], n_out: int, *, rounds: int = ROUNDS, device: Any = None,
              between: Callable[[int], None] | None = None) -> TimingSession:
    """Time `keys` side by side on `device` (default: fastai's, as the trials'): `rounds`
    interleaved rounds after one warm-up pass each. Keys of another device type, or of a
    mixed precision this device cannot run, are skipped and named. `between(r)` runs before
    round r (a test loads the machine there)."""
    from fastai.torch_core import default_device  # heavy: fastai

    started = time.perf_counter()
    device = torch.device(device) if device is not None else default_device()
    here, skipped, todo = device_type(device), [], []
    for key in sorted(set(keys)):
        if key.device and key.device != here:
            skipped.append(f"{key.label()}: its trials ran on {key.device}, this process times on {here}")
        else:
            todo.append(key)
    timed = [_Timed(key, n_out, device) for key in todo]
    for t in timed:
        t.run(record=False)
    for r in range(rounds):
        if between is not None:
            between(r)
        for i in range(len(timed)):  # the order rotates: no key is always first after a pause
            timed[(r + i) % len(timed)].run()
    return TimingSession(tuple(t.result() for t in timed), dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                         str(device), torch.get_num_threads(), rounds, time.perf_counter() - started, tuple(skipped))


def study_keys(study: Any, exp: Any) -> tuple[list[CostKey], int]:
    """The cost keys of the study's completed trials, and the number of classes (the head's outputs)."""
    from pet_sweep.report.read import trial_records  # heavy: optuna (already loaded with the study)

    records = [r for r in trial_records(study, exp.config.model.batch_size) if r.state == "COMPLETE"]
    model = exp.config.model
    keys = [key_of(r, model.img_size, model.channels_last, model.batch_size) for r in records]
    classes = {t for r in records for t in r.targets}
    return keys, max(len(classes), 2)


def time_study(study: Any, exp: Any, echo: Callable[[str], None] = print, **kwargs: Any) -> TimingSession | None:
    """Time the study's cost keys (`time_keys`) and store the session in the study; None: no completed trial."""
    keys, n_out = study_keys(study, exp)
    if not keys:
        return None
    session = time_keys(keys, n_out, **kwargs)
    study.set_user_attr(TIMINGS_ATTR, session.as_dict())
    echo(f"costs        {plural(len(session.timings), 'model')} of {plural(len(keys), 'completed trial')} timed side "
         f"by side in {session.seconds:.1f}s ({session.rounds} interleaved rounds on {session.device})"
         + "".join(f"; not timed: {s}" for s in session.skipped))
    return session
