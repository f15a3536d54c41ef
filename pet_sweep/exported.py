"""Export one trial as a standalone config (`pet-sweep export`): the trial a rule picks ("best",
"cheapest" or a number), written as the file `replay.train` runs (`replay.ReplayConfig`).

The file never holds a store's password (`train` asks for it), and replaces only an
export of the same trial unless forced; it is written atomically.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Literal

import yaml

from pet_sweep.config import Experiment, ModelConfig
from pet_sweep.errors import ConfigError, StudyError
from pet_sweep.params import params_from_dict
from pet_sweep.replay import FORMAT, CheckpointSource, ReplayConfig, ReplaySource
from pet_sweep.report.read import objectives_of, open_existing_study, recommendation_of, trial_costs
from pet_sweep.report.seeds import selection_of
from pet_sweep.report.stats import format_rate
from pet_sweep.selection import SEED_ATTR
from pet_sweep.sweep.confirm import completed_runs
from pet_sweep.sweep.records import BATCH_ATTR, PARAMS_ATTR, SPLIT_ATTR, TARGETS_ATTR, error_of, trial_config
from pet_sweep.tracking import PARENT_RUN_ATTR, RUN_ID_ATTR, redact_url
from pet_sweep.train.data import portable_path
from pet_sweep.train.pretrain import CHECKPOINT_ATTR, Checkpoint

Pick = Literal["best", "cheapest"] | int  # export's rule: the lowest error, the recommendation, a trial number


def _cheapest(exp: Experiment, study: Any) -> int:
    """The report's recommendation (`report.read.recommendation_of`): the cheapest trial within noise of the best."""
    rec = recommendation_of(exp, study)
    if rec is None:
        raise StudyError(f"study {study.study_name!r} recorded no costs (its trials predate cost measurement), so "
                         "no trial can be called the cheapest: use --pick best or --pick trial N")
    if rec.pick is None:
        raise StudyError(f"--pick cheapest: {rec.text}; use --pick best or --pick trial N")
    return rec.pick


def _pick_trial(study: Any, number: int | None, seed: int = 0) -> Any:
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state.name == "COMPLETE" and error_of(t) is not None]
    if not done and number is None:
        raise StudyError(f"study {study.study_name!r} has no completed trial to export yet")
    if number is None:  # the best config's median run (its seed replays it), or the lowest error
        sel = selection_of(completed_runs(trials, seed))
        best = sel.best.median_run.number if sel else min(done, key=lambda t: (error_of(t), t.number)).number
        return next(t for t in done if t.number == best)
    chosen = next((t for t in trials if t.number == number), None)
    listed = ", ".join(str(t.number) for t in done) or "none"
    if chosen is None:
        raise StudyError(f"trial {number} does not exist in study {study.study_name!r} "
                         f"(it has {len(trials)} trials; completed: {listed})")
    if chosen.state.name != "COMPLETE":
        raise StudyError(f"trial {number} of study {study.study_name!r} is {chosen.state.name}, not complete; "
                         f"export a completed trial ({listed})")
    return chosen


