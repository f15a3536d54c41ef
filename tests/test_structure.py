"""The package's shape, checked: no import cycle, light commands that load neither torch
nor fastai, size limits, MLflow behind one door, objects complete when constructed.

These read the source with `ast` (and, for the light commands, run them in a fresh
interpreter); none of them times anything.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pet_sweep"
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60
EXCEPTION_MARK = "# size:"  # on the line above a def (or in a module's first lines): why it may be longer
# What a function-local import may bring in: libraries a light command must not pay for.
# (optuna too: `pet-sweep --help` must not wait for it). A pet_sweep module that imports one of
# them at its top is heavy as well.
HEAVY = ("torch", "torchvision", "fastai", "fastcore", "mlflow", "matplotlib", "sqlalchemy", "pandas", "numpy",
         "optuna", "optuna_dashboard", "PIL", "sklearn", "scipy", "psutil", "playwright", "ray", "timm")


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imported(node: ast.ImportFrom | ast.Import, module: str, is_package: bool) -> list[str]:
    """The dotted names an import statement refers to (module, and module.name for `from`)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join(package + ([base] if base else []))
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def _top_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported (not those inside functions or classes)."""
    out: list[ast.Import | ast.ImportFrom] = []
    stack: list[ast.stmt] = list(tree.body)
    while stack:
        stmt = stack.pop()
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            out.append(stmt)
        elif isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test):
            continue
        elif isinstance(stmt, (ast.If, ast.Try, ast.With)):
            for field in ("body", "orelse", "finalbody"):
                stack.extend(getattr(stmt, field, []))
            stack.extend(s for handler in getattr(stmt, "handlers", []) for s in handler.body)
    return out


def import_graph(top_level_only: bool = False) -> dict[str, set[str]]:
    """Module -> the pet_sweep modules it imports, at top level or inside functions alike
    (a function-local import hides a cycle from Python, not from a reader)."""
    mods = modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        for block in [n for n in ast.walk(tree) if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)]:
            block.body = []  # imports for type annotations only: never run
        nodes = _top_level_imports(tree) if top_level_only else \
            [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
        targets: set[str] = set()
        for node in nodes:
            for target in imported(node, name, path.name == "__init__.py"):
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != name and target != "pet_sweep":
                    targets.add(target)
        graph[name] = targets
    return graph


def _is_heavy_library(target: str) -> bool:
    return any(target == h or target.startswith(h + ".") for h in HEAVY)


def heavy_modules() -> set[str]:
    """The pet_sweep modules whose import (their top level, followed through pet_sweep) loads a heavy library."""
    mods, graph = modules(), import_graph(top_level_only=True)
    direct = {name for name, path in mods.items()
              if any(_is_heavy_library(t) for n in _top_level_imports(ast.parse(path.read_text()))
                     for t in imported(n, name, path.name == "__init__.py")[:1])}
    heavy, grew = set(direct), True
    while grew:
        more = {name for name, targets in graph.items() if targets & heavy} - heavy
        heavy |= more
        grew = bool(more)
    return heavy


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_package() -> None:
    assert cycles(import_graph()) == []


def _marked(lines: list[str], line_number: int) -> bool:
    """Is there a `# size:` comment on the line above `line_number` (1-based), decorators skipped?"""
    i = line_number - 2
    while i >= 0 and lines[i].lstrip().startswith("@"):
        i -= 1
    return i >= 0 and EXCEPTION_MARK in lines[i]


def test_no_module_or_function_over_the_size_limits() -> None:
    offenders = []
    for name, path in modules().items():
        lines = path.read_text().splitlines()
        if len(lines) > MAX_MODULE_LINES and not any(EXCEPTION_MARK in line for line in lines[:12]):
            offenders.append(f"module {name}: {len(lines)} lines")
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES and not _marked(lines, node.decorator_list[0].lineno
                                                               if node.decorator_list else node.lineno):
                    offenders.append(f"function {name}.{node.name} (line {node.lineno}): {length} lines")
    assert offenders == [], "over the limits (or add a '# size: why' comment):\n" + "\n".join(offenders)


def _local_import_blocks(tree: ast.AST) -> list[list[ast.Import | ast.ImportFrom]]:
    """The import statements inside functions, grouped in runs of consecutive statements."""
    blocks: list[list[ast.Import | ast.ImportFrom]] = []

    def visit(body: list[ast.stmt], in_function: bool) -> None:
        run: list[ast.Import | ast.ImportFrom] = []
        for stmt in body:
            if isinstance(stmt, (ast.Import, ast.ImportFrom)) and in_function:
                run.append(stmt)
                continue
            if run:
                blocks.append(run)
                run = []
            inner = in_function or isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef))
            for field in ("body", "orelse", "finalbody", "handlers"):
                children = getattr(stmt, field, None)
                if isinstance(children, list) and children and isinstance(children[0], (ast.stmt, ast.excepthandler)):
                    visit(children, inner)
        if run:
            blocks.append(run)

    visit(tree.body, False)
    return blocks


def test_function_local_imports_only_keep_heavy_libraries_out_of_light_commands() -> None:
    """Each function-local import brings in a heavy library (or a pet_sweep module that does),
    and its block carries a comment saying why it is local."""
    offenders, heavy_ours = [], heavy_modules()
    for name, path in modules().items():
        lines = path.read_text().splitlines()
        for block in _local_import_blocks(ast.parse("\n".join(lines))):
            span = lines[block[0].lineno - 2: block[-1].end_lineno]
            commented = any("#" in line for line in span)
            for node in block:
                targets = imported(node, name, path.name == "__init__.py")
                heavy = any(_is_heavy_library(target) or target in heavy_ours for target in targets)
                if not (heavy and commented):
                    offenders.append(f"{name}:{node.lineno}: {lines[node.lineno - 1].strip()}"
                                     + ("" if heavy else "  (not heavy: import it at the top)")
                                     + ("" if commented else "  (no comment says why it is local)"))
    assert offenders == [], f"{len(offenders)} function-local imports:\n" + "\n".join(offenders)


def test_mlflow_is_reached_only_through_tracking() -> None:
    offenders = []
    for name, path in modules().items():
        if name == "pet_sweep.tracking":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "client":
                offenders.append(f"{name}:{node.lineno}: .client")
            if isinstance(node, ast.Name) and node.id == "MlflowClient":
                offenders.append(f"{name}:{node.lineno}: MlflowClient")
    assert offenders == [], "\n".join(offenders)


# MLflow's fluent API: process-wide state (the tracking URI, the active run) that tracking.py avoids
FLUENT = {"set_tracking_uri", "get_tracking_uri", "set_registry_uri", "get_registry_uri", "start_run", "end_run",
          "active_run", "set_experiment", "log_param", "log_params", "log_metric", "log_metrics", "set_tag",
          "set_tags", "log_artifact", "log_artifacts", "log_dict", "log_figure", "log_text", "register_model",
          "search_runs", "search_registered_models", "search_experiments", "get_run", "delete_run"}


def fluent_mlflow_calls(source: str) -> list[str]:
    """`mlflow.start_run(...)`-style calls (and `from mlflow import start_run`) in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Attribute) and node.attr in FLUENT and isinstance(node.value, ast.Name)
                and node.value.id == "mlflow"):
            found.append(f"{node.lineno}: mlflow.{node.attr}")
        if isinstance(node, ast.ImportFrom) and node.module == "mlflow":
            found += [f"{node.lineno}: from mlflow import {a.name}" for a in node.names if a.name in FLUENT]
    return sorted(found, key=lambda call: int(call.split(":")[0]))


