"""Stage options declared once, on the stage's own Options dataclass.

A field made with `setting()` carries its default, help text and constraints; the stage's command-line
flags (`add_option_flags`), its `rotaq run` config section (`config_section`), `rotaq init`'s template and
the validation of both inputs (`value_problem`) are all generated from it, so a stage option cannot exist in
one place and be missing or differently named in another. Fields without `setting()` are wiring: inputs,
outputs and run-time switches the caller supplies (`--model`, `--out`, the run's data and window length).
A field `name: Cls = field(default_factory=Cls)` whose Cls has settings (the finetune stage's `TrainConfig`)
is flattened: its settings are flags and keys of the outer stage.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

import yaml

from rotaq.pipeline.errors import RotaqError

ChoicesProvider = Callable[[], Sequence[Any]]
ValueCheck = Callable[[Any], "str | None"]


@dataclass(frozen=True)
class KeyDoc:
    """What `rotaq init` and `--help` write about an option, and what validation enforces on its value."""

    help: str
    choices: ChoicesProvider | None = None  # called when a value is checked, so a stage's list is read there
    minimum: float | None = None
    check: ValueCheck | None = None  # returns the problem with a value, or None
    flag: str | None = None  # the CLI flag, when not --field-name (--no-field-name for a True default)
    old_names: tuple[str, ...] = ()  # earlier config key names, still read with a deprecation note


def setting(default: Any, help: str, *, choices: ChoicesProvider | None = None, minimum: float | None = None,
            check: ValueCheck | None = None, flag: str | None = None, old_names: tuple[str, ...] = ()) -> Any:
    """An option: its default plus the documentation and constraints kept in the field's metadata."""
    return field(default=default, metadata={"doc": KeyDoc(help, choices, minimum, check, flag, old_names)})


def key_doc(dataclass_field: dataclasses.Field) -> KeyDoc:
    return dataclass_field.metadata["doc"]


def is_setting(dataclass_field: dataclasses.Field) -> bool:
    return "doc" in dataclass_field.metadata


@dataclass(frozen=True)
class Option:
    """One setting of an Options class, with its resolved type and where it sits (nested classes flattened)."""

    field: dataclasses.Field
    annotation: Any
    owner: type

    @property
    def name(self) -> str:
        return self.field.name

    @property
    def doc(self) -> KeyDoc:
        return key_doc(self.field)

    @property
    def default(self) -> Any:
        return self.field.default

    @property
    def flag(self) -> str:
        dashed = self.name.replace("_", "-")
        if self.doc.flag:
            return self.doc.flag
        return f"--no-{dashed}" if self.annotation is bool and self.default is True else f"--{dashed}"


@functools.cache
def options_of(options_class: type) -> tuple[Option, ...]:
    """Every setting of `options_class`, nested option classes flattened in place, in declaration order."""
    found = tuple(_walk(options_class))
    names = [option.name for option in found]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise TypeError(f"{options_class.__name__}: settings {duplicated} are declared twice (nested classes)")
    return found


def _walk(options_class: type) -> Iterator[Option]:
    hints = typing.get_type_hints(options_class)
    for item in fields(options_class):
        if is_setting(item):
            yield Option(item, hints[item.name], options_class)
        elif (nested := nested_options_class(item)) is not None:
            yield from _walk(nested)


def nested_options_class(item: dataclasses.Field) -> type | None:
    """The options class of a field declared `name: Cls = field(default_factory=Cls)` whose Cls has settings."""
    factory = item.default_factory
    if isinstance(factory, type) and is_dataclass(factory) and any(map(is_setting, fields(factory))):
        return factory
    return None


def build_options(options_class: type, values: Mapping[str, Any], **wiring: Any) -> Any:
    """An Options instance from setting values by name (a missing one keeps its default) plus wiring fields.

    Nested option classes are built from the same flat `values`; a value naming no setting is a bug in the
    caller (a stage option the class does not declare) and raises TypeError."""
    unused = set(values) - {option.name for option in options_of(options_class)}
    if unused:
        raise TypeError(f"{options_class.__name__} has no settings {sorted(unused)}")
    return _build(options_class, values, wiring)


