"""The HTML rendering of a run report: one self-contained file, CSS inline and figures embedded as base64 PNG.

Tables wrap their cells instead of growing: a page must fit a 1280-pixel window without scrolling sideways
(checked in headless Chromium by tests/test_report_browser.py)."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

from rotaq.eval.labels import label
from rotaq.eval.tables import cell_format, format_cell, is_numeric_column
from rotaq.pipeline.report.blocks import Block, Figure, Heading, Paragraph, Table

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d1d1f; max-width: 72rem;
       margin: 2rem auto; padding: 0 1rem; line-height: 1.45; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.25rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
p, li, figcaption { overflow-wrap: anywhere; }
table { border-collapse: collapse; margin: 0.75rem 0; font-size: 0.9rem; max-width: 100%; }
th, td { border: 1px solid #d0d0d0; padding: 0.25rem 0.5rem; vertical-align: top; overflow-wrap: break-word; }
th { background: #f4f4f6; text-align: left; font-weight: 600; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1rem 0; } img { max-width: 100%; } figcaption { color: #555; font-size: 0.85rem; }
"""


def render_html(title: str, blocks: Sequence[Block], run_folder: Path) -> str:
    body = [f"<h1>{html.escape(title)}</h1>"] + [_render_block(block, run_folder) for block in blocks]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


def _render_block(block: Block, run_folder: Path) -> str:
    if isinstance(block, Heading):
        return f"<h{block.level}>{html.escape(block.text)}</h{block.level}>"
    if isinstance(block, Paragraph):
        return f"<p>{html.escape(block.text)}</p>"
    if isinstance(block, Table):
        return _render_table(block)
    return _render_figure(block, run_folder)


def _render_table(table: Table) -> str:
    numeric = {column: is_numeric_column(table.rows, column) for column in table.columns}
    header = "".join(f"<th>{html.escape(label(column))}</th>" for column in table.columns)
    lines = [f"<table>\n<thead><tr>{header}</tr></thead>\n<tbody>"]
    for row in table.rows:
        cells = []
        for column in table.columns:
            opening = '<td class="number">' if numeric[column] else "<td>"
            text = format_cell(row.get(column), cell_format(column, table.formats))
            cells.append(f"{opening}{html.escape(text)}</td>")
        lines.append(f"<tr>{''.join(cells)}</tr>")
    lines.append("</tbody>\n</table>")
    return "\n".join(lines)


def _render_figure(figure: Figure, run_folder: Path) -> str:
    encoded = base64.b64encode((run_folder / figure.path).read_bytes()).decode("ascii")
    caption = html.escape(figure.caption)
    return (f"<figure><img alt=\"{caption}\" src=\"data:image/png;base64,{encoded}\">"
            f"<figcaption>{caption}</figcaption></figure>")