def test_the_fluent_finder_finds_fluent_calls() -> None:
    assert fluent_mlflow_calls("import mlflow\nwith mlflow.start_run():\n    mlflow.log_metric('a', 1)\n"
                               "from mlflow import set_tracking_uri\nmlflow.pyfunc.load_model('m')\n") == [
        "2: mlflow.start_run", "3: mlflow.log_metric", "4: from mlflow import set_tracking_uri"]


def test_mlflow_fluent_api_is_used_nowhere() -> None:
    offenders = [f"{name}:{call}" for name, path in modules().items() for call in fluent_mlflow_calls(path.read_text())]
    assert offenders == [], "MLflow's fluent API outside tracking:\n" + "\n".join(offenders)


# The one process-wide warning filter: a command's and a Ray worker's, for one torch message (see its docstring).
PROCESS_WIDE_FILTER_OK = {"quiet_fastai_import"}


def unscoped_warning_filters(source: str) -> list[str]:
    """`warnings.filterwarnings`/`simplefilter` calls outside a `with warnings.catch_warnings()` block
    (and outside the functions allowed one): each would change what the whole process shows."""
    found: list[str] = []

    def visit(node: ast.AST, scoped: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in PROCESS_WIDE_FILTER_OK:
            return
        if isinstance(node, ast.With) and any("catch_warnings" in ast.unparse(item.context_expr)
                                              for item in node.items):
            scoped = True
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("filterwarnings", "simplefilter") and not scoped):
            found.append(f"{node.lineno}: warnings.{node.func.attr}")
        for child in ast.iter_child_nodes(node):
            visit(child, scoped)

    visit(ast.parse(source), False)
    return found


