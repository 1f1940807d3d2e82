"""A run's deployable models as rows: the final float model and each quantized one, with accuracy from
results.json, latency and size from the bench stage's bench.json and training time from the stage markers.

The table `rotaq run` prints, the first table of its report and the rows a sweep compares are all these
rows, so they live with the run folder they read rather than in either reader.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rotaq.pipeline.options import yaml_value
from rotaq.pipeline.run.files import RunFiles
from rotaq.pipeline.run.results import RESULTS_FILE
from rotaq.pipeline.run.stage_cache import RUN_RECORD, read_marker

FLOAT_BRANCH = "float"
IDENTITY = "_identity"
BENCH_STAGE = "bench"  # the one bench stage of a run (rotaq.pipeline.run.plan)
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
