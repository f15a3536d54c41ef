"""What a completed trial cost, measured inside `recipe.fine_tune` while its learner still exists.

- ``train_seconds``: wall time of the fit phases (the two `fit_one_cycle` calls; the LR
  finder and the learner's creation are not counted).
- ``predict_ms``: milliseconds to predict one validation image alone (batch size 1), and
  ``predict_ms_batch``: milliseconds per image at the training batch size. Only the
  model's forward pass is timed, on the trial's device, in eval mode under
  `torch.inference_mode` and the trial's autocast (fp16/bf16 on CUDA) and memory format;
  the images are taken from the validation DataLoader first, already resized and
  normalised, so decoding is not counted. One warm-up pass of each shape, then the median
  of the timed passes; on CUDA each pass is bracketed by `torch.cuda.synchronize`.
- ``params_m``: the model's parameters, in millions.
- ``peak_memory_mb``: see `PeakMemory`; left out (not measured) where the measurement cannot
  see the trial's memory (`seen_peak_mb`).
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from pet_sweep.errors import ConfigError

# Kept small so that measuring costs little next to a trial (`python -m bench.overhead --costs`
# times it): 16 images each predicted alone (the median of 16 passes is little moved by one
# pass that another process slowed), and 2 batches at the training batch size give 2 timed passes (their median is their
# mean), after one warm-up batch: 17 + 3 x batch_size images predicted in all. A validation
# set smaller than that is used whole.
PREDICT_ITEMS = 16
PREDICT_BATCHES = 2
BATCH_REPEATS = 1

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")
_SAMPLE_SECONDS = 0.005  # the fallback sampler's period


def _status_kb(field: str) -> int:
    """A `VmRSS`/`VmHWM` line of /proc/self/status, in KiB."""
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"no {field} in {_STATUS}")


def _kernel_high_water_mark() -> bool:
    """Whether this system resets and reports the resident-set high-water mark (Linux)."""
    try:
        _CLEAR_REFS.write_text("5")
        _status_kb("VmHWM")
        return True
    except (OSError, ValueError):
        return False


class PeakMemory:
    """The peak memory of a window (one trial), in MB, by the first way this machine offers:

    - ``cuda``: `torch.cuda.max_memory_allocated` after `torch.cuda.reset_peak_memory_stats`
      at the start: what the trial's tensors held at most (the caching allocator's reserve aside).
    - ``vmhwm`` (a CPU on Linux): the kernel's resident-set high-water mark, reset by writing
      "5" to /proc/self/clear_refs at the start and read as VmHWM from /proc/self/status at
      the end, less the resident set at the start: the peak growth, however brief.
    - ``sampled`` (a CPU elsewhere): a thread reading the resident set with psutil every
      5 ms; a peak shorter than that can be missed. Without psutil: not measured (nan).

    `method` says which one ran.
    """

    def __init__(self, device: Any) -> None:
        self.device = torch.device(device)
        self.method = ("cuda" if self.device.type == "cuda" else
                       "vmhwm" if _kernel_high_water_mark() else "sampled")
        self._start_bytes = 0
        self._peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.method == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.method == "vmhwm":
            self._start_bytes = _status_kb("VmRSS") * 1024
            _CLEAR_REFS.write_text("5")
        else:
            self._start_sampler()

    def stop(self) -> float:
        """The peak growth since `start`, in MB (2**20 bytes)."""
        if self.method == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method == "vmhwm":
            peak = _status_kb("VmHWM") * 1024 - self._start_bytes
        else:
            if self._thread is None:
                return float("nan")
            self._stop.set()
            self._thread.join()
            peak = self._peak_bytes - self._start_bytes
        return max(peak, 0) / 2**20

    def _start_sampler(self) -> None:
        try:
            import psutil  # heavy: psutil (optional; only where the kernel's mark is missing)
        except ImportError:
            return
        process = psutil.Process()
        self._stop = threading.Event()
        self._start_bytes = self._peak_bytes = process.memory_info().rss

        def sample() -> None:
            while not self._stop.wait(_SAMPLE_SECONDS):
                self._peak_bytes = max(self._peak_bytes, process.memory_info().rss)

        self._thread = threading.Thread(target=sample, name="pet-sweep-peak-memory", daemon=True)
        self._thread.start()


def seen_peak_mb(peak_mb: float, method: str, model: torch.nn.Module) -> float | None:
    """The peak memory as measured, or None where the measurement cannot have seen the trial's memory.

    On a CPU the measurement is the growth of the process's resident set. Training holds at least
    the model's weights and their gradients at once; a growth smaller than that means the process
    already held the memory (an earlier trial's, freed to the allocator but kept resident), so the
    number says nothing of this trial (a CPU sweep printed 0.0195 MB for a 21.8 M-parameter model).
    CUDA's counter counts the trial's tensors themselves.
    """
    if method == "cuda":
        return peak_mb
    floor = 2 * sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    return peak_mb if math.isfinite(peak_mb) and peak_mb >= floor else None


def check_measurable(exp: Any, device: Any) -> None:
    """Refuse an objective the device cannot measure: peak_memory_mb is a CUDA measurement
    (on a CPU a trial's peak can be invisible, `seen_peak_mb`, and Optuna takes no missing value)."""
    if "peak_memory_mb" in exp.config.objectives and torch.device(device).type != "cuda":
        raise ConfigError(f"peak_memory_mb is measured on CUDA only, but the trials run on {device}: on a CPU the "
                          "resident-set growth cannot see memory the process already held; choose another "
                          "objective (params_m, predict_ms, train_seconds)",
                          file=str(exp.config_path), experiment=exp.name, key="objectives")


def params_m(model: torch.nn.Module) -> float:
    """The model's parameters, in millions (frozen ones included)."""
    return sum(p.numel() for p in model.parameters()) / 1e6


def validation_images(dls: Any, count: int) -> torch.Tensor:
    """The first `count` validation images (fewer if the set is smaller), as one plain tensor."""
    taken: list[torch.Tensor] = []
    for xb, *_ in dls.valid:
        taken.append(xb.as_subclass(torch.Tensor))  # fastai's TensorImage aside: the model alone
        if sum(len(x) for x in taken) >= count:
            break
    return torch.cat(taken)[:count]


def _median_ms(model: torch.nn.Module, inputs: list[torch.Tensor], repeats: int,
               sync: Callable[[], None]) -> float:
    """Median milliseconds per image over `repeats` passes of each input, after one warm-up pass."""
    model(inputs[0])
    samples = []
    for _ in range(repeats):
        for x in inputs:
            sync()
            started = time.perf_counter()
            model(x)
            sync()
            samples.append((time.perf_counter() - started) * 1000 / len(x))
    return statistics.median(samples)


def predict_ms(learn: Any, precision: str, channels_last: bool = False) -> tuple[float, float]:
    """(ms per image at batch size 1, ms per image at the training batch size), as the module says."""
    model, dls = learn.model, learn.dls
    batch_size = dls.train.bs
    device = next(model.parameters()).device
    images = validation_images(dls, max(PREDICT_ITEMS, PREDICT_BATCHES * batch_size)).to(device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    singles = [images[i:i + 1] for i in range(min(PREDICT_ITEMS, len(images)))]
    batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
    batches = [b for b in batches if len(b) == len(batches[0])]  # no short last batch
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype,
                                                     enabled=dtype is not None and (cuda or precision == "bf16")):
            return _median_ms(model, singles, 1, sync), _median_ms(model, batches, BATCH_REPEATS, sync)
    finally:
        model.train(was_training)


def measure(learn: Any, precision: str, channels_last: bool, train_seconds: float,
            peak: PeakMemory) -> dict[str, float]:
    """Every cost of a fine-tuned learner, by `records.COST_ATTRS` name (peak_memory_mb left
    out where it was not seen: `seen_peak_mb`)."""
    peak_mb = seen_peak_mb(peak.stop(), peak.method, learn.model)  # before predicting: the training's peak
    single, batched = predict_ms(learn, precision, channels_last)
    measured = {"train_seconds": train_seconds, "predict_ms": single, "predict_ms_batch": batched,
                "params_m": params_m(learn.model)}
    return measured if peak_mb is None else {**measured, "peak_memory_mb": peak_mb}
