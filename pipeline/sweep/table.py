"""The sweep's comparison: one row per (variant, branch) from the variants' own JSON files, the Pareto
fronts of accuracy against decode speed and against size, sweep.csv/json/md and pareto.png.

Nothing is measured here. Accuracy comes from each run's results.json; latency and size from its bench
stages' bench.json (the speed-up is against the float32 graph timed in the same bench run, the number
that stays comparable across variants benchmarked minutes apart); training time from stage markers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rotaq.eval.tables import csv_text, json_records, markdown_table
from rotaq.pipeline.atomic import atomic_write, write_json_atomic
from rotaq.pipeline.report.charts import pareto_front, plot_accuracy_tradeoff, tradeoff_point
from rotaq.pipeline.run.summary import FLOAT_BRANCH, unique_rows

SWEEP_FORMAT = "rotaq-sweep/1"
SWEEP_STEM = "sweep"
PARETO_PNG = "pareto.png"
# (name of the front, column, True when larger is better)
FRONTS = (("latency", "decode_speedup", True), ("size", "file_mb", False))
_METRIC_COLUMNS = ["perplexity", "ppl_vs_source", "kl_divergence", "top1_agreement", "decode_tokens_per_s",
                   "decode_speedup", "prefill_ms", "prefill_speedup", "file_mb", "size_ratio", "peak_rss_mb",
                   "finetune_s", "trainable_parameters", "pareto"]


def mark_pareto(rows: list[dict[str, Any]]) -> None:
    """Set `pareto` to the fronts (latency, size) each row is on: no other row is at least as good on both
    axes and better on one."""
    fronts = {name: [id(row) for row in pareto_front(rows, column, larger)] for name, column, larger in FRONTS}
    for row in rows:
        row["pareto"] = "+".join(name for name, members in fronts.items() if id(row) in members) or None


def plot_pareto(rows: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    """Perplexity against decode speed-up and against file size for every variant's models, the front dashed
    (the run report draws the same picture for one run). None (nothing drawn) when no row has bench numbers."""
    return plot_accuracy_tradeoff([tradeoff_point(row, f"{row['branch']} | {row['variant']}",
                                                  "float" if row["branch"] == FLOAT_BRANCH else "rotaq") for row in rows],
                                  path)


def write_sweep_outputs(out: Path, rows: list[dict[str, Any]], swept: Sequence[str],
                        variants: Sequence[Mapping[str, Any]], title: str) -> dict[str, Path]:
    """sweep.csv, sweep.json (rows plus the variants and their status), sweep.md and pareto.png."""
    rows = unique_rows(rows)
    mark_pareto(rows)
    columns = ["variant", *swept, "branch", "model", *_METRIC_COLUMNS]
    if any("prefill_tokens" in row for row in rows):
        columns.insert(columns.index("prefill_ms"), "prefill_tokens")
    columns = [column for column in columns if any(row.get(column) is not None for row in rows)] or ["variant"]
    paths = {ext: out / f"{SWEEP_STEM}.{ext}" for ext in ("md", "csv", "json")}
    atomic_write(paths["csv"], csv_text(rows, columns))
    write_json_atomic(paths["json"], {"format": SWEEP_FORMAT, "swept": list(swept), "variants": list(variants),
                                      "columns": columns, "rows": json_records(rows, columns)})
    plot = plot_pareto(rows, out / PARETO_PNG)
    lines = [f"# {title}", "",
             f"{len(variants)} variant(s) over {', '.join(swept) or 'nothing'}; one row per variant and branch "
             "(`float` is the variant's last float model). Perplexity, KL and top-1 come from each run's "
             "results.json (KL and top-1 against the float source model); decode and prefill speed-ups are "
             "against the float32 ONNX graph timed in the same bench run. A model that several variants share "
             "(the float model, most often) is listed once, under the first. `pareto` names the fronts a row "
             "is on (lower perplexity with higher decode speed-up, or with smaller files).", "",
             markdown_table(rows, columns)]
    lines += [f"![Pareto fronts]({PARETO_PNG})", ""] if plot else ["No row has bench numbers, so no Pareto plot "
                                                                   "(enable export and bench to draw one).", ""]
    failed = [variant for variant in variants if variant.get("status") == "failed"]
    if failed:
        lines += ["## Failed variants", ""] + [f"- {item['name']}: {item.get('error')}" for item in failed] + [""]
    lines += ["## Variants", ""] + [f"- [{item['name']}](variants/{item['name']}/report.md): {item.get('status')}"
                                    for item in variants] + [""]
    atomic_write(paths["md"], "\n".join(lines))
    if plot:
        paths["png"] = plot
    return paths
