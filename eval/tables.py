"""Result tables written three ways: Markdown for people, CSV and JSON for tools.

Markdown cells are formatted for reading (floats to 4 significant digits unless `formats` says
otherwise); CSV and JSON keep full precision. Every file is written atomically so an interrupted run
never leaves a half-written table that looks complete.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rotaq.eval.labels import Format, default_format, label
from rotaq.pipeline.atomic import atomic_write
from rotaq.pipeline.errors import RotaqError


def markdown_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    formats: Mapping[str, Format] | None = None,
) -> str:
    """GitHub Markdown table; headers are the metrics' labels (`rotaq.eval.labels`), numeric columns are
    right-aligned and rounded as the labels say unless `formats` says otherwise, missing values blank."""
    columns = _columns(rows, columns)
    formats = formats or {}
    cells = [[_escape(format_cell(row.get(col), cell_format(col, formats))) for col in columns] for row in rows]
    align = ["---:" if is_numeric_column(rows, col) else "---" for col in columns]
    lines = [_md_line([_escape(label(col)) for col in columns]), _md_line(align)]
    lines += [_md_line(line) for line in cells]
    return "\n".join(lines) + "\n"


def write_table(
    rows: Sequence[Mapping[str, Any]],
    path_stem: Path,
    columns: Sequence[str] | None = None,
    formats: Mapping[str, Format] | None = None,
) -> dict[str, Path]:
    """Write `stem.md`, `stem.csv` and `stem.json`; returns their paths keyed by extension."""
    columns = _columns(rows, columns)
    path_stem = Path(path_stem)
    paths = {ext: path_stem.with_name(f"{path_stem.name}.{ext}") for ext in ("md", "csv", "json")}
    atomic_write(paths["md"], markdown_table(rows, columns, formats))
    atomic_write(paths["csv"], csv_text(rows, columns))
    atomic_write(paths["json"], _json_text(rows, columns))
    return paths


def _columns(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None) -> list[str]:
    """Given columns, or every key in first-seen order."""
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    if not columns:
        raise RotaqError("a table needs at least one column (no columns given and no rows to take them from)")
    return list(columns)


def _plain(value: Any) -> Any:
    """numpy and 0-d torch scalars as Python numbers, so they format and serialize like them."""
    return value.item() if hasattr(value, "item") and getattr(value, "ndim", None) == 0 else value


def cell_format(column: str, formats: Mapping[str, Format]) -> Format | None:
    """The table's own format for a column, else the metric's (`rotaq.eval.labels`)."""
    return formats.get(column) or default_format(column)


def format_cell(value: Any, fmt: Format | None) -> str:
    """Cell text for Markdown: explicit format, else a sensible default per type (also when the format does
    not fit the value, e.g. a text in a number column)."""
    value = _plain(value)
    if value is None:
        return ""
    if callable(fmt):
        return fmt(value)
    if fmt is not None and isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return format(value, fmt)
        except ValueError:  # "d" for a float
            pass
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def is_numeric_column(rows: Sequence[Mapping[str, Any]], column: str) -> bool:
    """True when every present value is a number (bools excluded), so the column reads right-aligned."""
    values = [_plain(row.get(column)) for row in rows]
    present = [v for v in values if v is not None]
    return bool(present) and all(isinstance(v, int | float) and not isinstance(v, bool) for v in present)


def _escape(text: str) -> str:
    """Keep a cell on one line and its pipes from splitting the row."""
    return text.replace("|", "\\|").replace("\n", " ")


def _md_line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """CSV with a header row; full-precision numbers, blank for missing."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if (v := _plain(row.get(col))) is None else v for col in columns])
    return buffer.getvalue()


def json_records(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> list[dict[str, Any]]:
    """The rows as JSON-ready objects; NaN/inf become null because JSON has no spelling for them."""
    return [{col: _json_value(row.get(col)) for col in columns} for row in rows]


def _json_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    return json.dumps(json_records(rows, columns), indent=2, allow_nan=False, default=str) + "\n"


def _json_value(value: Any) -> Any:
    value = _plain(value)
    return None if isinstance(value, float) and not math.isfinite(value) else value
