"""Read a `rotaq run` configuration: a YAML file plus `--set key.path=value` overrides → a validated RunConfig.

Every problem is reported at once, each line starting with its dotted key (`quantize.weights: ...`), so a
file is fixed in one pass. Overrides are parsed as YAML scalars (`8` is an int, `null` is None, `[a, b]` a
list) and applied to the raw mapping before validation, so they are checked exactly like the file.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
import typing
from collections.abc import Mapping, Sequence
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from rotaq.pipeline.errors import RotaqError
from rotaq.pipeline.options import is_setting, key_doc, value_problem, without_none
from rotaq.pipeline.run.config import RunConfig

logger = logging.getLogger(__name__)

_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


class ConfigError(RotaqError):
    """The run configuration (file or --set) names an unknown key or holds a value of the wrong type or range."""


class _InvalidValue(Exception):
    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")


def load_run_config(path: Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """The defaults, updated by the YAML file at `path` (if any), then by each `key.path=value` override."""
    raw = read_run_yaml(Path(path)) if path is not None else {}
    for override in overrides:
        apply_override(raw, *parse_override(override))
    origin = str(path) if path is not None else "the default configuration"
    return config_from_mapping(raw, f"{origin} with --set overrides" if overrides else origin)


INPUT_PATH_KEYS = ("model", "data")
"""Keys whose relative paths, written in a config file, mean the file's folder (a config moved with its model
and text keeps working from any directory). `out` and --set values stay relative to the working directory,
like --out."""


def read_run_yaml(path: Path) -> dict[str, Any]:
    """A run configuration file, its relative input paths resolved against the file's folder."""
    raw = read_yaml_mapping(path)
    for key in INPUT_PATH_KEYS:
        value = raw.get(key)
        if isinstance(value, str) and _is_relative_local_path(value, path.parent):
            raw[key] = str((path.parent / value).resolve())
    return raw


def _is_relative_local_path(value: str, folder: Path) -> bool:
    """`./x`, `../x`, or a relative name that exists beside the file; `default`, absolute paths, `~` and hub
    ids (org/name, not beside the file) are left as written."""
    if value in ("", "default", "shakespeare") or value.startswith(("/", "~")):
        return False
    return value.startswith(("./", "../")) or (folder / value).exists()


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (write a commented default one with `rotaq init`)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path} is not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of keys (model:, quantize:, ...), not {_yaml_type(raw)}")
    return raw