def _build(options_class: type, values: Mapping[str, Any], wiring: Mapping[str, Any]) -> Any:
    kwargs = {}
    for item in fields(options_class):
        if item.name in wiring:
            kwargs[item.name] = wiring[item.name]
        elif is_setting(item):
            if item.name in values:
                kwargs[item.name] = values[item.name]
        elif (nested := nested_options_class(item)) is not None:
            kwargs[item.name] = _build(nested, values, {})
    return options_class(**kwargs)


def value_problem(value: Any, doc: KeyDoc) -> str | None:
    """What is wrong with a typed value under its declared constraints (choices, minimum, check), or None."""
    if value is None:
        return None
    choices = allowed_values(doc)
    for item in value if isinstance(value, tuple) else (value,):
        if choices is not None and item not in choices:
            return f"{item!r} is not one of {', '.join(map(str, choices))}"
        if doc.minimum is not None and item < doc.minimum:
            return f"must be at least {doc.minimum:g}, got {item}"
    return doc.check(value) if doc.check is not None else None


def allowed_values(doc: KeyDoc) -> Sequence[Any] | None:
    if doc.choices is None:
        return None
    try:
        return doc.choices()
    except ImportError:  # the owning stage is not in this codebase: the run reports it as not available
        return None


def yaml_value(value: Any) -> str:
    """One value in YAML flow style, as it would be typed in the file or after --set."""
    plain = list(value) if isinstance(value, tuple) else value
    return yaml.safe_dump([plain], default_flow_style=True, width=10**6).strip()[1:-1]


# -- command-line flags ------------------------------------------------------------------------------------


def add_option_flags(parser: argparse.ArgumentParser, options_class: type) -> None:
    """One flag per setting: `--name VALUE` (a list: comma separated), `--flag` / `--no-flag` for booleans."""
    for option in options_of(options_class):
        optional, base = without_none(option.annotation)
        help_text = f"{option.doc.help} (default {yaml_value(option.default)})"
        if base is bool:
            parser.add_argument(option.flag, dest=option.name, action="store_false" if option.default else
                                "store_true", help=option.doc.help)
        elif typing.get_origin(base) is tuple:
            parser.add_argument(option.flag, dest=option.name, type=_comma_list(typing.get_args(base)[0]),
                                default=option.default, metavar="A,B", help=help_text)
        else:
            parser.add_argument(option.flag, dest=option.name, type=base, default=option.default,
                                metavar=option.name.upper(), help=help_text)


def _comma_list(item_type: type) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        return tuple(item_type(part.strip()) for part in text.split(",") if part.strip())

    parse.__name__ = f"comma-separated {item_type.__name__}s"  # argparse names it in a bad value's error
    return parse


def options_from_args(options_class: type, args: argparse.Namespace, **wiring: Any) -> Any:
    """The Options a command line asks for: every setting's flag checked like its config key, plus wiring."""
    values = {}
    for option in options_of(options_class):
        value = getattr(args, option.name)
        if (problem := value_problem(value, option.doc)) is not None:
            raise RotaqError(f"{option.flag}: {problem}")
        values[option.name] = value
    return build_options(options_class, values, **wiring)


# -- `rotaq run` config sections ---------------------------------------------------------------------------


ExtraKey = tuple[str, Any, Any]
"""A config key of a section that is no stage option: (name, type, setting(...)), e.g. `enabled`."""


def config_section(name: str, doc: str, options_class: type | None, *, module: str,
                   before: Sequence[ExtraKey] = (), after: Sequence[ExtraKey] = (), exclude: Sequence[str] = ()) -> type:
    """A frozen config-section dataclass: `before`, the settings of `options_class` (less `exclude`, with
    their defaults, help and constraints), then `after`."""
    declared = [] if options_class is None else [
        (option.name, option.annotation, option.field) for option in options_of(options_class)
        if option.name not in exclude]
    keys = [*before, *declared, *after]
    section = dataclasses.make_dataclass(
        name, [(key, annotation, _copy_field(item)) for key, annotation, item in keys], frozen=True)
    section.__doc__ = doc
    section.__module__ = module
    return section


def _copy_field(item: Any) -> Any:
    return field(default=item.default, metadata=item.metadata)


def without_none(annotation: Any) -> tuple[bool, Any]:
    """(whether `X | None` allows None, X)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return len(members) < len(typing.get_args(annotation)), members[0]
    return False, annotation
