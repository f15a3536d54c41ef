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

from pydantic import Field, ValidationError, field_validator, model_validator

from pet_sweep.errors import ConfigError
from pet_sweep.selection import SelectionConfig, check_selection
from pet_sweep.settings import (  # noqa: F401  (re-exported: the sections are part of the config)
    COMMAND_LINE,
    BudgetConfig,
    DataConfig,
    FaultsConfig,
    LaunchConfig,
    ModelConfig,
    PretrainConfig,
    PrunerConfig,
    SamplerConfig,
    TrackingConfig,
)
from pet_sweep.space import SearchSpace, Strict, parse_space
from pet_sweep.yaml_files import read_model, read_yaml, validate_model

DEFAULT_CONFIG = "experiments.yaml"

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
    # the best trial's and the recommended cheaper one's learners kept as MLflow models (`sweep.keep`)
    keep_winner: bool = True
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
    def _search_fits_objectives(self) -> "ExperimentConfig":
        if self.sampler.name == "nsga2" and len(self.objectives) < 2:
            raise ValueError("sampler nsga2 is for several objectives, but `objectives` names only error_rate; "
                             "add a cost (e.g. objectives: [error_rate, predict_ms]) or use tpe")
        if len(self.objectives) > 1 and self.sampler.name == "cmaes":
            raise ValueError("sampler cmaes is for one objective, but `objectives` names "
                             f"{self.objectives}; use tpe, gp or nsga2")
        if len(self.objectives) > 1 and self.budget.stop_when == "converged":
            raise ValueError("budget.stop_when: converged is for one objective (Optuna's Terminator bounds the "
                             f"regret of one value), but `objectives` names {self.objectives}; use stop_when: budget")
        return self


class ExperimentsFile(Strict):
    default: str | None = None
    experiments: dict[str, ExperimentConfig] = Field(min_length=1)


@dataclass(frozen=True)
class Experiment:
    """A validated experiment, ready to run: `from_yaml(path, name)`, or `from_dict(mapping)`
    with no file on disk.

    Relative paths (sqlite/journal storage, tracking, data, sweep file) resolve against
    `root` when given, else the experiments file's folder, else the current folder.
    """

    name: str
    config: ExperimentConfig
    space: SearchSpace
    config_path: Path | None = None
    root: Path | None = None

    @classmethod
    def from_yaml(cls, path: str | Path = DEFAULT_CONFIG, name: str | None = None) -> "Experiment":
        """One experiment of an experiments file (its `default`, or the only one, when `name` is None)."""
        return load_experiment(path, name)

    @classmethod
    def from_dict(cls, data: dict[str, Any], name: str | None = None, *,
                  base_dir: str | Path | None = None) -> "Experiment":
        """An experiment built in Python, validated by the same models as experiments.yaml.

        `data` is either a whole experiments mapping (``{"experiments": {...}, "default": ...}``,
        `name` picks one) or one experiment's settings (`name` defaults to "experiment").
        Relative paths resolve against `base_dir` (default: the current folder, fixed now).
        """
        if not isinstance(data, dict):
            raise ConfigError(f"from_dict needs a mapping, but got {type(data).__name__}", file=DICT_SOURCE)
        if "experiments" not in data:
            data = {"experiments": {name or "experiment": data}}
        parsed = validate_model(data, ExperimentsFile, DICT_SOURCE, section="experiments")
        for exp_name, cfg in parsed.experiments.items():
            check_selection(cfg.selection, cfg.budget.n_trials, file=DICT_SOURCE, experiment=exp_name)
        root = Path(base_dir or Path.cwd()).expanduser().resolve()
        return _select(parsed, name, DICT_SOURCE, root, config_path=None)

    @property
    def base_dir(self) -> Path:
        if self.root is not None:
            return self.root
        return self.config_path.parent if self.config_path is not None else Path.cwd()

    @property
    def where(self) -> str:
        """Where the experiment was defined, for error messages: its file, or `<from_dict>`."""
        return str(self.config_path) if self.config_path is not None else DICT_SOURCE

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
        if n_trials is not None:  # a smaller --n-trials cuts the selection down to fit (the header says what runs)
            cfg = cfg.model_copy(update={"selection": cfg.selection.fitted(cfg.budget.n_trials)})
            check_selection(cfg.selection, cfg.budget.n_trials, experiment=self.name,
                            file=f"--n-trials {n_trials} with {self.config_path or DICT_SOURCE}")
        return Experiment(self.name, cfg, self.space, self.config_path, self.root)


def _override_error(first: Any, options: dict[str, tuple[str, ...]]) -> ConfigError:
    """``--timeout must be > 0 seconds, but got -5``: a refused override, named by its option."""
    option = next((o for o, loc in options.items() if loc == tuple(first["loc"][:len(loc)])), "an override")
    template = {"greater_than": "must be > {gt:g}", "greater_than_equal": "must be >= {ge:g}"}.get(first["type"])
    rule = template.format(**first["ctx"]) if template else first["msg"]
    unit = " seconds" if option == "--timeout" else ""
    value = first["input"]
    return ConfigError(f"{option} {rule}{unit}, but got {value:g}" if isinstance(value, (int, float))
                       else f"{option} {rule}, but got {value!r}")


DICT_SOURCE = "<from_dict>"  # the "file" an experiment built in Python names in errors
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
    for name, cfg in parsed.experiments.items():
        _check_source(name, cfg.model.pretrained_on, parsed.experiments, path)
        check_selection(cfg.selection, cfg.budget.n_trials, file=str(path), experiment=name)
    return parsed, path


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
    return _select(parsed, name, str(path), path.parent, config_path=path)


def _select(parsed: ExperimentsFile, name: str | None, file: str, base_dir: Path, *,
            config_path: Path | None) -> Experiment:
    """The experiment `name` of a validated experiments mapping, with its search space."""
    path = file
    if config_path is None:
        for other, cfg in parsed.experiments.items():
            _check_source(other, cfg.model.pretrained_on, parsed.experiments, Path(file))
    names = list(parsed.experiments)
    if name is None:
        if parsed.default is None and len(names) > 1:
            raise ConfigError(f"no experiment named and no `default:`; valid choices: {', '.join(names)}",
                              file=str(path))
        if parsed.default is not None and parsed.default not in parsed.experiments:
            # checked only when it is used: an experiment named on the command line needs no default
            raise ConfigError(f"default experiment {parsed.default!r} is not defined; valid choices: "
                              f"{', '.join(names)}", file=str(path), key="default")
        name = parsed.default or names[0]
    if name not in parsed.experiments:
        raise ConfigError(f"unknown experiment {name!r}; valid choices: {', '.join(names)}", file=str(path))
    cfg = parsed.experiments[name]
    space = load_space(cfg.sweep, base_dir, file=str(path), experiment=name)
    root = None if config_path is not None else base_dir
    return Experiment(name=name, config=cfg, space=space, config_path=config_path, root=root)