def parse_override(text: str) -> tuple[str, Any]:
    """`quantize.weights=rtn` → ("quantize.weights", "rtn"), the value typed as a YAML scalar or list."""
    dotted, separator, value_text = text.partition("=")
    if not separator or not dotted.strip():
        raise ConfigError(f"--set expects KEY.PATH=VALUE, e.g. quantize.weights=rtn; got {text!r}")
    try:
        value = yaml.safe_load(value_text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {dotted.strip()}: {value_text!r} is not a YAML value ({exc})") from exc
    return dotted.strip(), value


def apply_override(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `dotted` in the nested mapping, creating sections as needed; unknown keys are left to validation."""
    parts = dotted.split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {'.'.join(parts[:depth + 1])} is a single value, not a section")
        node = child
    node[parts[-1]] = value


def config_from_mapping(raw: Mapping[str, Any], origin: str = "the configuration") -> RunConfig:
    """Validate a parsed YAML mapping into a RunConfig, or raise one ConfigError naming every bad key."""
    problems: list[str] = []
    config = _build_section(RunConfig, raw, "", problems)
    if not problems:
        problems = config.window_problems()
    if problems:
        raise ConfigError(f"invalid configuration in {origin}:\n  " + "\n  ".join(problems))
    return config


def key_paths(section_class: type = RunConfig, prefix: str = "", sections: bool = False) -> list[str]:
    """Every valid dotted key in declaration order; with `sections`, the section names too."""
    paths = []
    hints = typing.get_type_hints(section_class)
    for item in fields(section_class):
        path = f"{prefix}{item.name}"
        if not is_dataclass(hints[item.name]):
            paths.append(path)
            continue
        if sections:
            paths.append(path)
        paths += key_paths(hints[item.name], f"{path}.", sections)
    return paths


def suggest_key(unknown: str, valid: Sequence[str]) -> str | None:
    """The key meant by a misplaced or misspelled one: the same name in another section, else the closest spelling."""
    parent, _, name = unknown.rpartition(".")
    same_name = [path for path in valid if path.rpartition(".")[2] == name]
    if same_name:
        return same_name[0]
    siblings = [path for path in valid if path.rpartition(".")[0] == parent]
    for candidates in (siblings, valid):
        matches = difflib.get_close_matches(unknown, candidates, n=1, cutoff=0.6)
        if matches:
            return matches[0]
    return None


def _renamed_keys(raw: Mapping[str, Any], declared: Mapping[str, Any], prefix: str,
                  problems: list[str]) -> Mapping[str, Any]:
    """`raw` with keys under an earlier name (`rotate.kind`) read as today's (`rotate.rotation`), each once noted."""
    renamed = {old: name for name, item in declared.items() if is_setting(item) for old in key_doc(item).old_names}
    if not renamed.keys() & raw.keys():
        return raw
    current: dict[str, Any] = {}
    for name, value in raw.items():
        new = renamed.get(name)
        if new is None:
            current[name] = value
        elif new in raw:
            problems.append(f"{prefix}{name}: an earlier name of {prefix}{new}, which is also given; keep only "
                            f"{prefix}{new}")
        else:
            logger.warning("rotaq: note: %s%s is now called %s%s; it was read as that (rename it to silence this)",
                           prefix, name, prefix, new)
            current[new] = value
    return current


def _build_section(section_class: type, raw: Any, prefix: str, problems: list[str]) -> Any:
    if raw is None:  # a section whose keys are all commented out
        raw = {}
    if not isinstance(raw, Mapping):
        problems.append(f"{prefix.rstrip('.') or 'top level'}: expected a mapping of keys, got {_yaml_type(raw)}")
        return section_class()
    hints = typing.get_type_hints(section_class)
    declared = {item.name: item for item in fields(section_class)}
    raw = _renamed_keys(raw, declared, prefix, problems)
    for name in raw:
        if name not in declared:
            suggestion = suggest_key(f"{prefix}{name}", key_paths(sections=True))
            hint = f"; did you mean {suggestion}?" if suggestion else ""
            problems.append(f"{prefix}{name}: unknown key{hint}")
    values = {}
    for name, item in declared.items():
        if name not in raw:
            continue
        key = f"{prefix}{name}"
        if is_dataclass(hints[name]):
            values[name] = _build_section(hints[name], raw[name], f"{key}.", problems)
            continue
        try:
            value = _convert(raw[name], hints[name], key)
            if (problem := value_problem(value, key_doc(item))) is not None:
                raise _InvalidValue(key, problem)
        except _InvalidValue as exc:
            problems.append(str(exc))
            continue
        values[name] = value
    return section_class(**values)


def _convert(value: Any, annotation: Any, key: str) -> Any:
    """The value as the annotated type (`X | None`, `tuple[X, ...]`, bool, int, float, str), or _InvalidValue."""
    optional, annotation = without_none(annotation)
    if value is None:
        if optional:
            return None
        if typing.get_origin(annotation) is tuple:  # null for a list: an empty one
            return ()
        raise _InvalidValue(key, f"expected {_describe(annotation)}, got null")
    if typing.get_origin(annotation) is tuple:
        item_type = typing.get_args(annotation)[0]
        items = value if isinstance(value, list) else [value]  # one value stands for a one-item list
        return tuple(_convert_scalar(item, item_type, f"{key}[{index}]") for index, item in enumerate(items))
    return _convert_scalar(value, annotation, key)


def _convert_scalar(value: Any, expected: type, key: str) -> Any:
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if (expected is bool and isinstance(value, bool)) or (expected is str and isinstance(value, str)):
        return value
    if expected is int and is_number and isinstance(value, int):
        return value
    if expected is float and is_number:
        return float(value)
    if expected is float and isinstance(value, str):  # YAML 1.1 reads 2e-4 (no dot) as a string
        with contextlib.suppress(ValueError):
            if math.isfinite(number := float(value)):
                return number
    raise _InvalidValue(key, f"expected {_TYPE_NAMES[expected]}, got {value!r} ({_yaml_type(value)})")


def _describe(annotation: Any) -> str:
    if typing.get_origin(annotation) is tuple:
        return f"a list of {_TYPE_NAMES[typing.get_args(annotation)[0]].removeprefix('a ').removeprefix('an ')}s"
    return _TYPE_NAMES[annotation]


def _yaml_type(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "a mapping", type(None): "null"}
    return names.get(type(value), type(value).__name__)
