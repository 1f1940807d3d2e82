"""Bar charts of the bench results, one panel per metric, for the run report.

Drawn on a bare Figure with an Agg canvas (as in `eval.plots`): no pyplot global state, no display needed.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_write

PANELS_PER_ROW = 3


def plot_bench(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str], labels: Sequence[str], path: Path) -> Path:
    """One horizontal bar per row (named by `labels`) in one panel per metric, written as a PNG at `path`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = min(PANELS_PER_ROW, len(metrics))
    panel_rows = math.ceil(len(metrics) / columns)
    figure = Figure(figsize=(4.5 * columns, 0.5 * len(rows) * panel_rows + 1.6 * panel_rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(panel_rows, columns, squeeze=False).ravel()
    positions = list(range(len(rows)))
    for ax, metric in zip(axes, metrics, strict=False):
        values = [row.get(metric) for row in rows]
        ax.barh(positions, [math.nan if value is None else value for value in values], color="tab:blue")
        for position, value in zip(positions, values, strict=True):
            if value is not None:
                ax.annotate(f"{value:.4g}", (value, position), xytext=(3, 0), textcoords="offset points",
                            va="center", fontsize="small")
        ax.set_yticks(positions, labels)
        ax.invert_yaxis()
        ax.set_title(metric, fontsize="medium")
        ax.margins(x=0.25)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    atomic_write(path, buffer.getvalue())
    return path