def test_the_filter_finder_finds_unscoped_filters() -> None:
    assert unscoped_warning_filters(
        "import warnings\nwarnings.filterwarnings('ignore')\nwith warnings.catch_warnings():\n"
        "    warnings.simplefilter('ignore')\ndef quiet_fastai_import():\n    warnings.filterwarnings('ignore')\n"
        "def f():\n    warnings.simplefilter('error')\n") == ["2: warnings.filterwarnings", "8: warnings.simplefilter"]


def test_no_warning_is_silenced_for_the_whole_process() -> None:
    """Library drift stays visible: pet-sweep silences a warning only around the call that gives it,
    and the test suite ignores none (no `filterwarnings` in pyproject's pytest options)."""
    offenders = [f"{name}:{call}" for name, path in modules().items() for call in unscoped_warning_filters(path.read_text())]
    assert offenders == [], "process-wide warning filters:\n" + "\n".join(offenders)
    pyproject = (PACKAGE.parent / "pyproject.toml").read_text()  # (tomllib is 3.11's; the project runs on 3.10)
    assert not [line for line in pyproject.splitlines() if line.strip().startswith("filterwarnings")]


def _annotation_name(annotation: ast.expr | None) -> str:
    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
        return annotation.value.split("|")[0].strip()
    if isinstance(annotation, ast.BinOp):  # X | None
        return _annotation_name(annotation.left)
    return annotation.id if isinstance(annotation, ast.Name) else ""


def test_objects_are_complete_when_constructed() -> None:
    """No attribute of a pet_sweep object is assigned from outside its class after construction:
    in a function, a name bound to a pet_sweep class (built there, or a parameter annotated with
    it) never appears as `name.attr = value`. Objects of other libraries (a fastai Learner) may be."""
    trees = {name: ast.parse(path.read_text()) for name, path in modules().items()}
    classes = {node.name for tree in trees.values() for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
    offenders = []
    for name, tree in trees.items():
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            ours = {arg.arg for arg in func.args.args + func.args.kwonlyargs
                    if _annotation_name(arg.annotation) in classes} - {"self", "cls"}
            for node in ast.walk(func):
                if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
                    called = node.value.func
                    called_name = called.id if isinstance(called, ast.Name) else getattr(called, "attr", "")
                    if called_name in classes:
                        ours |= {t.id for t in node.targets if isinstance(t, ast.Name)}
            for node in ast.walk(func):
                targets = node.targets if isinstance(node, ast.Assign) else \
                    [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
                for target in targets:
                    for sub in ast.walk(target):
                        if isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Store) \
                                and isinstance(sub.value, ast.Name) and sub.value.id in ours:
                            offenders.append(f"{name}:{sub.lineno}: {ast.unparse(sub)} = ...")
    assert offenders == [], "\n".join(offenders)


LIGHT_RUNNER = """
import json, sys
from pet_sweep.cli import cli
first = {}
for args in json.loads(sys.argv[1]):
    try:
        cli.main(args, prog_name="pet-sweep", standalone_mode=False)
    except SystemExit as stop:
        if stop.code not in (0, None):
            raise
    for heavy in ("torch", "fastai"):
        if heavy in sys.modules and heavy not in first:
            first[heavy] = " ".join(args)
print(json.dumps(first))
"""


def loaded_by(*commands: list[str], cwd: Path | None = None) -> dict[str, str]:
    """Run the commands in one fresh interpreter; which heavy library each first loaded."""
    done = subprocess.run([sys.executable, "-c", LIGHT_RUNNER, json.dumps(list(commands))], cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_help_loads_neither_torch_nor_fastai() -> None:
    from pet_sweep.cli import cli

    commands = [["--help"]] + [[name, "--help"] for name in cli.commands]
    assert len(commands) > 8
    assert loaded_by(*commands) == {}


@pytest.mark.slow
def test_report_export_and_list_load_neither_torch_nor_fastai(finished_study: Path, tmp_path: Path) -> None:
    config = str(finished_study)
    out = loaded_by(["list", "--config", config],
                    ["report", "--config", config, "--out", str(tmp_path / "report"), "--no-mlflow-attach"],
                    ["export", "--config", config, "--output", str(tmp_path / "best.yaml")])
    assert (tmp_path / "report").is_dir() and (tmp_path / "best.yaml").is_file()  # they really ran
    assert out == {}
