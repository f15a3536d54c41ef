"""`pet-sweep report` at the edges: read the Optuna storage and the MLflow store,
hand plain records to the pure analysis (`report.analysis`), write the outputs.

Reading never writes: a missing SQLite file is an error here, not a new empty
store. Writing is all or nothing: every output goes to a temporary folder, is
attached to the sweep's parent MLflow run, and only then moved into ``--out``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from pet_sweep.config import Experiment
from pet_sweep.errors import StudyError
from pet_sweep.params import inert_params
from pet_sweep.report.analysis import (
    HeldOut,
    StudyReport,
    TrialRecord,
    build_report,
    completed,
    recommendation_for,
    too_few_for_importances,
)
from pet_sweep.report.costs import CostBook, key_of, session_of
from pet_sweep.report.front import Recommendation
from pet_sweep.report.render import html, markdown
from pet_sweep.report.seeds import run_of
from pet_sweep.space import Range, always_inert
from pet_sweep.tracking import (
    PARENT_RUN_ATTR,
    RUN_ID_ATTR,
    SweepRuns,
    check_server,
    open_sweep_runs,
    redact_url,
    send_spooled,
    sqlite_path,
)
from pet_sweep.tracking_spool import spool_dir

REPLAY_ROLE = "replay"              # tag pet_sweep.role of a `pet-sweep train` run
REPLAY_OF_TAG = "pet_sweep.replay_of"
HELD_OUT_TAG = "pet_sweep.held_out"  # of a replay: true (test split's fingerprint matched), false, unverified
TEST_METRIC, N_TEST_METRIC, VALID_METRIC = "test_error_rate", "n_test", "valid_error_rate"


def require_sqlite_file(url: str, what: str, hint: str) -> None:
    """Refuse a ``sqlite:///`` URL whose file does not exist (opening it would create an empty store)."""
    db = sqlite_path(url)
    if db is not None and not db.is_file():
        raise StudyError(f"no {what} at {db}; {hint}")


def open_existing_study(exp: Experiment) -> Any:
    """The experiment's study, read-only in spirit: never creates a storage or a study."""
    from pet_sweep.sweep.storage import open_study, quiet_optuna  # heavy: optuna, only to open the study

    quiet_optuna()
    return open_study(exp, create=False)


def objectives_of(study: Any, exp: Experiment) -> tuple[str, ...]:
    """The names of the study's objectives, error_rate first: those Optuna recorded
    (`set_metric_names`), else the experiment's `objectives` where they are as many as the
    study's directions, else numbered."""
    n = len(study.directions)
    for names in (study.metric_names, exp.config.objectives):
        if names and len(names) == n:
            return tuple(str(name) for name in names)
    return ("error_rate", *(f"objective {i}" for i in range(1, n)))


def trial_costs(trial: Any, objectives: Sequence[str]) -> dict[str, float | None]:
    """What a trial cost (`COST_ATTRS` user attrs), each None where it was not recorded; a
    multi-objective trial's values fill in the costs that are objectives."""
    from pet_sweep.sweep.records import COST_ATTRS  # heavy: imports optuna

    costs = {name: trial.user_attrs.get(name) for name in COST_ATTRS}
    if len(objectives) > 1 and trial.values and len(trial.values) == len(objectives):
        for name, value in zip(objectives[1:], trial.values[1:]):
            if costs.get(name) is None:
                costs[name] = float(value)
    return {k: float(v) if isinstance(v, (int, float)) else None for k, v in costs.items()}


def trial_records(study: Any, batch_size: int | None = None,
                  objectives: Sequence[str] = ("error_rate",), seed: int = 0) -> list[TrialRecord]:
    """Every trial of the study as a plain `TrialRecord` (running ones with their history so far).

    `batch_size`: the experiment's; a trial re-queued after an out-of-memory ran at its own.
    `objectives`: the study's names (`objectives_of`); `seed`: the experiment's, the training seed of
    a trial that recorded none.
    """
    # heavy: sweep.records imports optuna; the study is open by now anyway
    from pet_sweep.sweep.records import (
        BATCH_ATTR,
        DEVICE_ATTR,
        HISTORY_ATTR,
        PARAMS_ATTR,
        PRECISION_ATTR,
        PREDS_ATTR,
        REASON_ATTR,
        TARGETS_ATTR,
        error_of,
    )

    records = []
    for t in study.get_trials(deepcopy=False):
        attrs = t.user_attrs
        seconds = ((t.datetime_complete - t.datetime_start).total_seconds()
                   if t.datetime_complete and t.datetime_start else 0.0)
        error = error_of(t) if t.state.name == "COMPLETE" else None
        value = error if error is not None and math.isfinite(error) else None
        records.append(TrialRecord(
            number=t.number, state=t.state.name, params=attrs.get(PARAMS_ATTR) or dict(t.params),
            history=tuple(attrs.get(HISTORY_ATTR, ())), value=value,
            preds=tuple(attrs.get(PREDS_ATTR, ())), targets=tuple(attrs.get(TARGETS_ATTR, ())),
            precision=str(attrs.get(PRECISION_ATTR, "")), reason=str(attrs.get(REASON_ATTR, "")),
            seconds=seconds, run_id=attrs.get(RUN_ID_ATTR), batch_size=attrs.get(BATCH_ATTR, batch_size),
            costs=trial_costs(t, objectives), values=tuple(float(v) for v in t.values or ()),
            device=str(attrs.get(DEVICE_ATTR, "")),
            run=None if value is None else run_of(t.number, attrs, value, seed, attrs.get(PREDS_ATTR, ()),
                                                  attrs.get(TARGETS_ATTR, ()))))
    return records


