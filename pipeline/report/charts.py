"""Charts for the run report: bench bars, the fine-tuning curve, and accuracy against speed and size.

Drawn on a bare Figure with an Agg canvas (as in `rotaq.eval.plots`): no pyplot global state, no display needed.
matplotlib is imported inside each function, since it costs about a second and most callers never draw.
Every chart is at most MAX_WIDTH_PX wide, so it shows unscaled on a 1280-px page.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rotaq.pipeline.atomic import atomic_write

PANELS_PER_ROW = 3
DPI = 110
MAX_WIDTH_PX = 1200
# Bench panels are 4.5 in wide, narrowed only when a full row of them would pass MAX_WIDTH_PX (1188 px here).
_BENCH_PANEL_IN = 4.5
_BENCH_ROW_MAX_IN = 10.8
ACCURACY = "perplexity"
# (point key, x-axis label, True when larger is better) for the two panels of `plot_accuracy_tradeoff`.
TRADEOFF_PANELS = (("decode_speedup", "decode speed-up over float32 (×)", True),
                   ("file_mb", "size (MB)", False))
# kind -> (legend entry, matplotlib scatter style)
_KIND_STYLES: dict[str, tuple[str, dict[str, Any]]] = {
    "rotaq": ("rotaq", {"marker": "o", "color": "tab:blue", "s": 36}),
    "peer": ("peer", {"marker": "s", "color": "tab:gray", "s": 36}),
    "float": ("float", {"marker": "*", "color": "black", "s": 120}),
}
_OTHER_STYLE: dict[str, Any] = {"marker": "D", "color": "tab:purple", "s": 30}


def plot_bench(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str], labels: Sequence[str], path: Path, *,
               titles: Mapping[str, str] | None = None) -> Path:
    """One horizontal bar per row (named by `labels`) in one panel per metric, written as a PNG at `path`.

    `titles` maps a metric key to the panel's title (a human label such as "Decode tok/s"); a metric it
    does not name is titled by its key. The rows share one y axis, so only the first column repeats the
    labels and the panels keep their width.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = min(PANELS_PER_ROW, len(metrics))
    panel_rows = math.ceil(len(metrics) / columns)
    width = min(_BENCH_PANEL_IN * columns, _BENCH_ROW_MAX_IN)
    figure = Figure(figsize=(width, 0.5 * len(rows) * panel_rows + 1.6 * panel_rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(panel_rows, columns, squeeze=False, sharey=True).ravel()
    positions = list(range(len(rows)))
    for ax, metric in zip(axes, metrics, strict=False):
        values = [row.get(metric) for row in rows]
        ax.barh(positions, [math.nan if value is None else value for value in values], color="tab:blue")
        for position, value in zip(positions, values, strict=True):
            if value is not None:
                ax.annotate(f"{value:.4g}", (value, position), xytext=(3, 0), textcoords="offset points",
                            va="center", fontsize="small")
        ax.set_title((titles or {}).get(metric, metric), fontsize="medium")
        ax.margins(x=0.25)
    axes[0].set_yticks(positions, labels)  # shared: once sets every panel
    axes[0].invert_yaxis()  # shared: inverting each panel would flip them back and forth
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    _save(figure, path)
    return path


def plot_training(log: Mapping[str, Any], path: Path) -> Path | None:
    """The fine-tuning loss per optimizer step with a rolling mean, and held-out perplexity on a second
    axis, from a finetune stage's training_log.json: whether training converged, and whether the held-out
    numbers followed the training loss. None (nothing written) when the log has no steps."""
    steps = list(log.get("steps") or [])
    if not steps:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x = [int(record.get("step", index + 1)) for index, record in enumerate(steps)]
    losses = [_float(record.get("loss")) for record in steps]
    figure = Figure(figsize=(8, 4), layout="constrained")
    FigureCanvasAgg(figure)
    loss_ax = figure.subplots()
    loss_ax.plot(x, losses, color="tab:blue", linewidth=0.7, alpha=0.45, label="training loss")
    window = max(1, len(losses) // 20)
    if window > 1:
        loss_ax.plot(x, rolling_mean(losses, window), color="tab:blue", linewidth=1.8,
                     label=f"training loss, mean of {window} steps")
    for number, change in enumerate(log.get("structure_changes") or []):  # merge-lor2c / inject-lor2c
        loss_ax.axvline(change["step"], color="tab:gray", linestyle=":", linewidth=1.0,
                        label=f"{change.get('kind', 'structure')} change" if number == 0 else None)
    loss_ax.set_xlabel("optimizer step")
    loss_ax.set_ylabel("training loss (nats/token)")
    loss_ax.grid(True, alpha=0.3)
    handles, labels = loss_ax.get_legend_handles_labels()
    evaluations = [item for item in log.get("evaluations") or [] if item.get(ACCURACY) is not None]
    if evaluations:
        ppl_ax = loss_ax.twinx()
        values = [float(item[ACCURACY]) for item in evaluations]
        ppl_ax.plot([item["step"] for item in evaluations], values, color="tab:red", marker="o", markersize=5,
                    linestyle="--", linewidth=0.8, label="held-out perplexity")
        ppl_ax.set_ylabel("held-out perplexity", color="tab:red")
        ppl_ax.tick_params(axis="y", colors="tab:red")
        if _wide_range(values):
            _log_y(ppl_ax)
        more_handles, more_labels = ppl_ax.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    loss_ax.legend(handles, labels, loc="upper right", fontsize="small")
    _save(figure, path)
    return path


def tradeoff_point(row: Mapping[str, Any], label: str, kind: str) -> dict[str, Any]:
    """A summary, sweep or bench row as a `plot_accuracy_tradeoff` point."""
    return {"label": label, "kind": kind, **{key: row.get(key) for key in (ACCURACY, "decode_speedup", "file_mb")}}


def plot_accuracy_tradeoff(points: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    """Perplexity against decode speed-up over float32 and against size, one panel each, for one run's
    models (`label`, `perplexity`, `decode_speedup`, `file_mb`, `kind`: rotaq, peer or float), the Pareto
    front dashed: which models are worth shipping and what each one costs in accuracy. A point missing
    a panel's number is left out of that panel, a panel with no points is not drawn; None (nothing
    written) when neither panel has a point."""
    panels = [(key, label, larger, [point for point in points if _has(point, key)])
              for key, label, larger in TRADEOFF_PANELS]
    panels = [panel for panel in panels if panel[3]]
    if not panels:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.25 * len(panels) if len(panels) > 1 else 6.0, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(panels), squeeze=False).ravel()
    for ax, (key, label, larger, shown) in zip(axes, panels, strict=True):
        for kind in dict.fromkeys(str(point.get("kind")) for point in shown):
            name, style = _KIND_STYLES.get(kind, (kind, _OTHER_STYLE))
            chosen = [point for point in shown if str(point.get("kind")) == kind]
            ax.scatter([point[key] for point in chosen], [point[ACCURACY] for point in chosen], label=name,
                       zorder=3, **style)
        front = pareto_front(shown, key, larger)
        if len(front) > 1:
            ax.plot([point[key] for point in front], [point[ACCURACY] for point in front], color="tab:red",
                    linestyle="--", linewidth=1.0, drawstyle="steps-pre" if larger else "steps-post",
                    label="Pareto front", zorder=2)
        ax.set_xlabel(label)
        ax.set_ylabel("perplexity (lower is better)")
        if _wide_range([point[ACCURACY] for point in shown]):
            _log_y(ax)
        ax.margins(x=0.15, y=0.15)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    figure.draw_without_rendering()  # fix the layout, so the labels below can be placed in pixels
    figure.set_layout_engine("none")
    for ax, (key, _, _, shown) in zip(axes, panels, strict=True):
        _annotate_apart(ax, shown, key)
    _save(figure, path)
    return path


def pareto_front(points: Sequence[Mapping[str, Any]], x_key: str, higher_is_better: bool,
                 y_key: str = ACCURACY) -> list[Mapping[str, Any]]:
    """The points no other point dominates (at least as good on `x_key` and on `y_key`, lower `y_key`
    being better, and better on one), in increasing `x_key`. Points missing either number are on no
    front; exact duplicates are both kept, as in `rotaq.pipeline.sweep.table.mark_pareto`."""
    shown = [point for point in points if point.get(x_key) is not None and point.get(y_key) is not None]

    def cost(point: Mapping[str, Any]) -> tuple[float, float]:
        return float(point[y_key]), -float(point[x_key]) if higher_is_better else float(point[x_key])

    front = [point for point in shown
             if not any(cost(other)[0] <= cost(point)[0] and cost(other)[1] <= cost(point)[1]
                        and cost(other) != cost(point) for other in shown)]
    return sorted(front, key=lambda point: (float(point[x_key]), float(point[y_key])))


def rolling_mean(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start), skipping NaNs, so the smoothed
    line starts with the first step instead of `window` steps in."""
    means = []
    for end in range(1, len(values) + 1):
        kept = [value for value in values[max(0, end - window):end] if math.isfinite(value)]
        means.append(sum(kept) / len(kept) if kept else math.nan)
    return means


def _annotate_apart(ax: Any, shown: Sequence[Mapping[str, Any]], key: str) -> None:
    """Label each point, trying a few offsets and keeping the first whose text overlaps no label or point
    placed so far (greedy, in pixels); the last offset when none is free."""
    renderer = ax.figure.canvas.get_renderer()
    offsets = [(5, 4, "left", "bottom"), (5, -4, "left", "top"), (-5, 4, "right", "bottom"),
               (-5, -4, "right", "top"), (0, 9, "center", "bottom"), (0, -9, "center", "top")]
    markers = {}
    for point in shown:
        x, y = ax.transData.transform((point[key], point[ACCURACY]))
        markers[id(point)] = (x - 7, y - 7, x + 7, y + 7)  # about a marker; the offsets clear a point's own
    labels: list[tuple[float, float, float, float]] = []
    for point in sorted(shown, key=lambda item: (item[key], item[ACCURACY])):
        others = labels + [box for owner, box in markers.items() if owner != id(point)]
        for dx, dy, ha, va in offsets:
            text = ax.annotate(str(point.get("label", "")), (point[key], point[ACCURACY]), xytext=(dx, dy),
                               textcoords="offset points", ha=ha, va=va, fontsize="x-small", zorder=4)
            box = text.get_window_extent(renderer)
            if not any(box.x0 < x1 and x0 < box.x1 and box.y0 < y1 and y0 < box.y1 for x0, y0, x1, y1 in others):
                break
            if (dx, dy, ha, va) != offsets[-1]:
                text.remove()
        labels.append((box.x0, box.y0, box.x1, box.y1))


def _has(point: Mapping[str, Any], key: str) -> bool:
    return point.get(key) is not None and point.get(ACCURACY) is not None


def _wide_range(values: Sequence[float]) -> bool:
    """Log scale once the largest value is over 3 times the smallest: a linear axis would flatten the rest."""
    positive = [value for value in values if math.isfinite(value) and value > 0]
    return bool(positive) and max(positive) / min(positive) > 3


def _log_y(ax: Any) -> None:
    from matplotlib.ticker import LogFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(LogFormatter())  # "40", not "4 x 10^1"
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def _float(value: Any) -> float:
    """None (a missing number) as NaN, which matplotlib leaves as a gap."""
    return math.nan if value is None else float(value)


def _save(figure: Any, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    atomic_write(Path(path), buffer.getvalue())
