"""Reading the YAML files a user writes (experiments.yaml, sweeps/*.yaml, best.yaml): the only YAML reader.

Bad syntax, a key given twice, a missing file or a value the pydantic model refuses
becomes a `ConfigError` that names the file, the experiment and the dotted key, and
lists the valid keys where one is unknown.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from pet_sweep.errors import ConfigError, validation_reason

ModelT = TypeVar("ModelT", bound=BaseModel)
_MERGE_TAG = "tag:yaml.org,2002:merge"


def read_yaml(path: Path) -> Any:
    """Read one YAML file; a missing file or bad syntax becomes a ConfigError naming it."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("file not found", file=str(path)) from None
    except OSError as err:
        raise ConfigError(f"cannot read: {err.strerror}", file=str(path)) from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()  # yaml.safe_load's steps, with the check in between
        if node is None:
            return None
        _refuse_duplicate_keys(node, "", path, set())
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"malformed YAML{where}: {problem}", file=str(path)) from None
    finally:
        loader.dispose()


def _refuse_duplicate_keys(node: yaml.Node, path: str, file: Path, seen_nodes: set[int]) -> None:
    """A key given twice in one mapping is an error: PyYAML would silently keep the last one."""
    if id(node) in seen_nodes:  # an alias: checked where its anchor is (and no endless recursion)
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first_line: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            name = path
            if isinstance(key, yaml.ScalarNode):
                name = f"{path}.{key.value}" if path else key.value
                if key.tag != _MERGE_TAG:  # `<<: *defaults` then overriding a key is meant
                    line = key.start_mark.line + 1
                    if (key.tag, key.value) in first_line:
                        raise ConfigError(f"duplicate key {key.value!r} at line {line} (first at line "
                                          f"{first_line[key.tag, key.value]}); a key may appear once in a mapping",
                                          file=str(file), key=name)
                    first_line[key.tag, key.value] = line
            _refuse_duplicate_keys(value, name, file, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicate_keys(item, f"{path}[{i}]", file, seen_nodes)


def _model_in(annotation: Any) -> tuple[Any, bool]:
    """The pydantic model an annotation holds (itself, or inside ``X | None``), and whether it is the
    value type of a mapping (``dict[str, X]``: the next part of a location is a name, not a field)."""
    origin = get_origin(annotation)
    if origin is dict:
        return get_args(annotation)[1], True
    if origin in (Union, types.UnionType):
        return next((a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)), None), False
    return annotation, False


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The valid keys of the model reached by walking `loc` (for 'unknown key' messages)."""
    current: Any = model
    name_next = False
    for part in loc:
        if name_next or isinstance(part, int):  # a mapping's name (an experiment) or a list index
            name_next = False
            continue
        field = current.model_fields.get(part)
        current, name_next = _model_in(getattr(field, "annotation", None))
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
    return list(current.model_fields)


def _config_error(err: ValidationError, file: Path, model: type[BaseModel], section: str | None) -> ConfigError:
    """Pydantic's first error, naming the file, the experiment (the name under `section`) and the key."""
    first = err.errors()[0]
    loc = tuple(first["loc"])
    experiment, rest = None, loc
    if section is not None and len(loc) >= 2 and loc[0] == section:
        experiment, rest = str(loc[1]), loc[2:]
    key = ".".join(str(p) for p in rest if not (isinstance(p, str) and p.startswith("function-")))
    valid = _fields_at(model, loc[:-1]) if first["type"] == "extra_forbidden" else []
    return ConfigError(validation_reason(first, valid), file=str(file), experiment=experiment, key=key or None)


def read_model(path: str | Path, model: type[ModelT], shape: str, *,
               section: str | None = None) -> tuple[ModelT, Path]:
    """Read a YAML file and validate it as `model`; `shape` says what the file must be, and the
    keys under `section` (``experiments``) are named as experiments in errors."""
    path = Path(path).expanduser().resolve()
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"must be {shape}", file=str(path))
    return validate_model(raw, model, path, section=section), path


def validate_model(raw: dict[str, Any], model: type[ModelT], file: str | Path, *,
                   section: str | None = None) -> ModelT:
    """Validate a mapping (read from `file`, or built in Python) as `model`; an error names
    `file`, the experiment and the key, as for a YAML file."""
    try:
        return model(**raw)
    except ValidationError as err:
        raise _config_error(err, Path(file), model, section) from None
    except TypeError as err:
        raise ConfigError(str(err), file=str(file)) from None