def cost_book(exp: Experiment, study: Any, records: Sequence[TrialRecord]) -> CostBook:
    """The completed trials' cost keys (`report.costs.CostKey`) and the study's last timing session."""
    model = exp.config.model
    keys = {r.number: key_of(r, model.img_size, model.channels_last, model.batch_size)
            for r in records if r.state == "COMPLETE"}
    return CostBook(keys, session_of(study.user_attrs))


def recommendation_of(exp: Experiment, study: Any) -> Recommendation | None:
    """The report's recommendation for the study (`analysis.recommendation_for`); None: no costs recorded."""
    objectives = objectives_of(study, exp)
    records = trial_records(study, exp.config.model.batch_size, objectives, exp.config.seed)
    return recommendation_for(records, objectives, experiment=exp.name, study_name=exp.study_name,
                              n_classes=n_classes(records), book=cost_book(exp, study, records))


def n_classes(records: Sequence[TrialRecord]) -> int | None:
    """How many classes the validation items hold (the chance level of the error rate)."""
    return len(set(next((r.targets for r in records if r.targets), ()))) or None


def active_params(study: Any) -> tuple[list[str], dict[str, int]]:
    """Optuna params that acted in every completed trial, and the others with the number of
    completed trials they acted in (base_lr: only those with a frozen phase)."""
    from optuna.trial import TrialState  # heavy: optuna, as everywhere in this module

    from pet_sweep.sweep.records import PARAMS_ATTR  # heavy: imports optuna

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    # an old study recorded base_lr even where it did nothing: the trial's own values decide
    acting = [set(t.params) - inert_params(t.user_attrs.get(PARAMS_ATTR) or t.params) for t in done]
    counts = {name: sum(name in a for a in acting) for name in set().union(*(t.params for t in done))}
    return sorted(n for n, k in counts.items() if k == len(done)), {n: k for n, k in counts.items() if k < len(done)}


def param_importances(study: Any) -> tuple[dict[str, float], str]:
    """Optuna's fANOVA importances (seeded) of the parameters active in every completed trial,
    or a note saying why there are none; the note also names the parameters left out."""
    import optuna  # heavy: optuna (its fANOVA evaluator)

    from pet_sweep.sweep.records import error_of

    n_done = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    too_few = too_few_for_importances(n_done)
    if too_few:  # not worth the forest
        return {}, too_few
    params, partial = active_params(study)
    left_out = "; ".join(f"{name} left out: it acted in {k} of {n_done} completed trials"
                         for name, k in sorted(partial.items()))
    if not params:
        return {}, "not ranked: no parameter acted in every completed trial" + (f"; {left_out}" if left_out else "")
    try:
        return optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0), params=params,
            target=error_of if len(study.directions) > 1 else None), left_out
    except (ValueError, RuntimeError) as err:  # nothing varies
        return {}, f"not ranked: {err}"


def space_bounds(exp: Experiment) -> dict[str, tuple[float, float]]:
    """Ranges of the searched numeric parameters (to say "at the edge of its range: widen it")."""
    return {name: (spec.low, spec.high) for name, spec in exp.space.params.items() if isinstance(spec, Range)}


# The sweep's MLflow store, experiment and parent run, read through tracking.py (the one door to MLflow).
Tracking = SweepRuns


def open_tracking(exp: Experiment, study: Any) -> Tracking:
    """The sweep's parent run in the MLflow store; a store lacking it is an error."""
    hint = ("point `tracking.uri` (or --tracking-uri) at the store the sweep logged to")
    require_sqlite_file(exp.tracking_uri, "MLflow store", hint)
    parent = study.user_attrs.get(PARENT_RUN_ATTR)
    if not parent:
        raise StudyError(f"study {exp.study_name!r} has no MLflow parent run recorded; was it made by pet-sweep run?")
    check_server(exp.tracking_uri)  # a server that is down: said in seconds, not after minutes of retries
    try:  # what a sweep kept while the server was away; a write it refuses leaves the report as it is
        send_spooled(exp.tracking_uri, spool_dir(exp.storage_url, exp.tracking_uri))
    except StudyError:
        pass
    runs = open_sweep_runs(exp.tracking_uri, parent)
    if runs is None:
        raise StudyError(f"the MLflow store {redact_url(exp.tracking_uri)} lacks the sweep's runs "
                         f"(parent run {parent} of study {exp.study_name!r}); {hint}")
    return runs