def export_config(exp: Experiment, pick: Pick | None = None) -> tuple[dict[str, Any], int]:
    """The standalone config of the trial `pick` names, as a mapping: "best" (or None) the
    lowest error, "cheapest" the report's recommendation, a number that trial."""
    study = open_existing_study(exp)
    if pick == "cheapest":
        chosen = _pick_trial(study, _cheapest(exp, study))
    else:
        chosen = _pick_trial(study, pick if isinstance(pick, int) else None, exp.config.seed)
    attrs = chosen.user_attrs
    if PARAMS_ATTR not in attrs:
        raise StudyError(f"trial {chosen.number} has no recorded parameters ({PARAMS_ATTR!r} user attribute); "
                         "was it run by pet-sweep?")
    base = trial_config(exp, params_from_dict(attrs[PARAMS_ATTR]), attrs.get(BATCH_ATTR), attrs.get(SEED_ATTR))
    checkpoint = None
    if CHECKPOINT_ATTR in attrs:  # the file the trial started from: the replay needs no source experiment
        found = Checkpoint(**attrs[CHECKPOINT_ATTR])
        base["model"] = found.model(ModelConfig(**base["model"])).model_dump(exclude_none=True)
        base["model"]["weights"] = portable_path(found.path)  # no home folder: it works from any machine's cache
        checkpoint = CheckpointSource(sha256=found.sha256, pretrained_on=found.source, run_id=found.run_id)
    data = dict(base["data"])
    if not exp.config.data.augment and "flip" not in exp.config.data.model_fields_set:
        data.pop("flip", None)  # flip acts only with augment: a default that did nothing is no setting of the run
    if exp.data_path() is not None:
        data["path"] = str(exp.data_path())  # the exported file may live anywhere
    n_valid = len(attrs.get(TARGETS_ATTR, ())) or None
    source = ReplaySource(experiment=exp.name, study=exp.study_name, trial=chosen.number,
                          storage=redact_url(exp.storage_url), validation_error=error_of(chosen), n_valid=n_valid,
                          mlflow_run_id=attrs.get(RUN_ID_ATTR),
                          mlflow_parent_run_id=study.user_attrs.get(PARENT_RUN_ATTR),
                          split=study.user_attrs.get(SPLIT_ATTR),
                          picked_by="trial" if isinstance(pick, int) else pick or "best",
                          costs={k: v for k, v in trial_costs(chosen, objectives_of(study, exp)).items()
                                 if v is not None} or None, checkpoint=checkpoint)
    doc = {"format": FORMAT, "name": f"{exp.name}-trial-{chosen.number}",
           "source": source.model_dump(exclude_none=True), "data": data, "model": base["model"],
           "params": base["params"], "seed": base["seed"],
           # a file users keep, mail and upload: the stores' passwords stay out of it (`train` asks)
           "tracking": {"uri": redact_url(exp.tracking_uri), "experiment": exp.tracking_experiment}}
    ReplayConfig(**doc)  # what we write must read back
    return doc, chosen.number


def default_output(pick: Pick | None) -> str:
    """Where `export` writes without `-o`: best.yaml holds the best trial only."""
    return "cheapest.yaml" if pick == "cheapest" else f"trial-{pick}.yaml" if isinstance(pick, int) else "best.yaml"


def _check_overwrite(doc: dict[str, Any], path: Path) -> None:
    """Refuse to replace a file that is not an export of the same trial of the same study."""
    if not path.exists():
        return
    try:
        old = yaml.safe_load(path.read_text(encoding="utf-8"))
        held = old.get("source") if isinstance(old, dict) and old.get("format") == FORMAT else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        held = None
    new = doc.get("source", {})
    if isinstance(held, dict) and (held.get("study"), held.get("trial")) == (new.get("study"), new.get("trial")):
        return  # the same trial exported again: its file brought up to date
    what = (f"trial {held.get('trial')} of study {held.get('study')!r}"
            + (f" (picked: {held['picked_by']})" if held.get("picked_by") else "")
            if isinstance(held, dict) else "no config written by `pet-sweep export`")
    raise ConfigError(f"{path} holds {what}, not trial {new.get('trial')} of study {new.get('study')!r} "
                      f"(picked: {new.get('picked_by')}); left as it is: pass --force to replace it, "
                      "or -o another file")


def write_config(doc: dict[str, Any], path: Path, *, force: bool = False) -> Path:
    """Write the exported config atomically (a temporary file renamed into place); a file that
    holds another trial's config, or no export, is replaced only with `force`."""
    path = path.expanduser().resolve()
    if not force:
        _check_overwrite(doc, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    source = doc.get("source", {})
    picked = {"best": "the best config (lowest mean error over the most seeds; this is its median run) or, with one "
                      "seed per config, the lowest validation error", "cheapest": "the cheapest within noise of the lowest error",
              "trial": "named by number"}.get(source.get("picked_by"), "")
    header = (f"# pet-sweep: trial {source.get('trial')} of study {source.get('study')!r}, validation error "
              f"{format_rate(source.get('validation_error'), source.get('n_valid'))}"
              + (f"; picked: {picked}" if picked else "") + "\n"
              f"# Re-run exactly this fine-tune once: pet-sweep train {path.name} [--export-model]\n")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(header + yaml.safe_dump(doc, sort_keys=False))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
