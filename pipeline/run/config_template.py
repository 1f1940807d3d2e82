"""The commented default configuration (`rotaq init`) and the key list of `rotaq run --help`.

Both are generated from the declarations in `rotaq.pipeline.run.config`, so every key is documented and the
written defaults are exactly the defaults the code uses (a test reads the file back and compares).
"""

from __future__ import annotations

import textwrap
import typing
from dataclasses import fields, is_dataclass
from typing import Any

from rotaq.pipeline.options import key_doc, yaml_value
from rotaq.pipeline.run.config import RunConfig

COMMENT_WIDTH = 100

_HEADER = """\
# rotaq run configuration: `rotaq run --config THIS_FILE [--out DIR] [--set key.path=value ...]`.
# Every key is optional (a missing key keeps the default shown here). The stages run in the order
# rotate -> finetune -> merge -> quantize (one branch per scheme) -> export -> bench, then every model
# is evaluated and report.md / report.html are written. A finished stage is reused while its options
# and the stages it reads are unchanged.
"""


def render_default_config() -> str:
    """The default RunConfig as YAML, each key preceded by its help and each section by its purpose."""
    return _HEADER + "\n" + "\n".join(_section_lines(RunConfig(), indent="")) + "\n"


def describe_keys() -> str:
    """`key (default): help` for every key, for `rotaq run --help`."""
    lines = []
    for path, default, doc in _flat_keys(RunConfig(), ""):
        lines.append(f"  {path} ({yaml_value(default)})")
        lines += textwrap.wrap(doc, COMMENT_WIDTH, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


def _section_lines(section: Any, indent: str) -> list[str]:
    lines = []
    hints = typing.get_type_hints(type(section))
    for item in fields(section):
        value = getattr(section, item.name)
        if is_dataclass(hints[item.name]):
            purpose = textwrap.wrap(" ".join((type(value).__doc__ or "").split()), COMMENT_WIDTH - len(indent),
                                    initial_indent=f"{indent}# ", subsequent_indent=f"{indent}#   ")
            lines += ["", *purpose, f"{indent}{item.name}:"]
            lines += _section_lines(value, indent + "  ")
            continue
        lines += textwrap.wrap(key_doc(item).help, COMMENT_WIDTH - len(indent),
                               initial_indent=f"{indent}# ", subsequent_indent=f"{indent}#   ")
        lines.append(f"{indent}{item.name}: {yaml_value(value)}")
    return lines


def _flat_keys(section: Any, prefix: str) -> list[tuple[str, Any, str]]:
    keys = []
    for item in fields(section):
        value = getattr(section, item.name)
        if is_dataclass(value):
            keys += _flat_keys(value, f"{prefix}{item.name}.")
        else:
            keys.append((f"{prefix}{item.name}", value, key_doc(item).help))
    return keys