def read_heldout(tracking: Tracking, study_name: str) -> list[HeldOut]:
    """Finished `pet-sweep train` replays of this study's trials, oldest first."""
    out = []
    for run in tracking.finished_runs(study_name, REPLAY_ROLE):
        m, tags = run.metrics, run.tags
        trial = tags.get(REPLAY_OF_TAG)
        out.append(HeldOut(trial=int(trial) if trial not in (None, "") else None, test_error=m.get(TEST_METRIC),
                           n_test=int(m.get(N_TEST_METRIC, 0)), valid_error=m.get(VALID_METRIC),
                           run_id=run.run_id,
                           held_out={"true": True, "false": False}.get(tags.get(HELD_OUT_TAG, ""))))
    return out


@dataclass
class ReportBundle:
    """A built report with what made it (the notebook uses `study` for Optuna's plots)."""

    report: StudyReport
    study: Any
    tracking: Tracking


def load_report(exp: Experiment) -> ReportBundle:
    """Read the study and the MLflow store and analyse them; writes nothing."""
    study = open_existing_study(exp)
    objectives = objectives_of(study, exp)
    records = trial_records(study, exp.config.model.batch_size, objectives, exp.config.seed)
    # checked before MLflow: the clearer message for a study that has just started
    completed(records, experiment=exp.name, study_name=exp.study_name)
    tracking = open_tracking(exp, study)
    importances, note = param_importances(study)
    report = build_report(records, experiment=exp.name, study_name=exp.study_name, importances=importances,
                          heldout=read_heldout(tracking, exp.study_name), bounds=space_bounds(exp),
                          n_classes=n_classes(records), test_split=exp.config.data.test_pct > 0,
                          importance_note=note, always_inert=always_inert(exp.space), objectives=objectives,
                          cost_book=cost_book(exp, study, records))
    from pet_sweep.sweep.converge import stored_verdict  # heavy: optuna

    verdict = stored_verdict(study)  # budget.stop_when: converged, at its last evaluation
    if verdict is not None:
        report.notes.append(f"budget.stop_when: converged: {verdict.text()}" + (
            "; the search stopped there" if verdict.converged else "; more trials may still find a better config"))
    incomplete = tracking.incomplete_trials(exp.study_name, {r.number: r.state for r in records})
    if incomplete:
        report.notes.append(f"the MLflow record of trial(s) {', '.join(map(str, incomplete))} is incomplete "
                            f"(their runs missing or still open: `pet-sweep sync {exp.name}` sends what a sweep "
                            "kept while the MLflow server was away); Optuna's record of them is whole")
    return ReportBundle(report, study, tracking)


@dataclass(frozen=True)
class Written:
    out_dir: Path
    files: list[Path]
    parent_run_id: str
    report: StudyReport  # as written: with the notes of the Optuna figures


def render(bundle: ReportBundle, folder: Path) -> tuple[list[Path], StudyReport]:
    """Figures (PNG), report.html (figures embedded) and report.md into `folder`; the files,
    and the report as written (its notes say which Optuna figures could not be drawn)."""
    from pet_sweep.report.figures import optuna_figures, pareto_front, png_bytes, report_figures  # heavy: matplotlib

    figures = report_figures(bundle.report)
    if bundle.report.multi_objective:
        figures["pareto_front"] = pareto_front(bundle.study, bundle.report)
    extra, notes = optuna_figures(bundle.study, list(bundle.report.importances))
    report = dataclasses.replace(bundle.report, notes=[*bundle.report.notes, *notes])
    pngs = {name: png_bytes(fig) for name, fig in {**figures, **extra}.items()}
    (folder / "figures").mkdir(parents=True, exist_ok=True)
    paths = []
    for name, png in pngs.items():
        path = folder / "figures" / f"{name}.png"
        path.write_bytes(png)
        paths.append(path)
    md = folder / "report.md"
    md.write_text(markdown(report, {n: f"figures/{n}.png" for n in pngs}), encoding="utf-8")
    page = folder / "report.html"
    page.write_text(html(report, pngs), encoding="utf-8")
    return [page, md, *paths], report


def write_report(bundle: ReportBundle, out_dir: Path, *, attach: bool = True) -> Written:
    """Render into a temporary folder, attach to the parent MLflow run, then move into `out_dir`."""
    out_dir = out_dir.expanduser().resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        files, report = render(bundle, tmp)
        if attach:
            bundle.tracking.attach(tmp, "report")
        final = []
        for path in files:
            target = out_dir / path.relative_to(tmp)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)  # same file system: each file appears whole
            final.append(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Written(out_dir, final, bundle.tracking.parent_run_id, report)
