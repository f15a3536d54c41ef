"""The sections of an experiment in experiments.yaml (data, model, budget, sampler, pruner,
faults, launch, tracking) as strict pydantic models; `config` puts them together."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from pet_sweep.space import Strict

COMMAND_LINE = "command_line"  # validation context of `with_overrides`: the options' own rules apply


class DataConfig(Strict):
    """Where the images come from and how they are split."""

    source: Literal["digits", "pets", "folder"]
    path: str | None = None
    label: Literal["parent", "regex"] | None = None
    pattern: str | None = None
    valid_pct: float = Field(0.2, gt=0, lt=1)
    test_pct: float = Field(0.0, ge=0, lt=1)
    split_seed: int = 42
    item_size: int | None = Field(None, ge=8)
    augment: bool = False
    flip: bool = True
    cache: bool | None = None
    num_workers: int | None = Field(None, ge=0)
    limit: int | None = Field(None, ge=10)
    bad_images: Literal["refuse", "skip"] = "refuse"
    # one data set as source and target: a subset of labels, at most N training items per class
    classes: list[str] | None = Field(None, min_length=1)
    per_class: int | None = Field(None, ge=1)

    @field_validator("classes", mode="before")
    @classmethod
    def _labels_as_text(cls, value: Any) -> Any:
        # labels are file-name matches (text); YAML reads `classes: [5, 6]` as numbers
        return [str(v) if isinstance(v, int) else v for v in value] if isinstance(value, list) else value

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if self.valid_pct + self.test_pct >= 1:
            raise ValueError(f"valid_pct + test_pct must be < 1, but got {self.valid_pct} + {self.test_pct}")
        if self.source == "folder" and not self.path:
            raise ValueError("a `folder` data set needs `path`")
        if self.label == "regex" and self.source == "folder" and not self.pattern:
            raise ValueError("`label: regex` needs `pattern` (a regex with one group, matched on the file name)")
        return self


class ModelConfig(Strict):
    """Settings every trial shares."""

    img_size: int = Field(224, ge=8)
    batch_size: int = Field(64, ge=1)
    pretrained: bool = True
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    channels_last: bool = False  # fastai's ChannelsLast: NHWC convolutions (tensor cores with fp16/bf16)
    weights: str | None = None
    pretrained_on: str | None = None  # an experiment whose `pet-sweep pretrain` checkpoint each trial starts from

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if self.weights is not None and self.pretrained_on is not None:
            raise ValueError("give `weights` (one local checkpoint) or `pretrained_on` (an experiment's "
                             f"pretrained bodies), not both; got weights={self.weights!r}, "
                             f"pretrained_on={self.pretrained_on!r}")
        return self


class PretrainConfig(Strict):
    """How `pet-sweep pretrain` trains a body from scratch on this experiment's data (one cycle)."""

    epochs: int = Field(8, ge=1)
    lr: float = Field(1e-2, gt=0)


class BudgetConfig(Strict):
    """`n_trials` per invocation, shared by its workers; `max_trials` caps the whole study.

    `stop_when: converged` ends the search early once Optuna's Terminator rule says the rest of the
    space holds less than the noise of the error (`sweep.converge`), checked once `min_trials`
    searched trials have completed (20: Optuna's own default); the baseline and the confirmations
    still run."""

    n_trials: int = Field(10, ge=0)
    timeout: float | None = Field(None, gt=0)
    max_trials: int | None = Field(None, ge=1)
    stop_when: Literal["budget", "converged"] = "budget"
    min_trials: int = Field(20, ge=2)

    @field_validator("n_trials")
    @classmethod
    def _some_trials(cls, n_trials: int, info: ValidationInfo) -> int:
        # `--n-trials 0` runs only the trials queued again (a resume's hint); a file asks for trials
        if n_trials == 0 and not (info.context or {}).get(COMMAND_LINE):
            raise PydanticCustomError("greater_than_equal", "Input should be greater than or equal to {ge}", {"ge": 1})
        return n_trials


class SamplerConfig(Strict):
    """`tpe` handles one objective or several; `nsga2` (Optuna's NSGAIISampler) is for
    several objectives (`objectives:` with more than one name). `gp`: Optuna's GPSampler
    (Gaussian-process Bayesian optimisation, categorical `arch` included). `cmaes`: Optuna's
    CmaEsSampler, one objective; it samples only the numeric parameters jointly, and a
    categorical one (`arch` with several choices) is drawn at random (said in the header).

    `warm_start`: earlier studies (a study name in this experiment's storage, or an experiment
    of the same file) whose `top` best configs run first, checked against this space."""

    name: Literal["tpe", "random", "nsga2", "gp", "cmaes"] = "tpe"
    seed: int | None = 0
    n_startup_trials: int = Field(10, ge=0)
    warm_start: list[str] = []
    top: int = Field(3, ge=1)


