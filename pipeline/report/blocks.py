"""The pieces a run report is made of, and their Markdown rendering.

A report is collected once as a list of blocks and rendered twice (Markdown here, HTML in
`rotaq.pipeline.report.html`), so both files always say the same thing with the same digits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rotaq.eval.tables import Format, markdown_table


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Table:
    rows: Sequence[Mapping[str, Any]]
    columns: Sequence[str]
    formats: Mapping[str, Format] = field(default_factory=dict)


@dataclass(frozen=True)
class Figure:
    path: str  # relative to the run folder
    caption: str


Block = Heading | Paragraph | Table | Figure


def render_markdown(title: str, blocks: Sequence[Block]) -> str:
    parts = [f"# {title}"]
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Paragraph):
            parts.append(block.text)
        elif isinstance(block, Table):
            parts.append(markdown_table(block.rows, block.columns, block.formats).rstrip("\n"))
        else:
            parts.append(f"![{block.caption}]({block.path})")
    return "\n\n".join(parts) + "\n"
