"""The sweep's comparison: one row per (variant, branch) from the variants' own JSON files, the Pareto
fronts of accuracy against decode speed and against size, sweep.csv/json/md and pareto.png.

Nothing is measured here. Accuracy comes from each run's results.json; latency and size from its bench
stages' bench.json (the speed-up is against the float32 graph timed in the same bench run, the number
that stays comparable across variants benchmarked minutes apart); training time from stage markers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rotaq.eval.tables import csv_text, json_records, markdown_table
from rotaq.pipeline.atomic import atomic_write, write_json_atomic
from rotaq.pipeline.options import yaml_value
from rotaq.pipeline.run_files import RunFiles
from rotaq.pipeline.report_charts import pareto_front, plot_accuracy_tradeoff, tradeoff_point
from rotaq.pipeline.run_results import RESULTS_FILE
from rotaq.pipeline.stage_cache import RUN_RECORD, read_marker

SWEEP_FORMAT = "rotaq-sweep/1"
SWEEP_STEM = "sweep"
PARETO_PNG = "pareto.png"
FLOAT_BRANCH = "float"
IDENTITY = "_identity"
# (name of the front, column, True when larger is better)
FRONTS = (("latency", "decode_speedup", True), ("size", "file_mb", False))
_METRIC_COLUMNS = ["perplexity", "ppl_vs_source", "kl_divergence", "top1_agreement", "decode_tokens_per_s",
                   "decode_speedup", "prefill_ms", "prefill_speedup", "file_mb", "size_ratio", "peak_rss_mb",
                   "finetune_s", "trainable_parameters", "pareto"]
BENCH_STAGE = "bench"  # the one bench stage of a run (rotaq.pipeline.run_plan)
SUMMARY_COLUMNS = ["branch", "model", "perplexity", "ppl_vs_source", "kl_divergence", "top1_agreement",
                   "decode_tokens_per_s", "decode_speedup", "prefill_speedup", "file_mb", "size_ratio"]


def variant_rows(run_folder: Path, variant: str, values: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The final float model and each quantized model of one variant's run, with its bench numbers."""
    if not (run_folder / RUN_RECORD).is_file():
        return []
    run = RunFiles.load(run_folder)
    results = run.json(RESULTS_FILE)
    if not results:
        return []
    evaluated = results["rows"]
    source = next((row for row in evaluated if row["model"] == "source"), None)
    float_rows = [row for row in evaluated if row.get("stage") != "quantize"]
    chosen = [(FLOAT_BRANCH, float_rows[-1])] if float_rows else []
    chosen += [(row["scheme"] or row["model"], row) for row in evaluated if row.get("stage") == "quantize"]
    finetune_seconds = _stage_seconds(run, "finetune")
    trainable = _trainable_parameters(run)
    rows = []
    for branch, evaluation in chosen:
        row: dict[str, Any] = {"variant": variant, **{key: yaml_value(value) for key, value in values.items()},
                               "branch": branch, "model": evaluation["model"]}
        row.update({key: evaluation.get(key) for key in ("perplexity", "kl_divergence", "top1_agreement")})
        if source and source.get("perplexity") and evaluation.get("perplexity") is not None:
            row["ppl_vs_source"] = evaluation["perplexity"] / source["perplexity"]
        row.update(_bench_numbers(run, branch))
        row["finetune_s"] = finetune_seconds
        row["trainable_parameters"] = trainable
        row[IDENTITY] = _identity(run, evaluation["model"], branch)
        rows.append(row)
    return rows


def run_summary(run_folder: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """One run's deployable models (rows) and the summary columns they have values for: the table
    `rotaq run` prints and its report opens with."""
    rows = unique_rows(variant_rows(run_folder, run_folder.name, {}))
    return rows, [column for column in SUMMARY_COLUMNS if any(row.get(column) is not None for row in rows)]


def _identity(run: RunFiles, model: str, branch: str) -> str:
    """The keys of the evaluated model and of its export: equal for the same model reached by two variants (its
    bench numbers are then those of the first variant's bench, whose float32 reference it is or shares)."""
    keys = [(run.stage_named(name) or {}).get("key", name) for name in (model, f"export-{branch}")]
    return "/".join(keys)


def unique_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each model once (the first variant that reached it), without the identity field."""
    seen: set[str] = set()
    kept = []
    for row in rows:
        identity = row.pop(IDENTITY, None)
        if identity is None or identity not in seen:
            kept.append(row)
        if identity is not None:
            seen.add(identity)
    return kept


def _stage_seconds(run: RunFiles, stage: str) -> float | None:
    entry = next(iter(run.stages(stage)), None)
    marker = read_marker(run.folder / entry["marker"]) if entry and "marker" in entry else None
    return marker.get("seconds") if marker and marker.get("key") == entry["key"] else None


def _trainable_parameters(run: RunFiles) -> int | None:
    """Elements of the fine-tune's adapters.safetensors (every trainable tensor once), read from its header."""
    from safetensors import safe_open

    from rotaq.adapters.finetune import ADAPTERS_FILE

    entry = next(iter(run.stages("finetune")), None)
    path = run.folder / entry["output"] / ADAPTERS_FILE if entry else None
    if path is None or not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as tensors:
        return sum(math.prod(tensors.get_slice(name).get_shape()) for name in tensors.keys())


def _bench_numbers(run: RunFiles, branch: str) -> dict[str, Any]:
    """Decode, prefill, size and memory of the branch's exported graph, from the run's bench stage."""
    bench, export = run.stage_named(BENCH_STAGE), run.stage_named(f"export-{branch}")
    if bench is None or export is None:
        return {}
    bench_rows = run.json(bench["done_file"]) or []
    row = next((item for item in bench_rows if item.get("model") == Path(export["output"]).name), None)
    if row is None:
        return {}
    prompt = min((int(key.rsplit("_", 1)[1]) for key in row if key.startswith("prefill_ms_")
                  and key.rsplit("_", 1)[1].isdigit()), default=None)
    numbers = {key: row.get(key) for key in ("decode_tokens_per_s", "decode_speedup", "file_mb", "size_ratio",
                                             "peak_rss_mb")}  # the bench gives its reference ratios of 1 too
    if prompt is not None:
        numbers.update(prefill_tokens=prompt, prefill_ms=row.get(f"prefill_ms_{prompt}"),
                       prefill_speedup=row.get(f"prefill_speedup_{prompt}"))
    return numbers


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