class PrunerConfig(Strict):
    """`schedule`: pruning at the same point of each one-cycle schedule (pet_sweep.sweep.pruners);
    `median`, `percentile`, `hyperband`: Optuna's own, which compare trials epoch by epoch.
    `percentile` applies to `schedule` and `percentile` (50 is the median; 25 keeps only
    trials in the best quarter, which prunes more).

    `wilcoxon`: Optuna's WilcoxonPruner. It was made for steps that are problem instances
    (folds, questions); here a step is an epoch, so it pairs the trial's error after epoch k
    with the best completed trial's after epoch k and prunes once a signed-rank test says,
    at `p_threshold`, that the trial's curve lies above the best one's. Epochs of one curve
    are not independent instances and schedules of different lengths are paired by epoch
    number, so `p_threshold` is a knob for how readily it prunes, not a false-positive rate.
    `n_warmup_steps` is its `n_startup_steps` (it never judges on fewer than 2 epochs)."""

    name: Literal["none", "schedule", "median", "percentile", "hyperband", "wilcoxon"] = "none"
    n_startup_trials: int = Field(3, ge=0)
    n_warmup_steps: int = Field(1, ge=0)
    percentile: float = Field(50.0, gt=0, lt=100)
    min_fraction: float = Field(0.0, ge=0, lt=1)   # `schedule`: no pruning before this fraction of a phase
    min_resource: int = Field(1, ge=1)
    reduction_factor: int = Field(3, ge=2)
    p_threshold: float = Field(0.1, ge=0, le=1)     # `wilcoxon`: prune when the signed-rank p-value is below

    @model_validator(mode="after")
    def _check(self) -> "PrunerConfig":
        if self.name == "median" and self.percentile != 50:
            raise ValueError(f"the median pruner is the 50th percentile, but got percentile {self.percentile:g}; "
                             "use `name: percentile` (or `schedule`) to set another")
        if self.name != "schedule" and self.min_fraction:
            raise ValueError(f"min_fraction is a setting of the schedule pruner, not of {self.name!r}")
        if self.name != "wilcoxon" and "p_threshold" in self.model_fields_set:
            raise ValueError(f"p_threshold is a setting of the wilcoxon pruner, not of {self.name!r}")
        return self


class FaultsConfig(Strict):
    """How a sweep notices dead workers (RDB storages only: Optuna's heartbeats)."""

    heartbeat_interval: int = Field(30, ge=1)   # seconds between a running trial's heartbeats
    grace_period: int = Field(120, ge=1)        # a trial silent this long is failed and retried
    max_retry: int = Field(3, ge=0)             # retries of a trial whose worker died
    oom_retries: int = Field(1, ge=0)           # re-queue an out-of-memory trial at half its batch size, this often
    # epoch checkpoints (`train.checkpoint`) every N epochs (0: none), as min_seconds and max_share allow (README)
    checkpoint_every: int = Field(1, ge=0)
    checkpoint_min_seconds: float = Field(30.0, ge=0)
    checkpoint_max_share: float = Field(0.05, gt=0, le=1)

    @model_validator(mode="after")
    def _check(self) -> "FaultsConfig":
        if self.grace_period <= self.heartbeat_interval:
            raise ValueError(f"grace_period must be > heartbeat_interval, but got "
                             f"{self.grace_period} <= {self.heartbeat_interval}")
        return self


class LaunchConfig(Strict):
    """Who runs the workers of `pet-sweep run --workers N`: processes on this machine
    (`local`), or Ray tasks on a cluster (`ray`; the same as `--ray ADDRESS`)."""

    engine: Literal["local", "ray"] = "local"
    address: str | None = None          # ray: the cluster ("auto" from a node of it); none: a Ray started here
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)  # a fraction packs several workers on one GPU

    @model_validator(mode="after")
    def _check(self) -> "LaunchConfig":
        ray_only = sorted(self.model_fields_set & {"address", "cpus_per_worker", "gpus_per_worker"})
        if self.engine == "local" and ray_only:
            raise ValueError(f"{', '.join(ray_only)}: settings of engine 'ray', but the engine is 'local'")
        return self


class TrackingConfig(Strict):
    uri: str = "sqlite:///mlflow.db"
    experiment: str | None = None
    # an http(s) server away this long (seconds) stops the sweep before its next trial; until
    # then trials go on and their MLflow writes wait in a spool (README, "Faults: the MLflow server")
    max_outage: float = Field(900, ge=0)


# What a trial can be judged on: its error rate, and the costs every completed trial
# records (`sweep.records.COST_ATTRS`). All are minimised.
