"""Plots of activation outliers before and after rotation.

matplotlib is imported inside the plotting function: it costs about a second to import and most
pipeline runs never draw. A bare Figure with an Agg canvas is used instead of pyplot, so nothing
touches global backend state or needs a display.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

from rotaq.eval.outliers import LinearInputStats, outlier_table
from rotaq.pipeline.atomic import atomic_write


def plot_outliers(
    before: list[LinearInputStats],
    after: list[LinearInputStats] | None,
    path: Path,
    title: str,
) -> Path:
    """Draw per-layer peak-to-RMS ratio and kurtosis (log scale), before vs after, to a PNG at `path`.

    The x axis is the layer's position in model order, the same order as the rows of
    `outlier_table(before, after)`, so a spike can be looked up there by row number.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogFormatter

    rows = outlier_table(before, after or [])
    index = list(range(len(rows)))
    width = min(24.0, max(8.0, 6.0 + 0.06 * len(rows)))
    fig = Figure(figsize=(width, 7.5), layout="constrained")
    FigureCanvasAgg(fig)
    peak_ax, kurt_ax = fig.subplots(2, 1, sharex=True)
    sides = [("before", "tab:red")] + ([("after", "tab:blue")] if after is not None else [])
    for side, color in sides:
        for ax, key in ((peak_ax, "max_abs_over_rms"), (kurt_ax, "kurtosis")):
            values = [_float(row[f"{key}_{side}"]) for row in rows]
            ax.plot(index, values, marker=".", markersize=4, linewidth=0.8, color=color, label=_label(side, values, rows))
    kurt_ax.axhline(3.0, color="gray", linestyle="--", linewidth=0.8, label="Gaussian (3)")
    peak_ax.set_ylabel("max |x| / RMS(x), max over tokens")
    kurt_ax.set_ylabel("kurtosis, mean over tokens")
    kurt_ax.set_xlabel("linear layer index (model order)")
    for ax in (peak_ax, kurt_ax):
        ax.set_yscale("log")
        # Plain numbers ("6", "20") read faster than the default "6 x 10^0" on these narrow ranges.
        ax.yaxis.set_major_formatter(LogFormatter())
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    fig.suptitle(title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    atomic_write(Path(path), buffer.getvalue())
    return Path(path)


def _float(value: float | None) -> float:
    """None (layer missing on this side) as NaN, which matplotlib leaves as a gap."""
    return math.nan if value is None else float(value)


def _label(side: str, values: list[float], rows: list[dict]) -> str:
    """Legend entry naming the worst layer, the number people look for first."""
    finite = [(v, i) for i, v in enumerate(values) if math.isfinite(v)]
    if not finite:
        return side
    value, i = max(finite, key=lambda pair: pair[0])  # first layer among ties
    return f"{side} (max {value:.4g} at {rows[i]['layer']})"
