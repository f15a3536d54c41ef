"""experiments.yaml: named experiments, validated strictly (read by `yaml_files`, the only YAML reader).

`load_experiment(path, name)` returns a frozen `Experiment`: the validated
settings, the parsed search space, and where relative paths point (the
directory of the experiments file, so a sweep started from anywhere uses the
same stores and data).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from pet_sweep.errors import ConfigError
from pet_sweep.selection import SelectionConfig
from pet_sweep.space import SearchSpace, Strict, parse_space
from pet_sweep.yaml_files import read_model, read_yaml

DEFAULT_CONFIG = "experiments.yaml"


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
    n_trials: int = Field(10, ge=0)
    timeout: float | None = Field(None, gt=0)
    max_trials: int | None = Field(None, ge=1)

    @field_validator("n_trials")
    @classmethod
    def _some_trials(cls, n_trials: int, info: ValidationInfo) -> int:
        # `--n-trials 0` runs only the trials queued again (a resume's hint); a file asks for trials
        if n_trials == 0 and not (info.context or {}).get(COMMAND_LINE):
            raise PydanticCustomError("greater_than_equal", "Input should be greater than or equal to {ge}", {"ge": 1})
        return n_trials


class SamplerConfig(Strict):
    """`tpe` handles one objective or several; `nsga2` (Optuna's NSGAIISampler) is for
    several objectives (`objectives:` with more than one name)."""

    name: Literal["tpe", "random", "nsga2"] = "tpe"
    seed: int | None = 0
    n_startup_trials: int = Field(10, ge=0)


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
OBJECTIVES = ("error_rate", "train_seconds", "predict_ms", "predict_ms_batch", "params_m", "peak_memory_mb")
# Why a study with more than one objective is not pruned: said by `run` and by the report
NO_MO_PRUNING = "Optuna does not prune multi-objective trials"


class ExperimentConfig(Strict):
    """One named experiment of experiments.yaml."""

    description: str = ""
    data: DataConfig
    model: ModelConfig = ModelConfig()
    sweep: Union[str, dict[str, Any]]
    budget: BudgetConfig = BudgetConfig()
    # more than one name makes an Optuna multi-objective study (`directions`), which Optuna does not prune
    objectives: list[Literal[OBJECTIVES]] = Field(["error_rate"], min_length=1)  # type: ignore[valid-type]
    sampler: SamplerConfig = SamplerConfig()
    pruner: PrunerConfig = PrunerConfig()
    storage: str = "sqlite:///optuna.db"
    study_name: str | None = None
    # a folder every worker reads (path or file:// URI; default beside the storage: `resume.checkpoint_dir`)
    checkpoints: str | None = None
    tracking: TrackingConfig = TrackingConfig()
    faults: FaultsConfig = FaultsConfig()
    launch: LaunchConfig = LaunchConfig()
    seed: int = 0
    lr_find: bool = False
    pretrain: PretrainConfig = PretrainConfig()
    selection: SelectionConfig = SelectionConfig()  # repeats on seeds, the fine_tune baseline (pet_sweep.selection)

    @field_validator("checkpoints")
    @classmethod
    def _local_checkpoints(cls, uri: str | None) -> str | None:
        if uri and "://" in uri and not uri.startswith("file://"):
            raise ValueError(f"checkpoints must be a folder (path or file:// URI) every worker reads, but got {uri!r}")
        return uri

    @field_validator("objectives")
    @classmethod
    def _error_rate_first(cls, objectives: list[str]) -> list[str]:
        if objectives[0] != "error_rate" or len(set(objectives)) != len(objectives):
            raise ValueError(f"objectives must start with error_rate and name each cost once, "
                             f"but got {objectives}")
        return objectives

    @model_validator(mode="after")
    def _nsga2_needs_objectives(self) -> "ExperimentConfig":
        if self.sampler.name == "nsga2" and len(self.objectives) < 2:
            raise ValueError("sampler nsga2 is for several objectives, but `objectives` names only error_rate; "
                             "add a cost (e.g. objectives: [error_rate, predict_ms]) or use tpe")
        return self


class ExperimentsFile(Strict):
    default: str | None = None
    experiments: dict[str, ExperimentConfig] = Field(min_length=1)


@dataclass(frozen=True)
class Experiment:
    """A validated experiment, ready to run."""

    name: str
    config: ExperimentConfig
    space: SearchSpace
    config_path: Path

    @property
    def base_dir(self) -> Path:
        return self.config_path.parent

    @property
    def study_name(self) -> str:
        return self.config.study_name or self.name

    @property
    def storage_url(self) -> str:
        return resolve_url(self.config.storage, self.base_dir)

    @property
    def tracking_uri(self) -> str:
        return resolve_url(self.config.tracking.uri, self.base_dir)

    @property
    def tracking_experiment(self) -> str:
        return self.config.tracking.experiment or f"pet-sweep/{self.name}"

    def data_path(self) -> Path | None:
        path = self.config.data.path
        return None if path is None else (self.base_dir / Path(path).expanduser())

    def with_overrides(self, *, n_trials: int | None = None, timeout: float | None = None,
                       storage: str | None = None, tracking_uri: str | None = None,
                       study_name: str | None = None) -> "Experiment":
        """A copy with command-line overrides applied (None leaves a setting as it is), validated
        again by the same models as the file (an error names the option)."""
        given = {"--n-trials": (("budget", "n_trials"), n_trials), "--timeout": (("budget", "timeout"), timeout),
                 "--storage": (("storage",), storage or None), "--study-name": (("study_name",), study_name or None),
                 "--tracking-uri": (("tracking", "uri"), tracking_uri or None)}
        raw = self.config.model_dump(exclude_unset=True)  # unset stays unset: validators read model_fields_set
        for (*parents, key), value in given.values():
            if value is None:
                continue
            node = raw
            for parent in parents:
                node = node.setdefault(parent, {})
            node[key] = value
        try:
            cfg = ExperimentConfig.model_validate(raw, context={COMMAND_LINE: True})
        except ValidationError as err:
            raise _override_error(err.errors()[0], {option: loc for option, (loc, _) in given.items()}) from None
        return Experiment(self.name, cfg, self.space, self.config_path)


def _override_error(first: Any, options: dict[str, tuple[str, ...]]) -> ConfigError:
    """``--timeout must be > 0 seconds, but got -5``: a refused override, named by its option."""
    option = next((o for o, loc in options.items() if loc == tuple(first["loc"][:len(loc)])), "an override")
    template = {"greater_than": "must be > {gt:g}", "greater_than_equal": "must be >= {ge:g}"}.get(first["type"])
    rule = template.format(**first["ctx"]) if template else first["msg"]
    unit = " seconds" if option == "--timeout" else ""
    value = first["input"]
    return ConfigError(f"{option} {rule}{unit}, but got {value:g}" if isinstance(value, (int, float))
                       else f"{option} {rule}, but got {value!r}")


COMMAND_LINE = "command_line"  # validation context of `with_overrides`: the options' own rules apply
JOURNAL_PREFIX = "journal://"  # journal:///abs/optuna.log or journal://relative/optuna.log


def resolve_url(url: str, base_dir: Path) -> str:
    """Make a relative ``sqlite:///file.db`` (or ``journal://file.log``) path relative to the
    experiments file, not the shell."""
    if url.startswith(JOURNAL_PREFIX):
        return JOURNAL_PREFIX + str((base_dir / Path(url[len(JOURNAL_PREFIX):]).expanduser()).resolve())
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and ":memory:" not in url:
        return prefix + str((base_dir / url[len(prefix):]).resolve())
    return url


def load_experiments_file(path: str | Path = DEFAULT_CONFIG) -> tuple[ExperimentsFile, Path]:
    """Read and validate a whole experiments file."""
    if not Path(path).expanduser().exists():
        raise ConfigError(f"file not found; {_where_to_look(Path(path))}", file=str(Path(path).expanduser().resolve()))
    parsed, path = read_model(path, ExperimentsFile, "a mapping with `experiments:`", section="experiments")
    if parsed.default is not None and parsed.default not in parsed.experiments:
        raise ConfigError(f"default experiment {parsed.default!r} is not defined; valid choices: "
                          f"{', '.join(parsed.experiments)}", file=str(path), key="default")
    for name, cfg in parsed.experiments.items():
        _check_source(name, cfg.model.pretrained_on, parsed.experiments, path)
        _check_selection(name, cfg, path)
    return parsed, path


def _check_selection(name: str, cfg: ExperimentConfig, path: Path) -> None:
    """`selection.confirm_top` configs confirmed at most: no more than the trials of the budget."""
    top, n_trials = cfg.selection.confirm_top, cfg.budget.n_trials
    if top > n_trials:
        raise ConfigError(f"confirm_top must be <= budget.n_trials, but got {top} > {n_trials}",
                          file=str(path), experiment=name, key="selection.confirm_top")


def _where_to_look(path: Path) -> str:
    """What to do about a missing experiments file: --config, and the nearest file of the same
    relative path in a folder above this one (as git finds its repository), if there is one."""
    hint = "give the experiments file with --config PATH"
    if path.is_absolute() or path.expanduser() != path:
        return hint
    here = Path.cwd()
    found = next((folder / path for folder in here.parents if (folder / path).is_file()), None)
    return hint + (f" (the nearest above this folder: --config {found})" if found else
                   f" (none in {here} or the folders above it)")


def _check_source(name: str, source: str | None, experiments: dict[str, ExperimentConfig], path: Path) -> None:
    """`model.pretrained_on` names another experiment of the file, one that trains from scratch."""
    if source is None:
        return
    choices = [n for n in experiments if n != name]
    if source not in choices:
        raise ConfigError(f"unknown experiment {source!r}; valid choices: {', '.join(choices) or 'none'}",
                          file=str(path), experiment=name, key="model.pretrained_on")
    if experiments[source].model.pretrained_on is not None:
        raise ConfigError(f"the source experiment {source!r} is itself pretrained_on "
                          f"{experiments[source].model.pretrained_on!r}; pretraining starts from scratch",
                          file=str(path), experiment=name, key="model.pretrained_on")


def load_space(sweep: Union[str, dict[str, Any]], base_dir: Path, *, file: str, experiment: str) -> SearchSpace:
    """Read a search space from its file under sweeps/ (or inline in the experiment)."""
    if isinstance(sweep, dict):
        raw, where, prefix = sweep, file, "sweep."
    else:
        space_path = (base_dir / Path(sweep).expanduser()).resolve()
        if not space_path.exists():
            raise ConfigError(f"search space file not found: {space_path} (a relative `sweep` path is relative to "
                              f"the folder of the experiments file, {base_dir}, not to the current folder)",
                              file=file, experiment=experiment, key="sweep")
        raw, where, prefix = read_yaml(space_path), str(space_path), ""
    try:
        return parse_space(raw)
    except ConfigError as err:
        raise ConfigError(err.reason, file=where,
                          experiment=experiment, key=(prefix + err.key) if err.key else None) from None


def load_experiment(path: str | Path = DEFAULT_CONFIG, name: str | None = None) -> Experiment:
    """Load one experiment (the file's `default`, or the only one, when `name` is None)."""
    parsed, path = load_experiments_file(path)
    names = list(parsed.experiments)
    if name is None:
        if parsed.default is None and len(names) > 1:
            raise ConfigError(f"no experiment named and no `default:`; valid choices: {', '.join(names)}",
                              file=str(path))
        name = parsed.default or names[0]
    if name not in parsed.experiments:
        raise ConfigError(f"unknown experiment {name!r}; valid choices: {', '.join(names)}", file=str(path))
    cfg = parsed.experiments[name]
    space = load_space(cfg.sweep, path.parent, file=str(path), experiment=name)
    return Experiment(name=name, config=cfg, space=space, config_path=path)
