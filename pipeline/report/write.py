"""`report.md` and a self-contained `report.html` for a `rotaq run` folder, from the run's JSON files only.

Read: run.json (configuration, plan, skipped stages), stages/*.json (keys, timings), the stage folders'
manifests (package versions, fine-tuning and merge sections), results.json (accuracy), outliers/*.json
with outliers.png, and every bench stage's bench.json. A section whose file is absent is left out; no
number is computed or typed here that is not in one of those files.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rotaq.pipeline.atomic import atomic_write
from rotaq.pipeline.options import yaml_value
from rotaq.eval.labels import label
from rotaq.pipeline.report.blocks import Block, Figure, Heading, Paragraph, Table, render_markdown
from rotaq.pipeline.report.charts import plot_accuracy_tradeoff, plot_bench, plot_training, tradeoff_point
from rotaq.pipeline.report.html import render_html
from rotaq.pipeline.run.files import REPORT_HTML, REPORT_MARKDOWN, RunFiles
from rotaq.pipeline.run.results import RESULTS_FILE
from rotaq.pipeline.run.stage_cache import MARKERS_FOLDER, read_marker
from rotaq.pipeline.run.summary import run_summary

CHARTS_FOLDER = "report_files"
WORST_LAYERS_SHOWN = 10
TRAINING_LOG_FILE = "training_log.json"  # rotaq.adapters.finetune.TRAINING_LOG_FILE (not imported: it pulls in torch)

_ACCURACY_COLUMNS = ["model", "stage", "scheme", "weights", "perplexity", "kl_divergence", "top1_agreement"]
# (row label, statistic in outliers_summary.json, its worst-layer field or None)
_OUTLIER_STATISTICS = [
    ("max |x| / RMS, worst layer", "max_abs_over_rms", "max_abs_over_rms_layer"),
    ("max |x| / RMS, mean over layers", "mean_max_abs_over_rms", None),
    ("kurtosis, worst layer", "max_kurtosis", "max_kurtosis_layer"),
    ("kurtosis, mean over layers", "mean_kurtosis", None),
    ("max |x|", "max_abs", "max_abs_layer"),
]
_LAYER_COLUMNS = ["layer", "max_abs_over_rms_before", "max_abs_over_rms_after", "kurtosis_before", "kurtosis_after"]


def write_report(run_folder: Path) -> Path:
    """Write report.md and report.html into the run folder; returns the HTML path."""
    run = RunFiles.load(Path(run_folder))
    config = run.record["config"]
    blocks: list[Block] = [
        Paragraph(f"Model {config['model']}, text {config['data']}, windows of {config['seq_len']} tokens; "
                  f"rotaq {run.record['rotaq_version']}."),
        *_summary_section(run), *_accuracy_section(run), *_outlier_section(run), *_adapter_section(run), *_bench_section(run),
        *_stage_section(run), *_configuration_section(run), *_software_section(run),
    ]
    title = f"rotaq run report: {config['model']}"
    atomic_write(run.folder / REPORT_MARKDOWN, render_markdown(title, blocks))
    atomic_write(run.folder / REPORT_HTML, render_html(title, blocks, run.folder))
    return run.folder / REPORT_HTML


def _summary_section(run: RunFiles) -> list[Block]:
    """Each deployable model (the last float model and every quantized one) with its accuracy beside its
    speed and size, as `rotaq run` prints it and a sweep tabulates it."""

    rows, columns = run_summary(run.folder)
    if not rows:
        return []
    blocks: list[Block] = [
        Heading("Summary"),
        Paragraph("Perplexity on held-out text (× source ppl, KL and top-1 agreement: against the float source "
                  "model); decode and prefill speed-ups (×) against the float32 ONNX graph timed in the same bench "
                  "run; size of the exported files. Details in the sections below."),
        Table(rows, columns)]
    chart = f"{CHARTS_FOLDER}/tradeoff.png"
    if plot_accuracy_tradeoff(_tradeoff_points(run, rows), run.folder / chart):
        blocks.append(Figure(chart, "Perplexity against decode speed-up over float32 (left) and against size "
                                    "(right); the dashed line is the Pareto front. A model off the front is beaten "
                                    "on both axes by one on it; the peer's points (when timed) are grey squares."))
    return blocks


def _tradeoff_points(run: RunFiles, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The summary's models, plus the peer's graphs from the bench (scored there on the same text)."""
    points = [tradeoff_point(row, row["branch"], "float" if row["branch"] == "float" else "rotaq") for row in rows]
    entry = run.stage_named("bench")
    for row in (run.json(entry["done_file"]) or []) if entry else []:
        if str(row.get("scheme", "")).startswith("genai"):
            points.append(tradeoff_point(row, row["scheme"], "peer"))
    return points


def _accuracy_section(run: RunFiles) -> list[Block]:
    results = run.json(RESULTS_FILE)
    if not results or not results["rows"]:
        return []
    rows = results["rows"]
    fingerprints = {row.get("windows_sha256") for row in rows}
    same_tokens = (f" Every model was scored on the same windows (sha256 {fingerprints.pop()})."
                   if len(fingerprints) == 1 else "")
    reference = ", ".join(results["reference"]) or "none"
    return [Heading("Accuracy"),
            Paragraph(f"Perplexity on the {results['split']} split of {results['data']}: {rows[0]['tokens']} "
                      f"predicted tokens per model in windows of {rows[0]['seq_len']}. KL divergence "
                      f"KL(reference ‖ model) per token and top-1 agreement are against the float source model "
                      f"({reference}).{same_tokens}"),
            Table(rows, _ACCURACY_COLUMNS)]


def _outlier_section(run: RunFiles) -> list[Block]:
    blocks: list[Block] = []
    for entry in run.stages("outliers"):
        summary = run.json(entry["done_file"])
        if summary is None:
            continue
        before, after = summary["before_summary"], summary["after_summary"]
        statistics = [{"statistic": label, "before": before[key], "after": after[key],
                       "layer before": before[layer] if layer else None, "layer after": after[layer] if layer else None}
                      for label, key, layer in _OUTLIER_STATISTICS]
        blocks += [Heading("Activation outliers before and after rotation"),
                   Paragraph(f"Inputs of the {before['layers']} linear layers on {summary['windows']} calibration "
                             f"windows of {summary['seq_len']} tokens, before ({summary['before']}) and after "
                             "rotation. Peak-to-RMS is 1 for a flat vector; kurtosis is 3 for Gaussian entries."),
                   Table(statistics, ["statistic", "before", "after", "layer before", "layer after"])]
        layers = run.json(f"{entry['output']}/outliers.json") or []
        worst = sorted(layers, key=lambda row: -(row.get("max_abs_over_rms_before") or 0.0))[:WORST_LAYERS_SHOWN]
        if worst:
            blocks += [Paragraph(f"The {len(worst)} layers with the largest peak-to-RMS ratio before rotation "
                                 f"(every layer: {entry['output']}/outliers.md):"),
                       Table(worst, _LAYER_COLUMNS)]
        if (run.folder / entry["output"] / "outliers.png").is_file():
            blocks.append(Figure(f"{entry['output']}/outliers.png", "Per-layer peak-to-RMS ratio and kurtosis"))
    return blocks


def _adapter_section(run: RunFiles) -> list[Block]:
    rows: list[dict[str, Any]] = []
    for entry in run.stages("finetune"):
        adapters = (run.json(entry["done_file"]) or {}).get("adapters") or {}
        training = adapters.get("training") or {}
        rows += _quantities("fine-tuning", {
            "adapter": adapters.get("type"), "rank": adapters.get("rank"), "alpha": adapters.get("alpha"),
            "qat": adapters.get("qat"), "trainable_parameters": adapters.get("trainable_parameters"),
            "lor2c_paths": len(adapters["spans"]) if "spans" in adapters else None,
            "lor2c_changes_at_steps": [c["step"] for c in adapters.get("structure_changes", [])] or None,
            **{k: training.get(k) for k in ("steps", "final_loss", "eval_perplexity_before", "eval_perplexity_after",
                                            "tokens_per_s", "wall_time_s")}})
    figures = []
    for entry in run.stages("finetune"):
        log = run.json(f"{entry['output']}/{TRAINING_LOG_FILE}")
        chart = f"{CHARTS_FOLDER}/training.png"
        if log and plot_training(log, run.folder / chart):
            figures.append(Figure(chart, "Training loss per optimizer step (thin) with its rolling mean (thick), and "
                                         "held-out perplexity where it was measured (red, right axis): a curve that "
                                         "flattens means the schedule was long enough; a rising perplexity means "
                                         "over-fitting."))
    for entry in run.stages("merge"):
        merge = (run.json(entry["done_file"]) or {}).get("merge") or {}
        rows += _quantities("merge", {"method": merge.get("method"), "exact": merge.get("exact"),
                                      "side_paths_kept": merge.get("side_paths"), **(merge.get("error") or {})})
    for entry in run.stages("export"):
        rows += _side_path_cost(entry["name"], (run.json(entry["done_file"]) or {}).get("side_paths"))
    if not rows:
        return []
    return [Heading("Fine-tuning and merge"),
            Paragraph("The merge error compares the merged model with the unmerged adapted one on held-out "
                      "windows (KL and top-1 against the adapted model)."),
            Table(rows, ["step", "quantity", "value"]), *figures]


def _side_path_cost(step: str, side_paths: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """LoR2C side paths in one exported graph: FLOPs per token and their measured share of ORT's kernel time."""
    if not side_paths:
        return []
    profile = side_paths.get("profile") or {}
    phases = [phase for phase in ("prefill", "decode") if phase in profile]
    return _quantities(step, {
        "side_paths": side_paths["count"], "side_path_flops_per_token": side_paths["flops_per_token"],
        "side_path_flops_share": side_paths["flops_share"],
        **{f"side_path_{phase}_ms": profile[phase]["side_path_ms"] for phase in phases},
        **{f"side_path_{phase}_time_share": profile[phase]["share"] for phase in phases}})


def _quantities(step: str, values: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [{"step": step, "quantity": label(name), "value": value} for name, value in values.items() if value is not None]


_LATENCY_COLUMNS = ["model", "runtime", "decode_tokens_per_s", "decode_speedup", "prefill_ms_*", "prefill_speedup_*"]
_FOOTPRINT_COLUMNS = ["model", "runtime", "file_mb", "size_ratio", "peak_rss_mb", "perplexity", "kernels"]
_CHARTED = ["decode_tokens_per_s", "decode_speedup", "prefill_ms_*", "file_mb", "peak_rss_mb"]


def _bench_section(run: RunFiles) -> list[Block]:
    """The run's one bench: every export, PyTorch eager and the peer timed together against one float32 graph."""
    entry = run.stage_named("bench")
    rows = [dict(row) for row in (run.json(entry["done_file"]) or [])] if entry else []
    if not rows:
        return []
    branches = _branch_of_export(run, entry)
    for row in rows:
        row["model"] = branches.get(row["model"], row["model"])
    _fill_perplexity(run, rows)
    latency, footprint, charted = (_present(rows, names) for names in (_LATENCY_COLUMNS, _FOOTPRINT_COLUMNS, _CHARTED))
    labels = [f"{row['model']} ({row['runtime']})" if row.get('runtime') else str(row['model']) for row in rows]
    blocks: list[Block] = [
        Heading("Latency, size and memory"),
        Paragraph("One bench run timed every model below in interleaved rounds, so each ratio (×) is against the "
                  "float32 ONNX graph of the same rounds; medians over the rounds. Perplexity of the graphs "
                  "themselves where the bench scored them, else of the model they were exported from."),
        Table(rows, latency), Table(rows, footprint)]
    if charted:
        chart = f"{CHARTS_FOLDER}/bench.png"
        plot_bench(rows, charted, labels, run.folder / chart, titles={column: label(column) for column in charted})
        blocks.append(Figure(chart, "Each model's bench numbers side by side: longer bars are faster for tok/s and "
                                    "×, slower for ms, larger for MiB."))
    return blocks


def _present(rows: list[dict[str, Any]], names: list[str]) -> list[str]:
    """The named columns the rows have values for, `prefix_*` standing for every prompt length."""
    keys = list(dict.fromkeys(key for row in rows for key in row))
    columns = []
    for name in names:
        matches = [key for key in keys if key.startswith(name[:-1]) and key[len(name) - 1:].isdigit()] \
            if name.endswith("*") else [name]
        columns += [key for key in matches if any(row.get(key) is not None for row in rows)]
    return columns


def _branch_of_export(run: RunFiles, bench: Mapping[str, Any]) -> dict[str, str]:
    """Export folder name (what bench rows are named by) -> its export stage's name (`export-w4a4`), so rows
    read the same in a run folder and in a sweep's store (`export-w4a4-<key>`)."""
    names = {}
    for export_name in bench["inputs"].values():
        export = run.stage_named(export_name)
        if export is not None:
            names[Path(export["output"]).name] = export_name
    return names


def _fill_perplexity(run: RunFiles, rows: list[dict[str, Any]]) -> None:
    """Give each bench row without one the perplexity of the model it was exported from."""
    results = run.json(RESULTS_FILE) or {"rows": []}
    perplexity = {row["model"]: row["perplexity"] for row in results["rows"]}
    for row in rows:
        if row.get("perplexity") is None and run.stage_named(row["model"]) is not None:
            model = _evaluated_upstream(run, row["model"], perplexity)
            row["perplexity"] = perplexity.get(model)


def _evaluated_upstream(run: RunFiles, name: str, evaluated: Mapping[str, Any]) -> str | None:
    """Follow a stage's `model` input up the plan to the first model that was evaluated."""
    while name not in evaluated:
        entry = run.stage_named(name)
        if entry is None or "model" not in entry["inputs"]:
            return None
        name = entry["inputs"]["model"]
    return name


def _stage_section(run: RunFiles) -> list[Block]:
    rows = []
    for entry in run.stages():
        if entry["stage"] == "report":
            continue
        marker = read_marker(run.folder / entry.get("marker", f"{MARKERS_FOLDER}/{entry['name']}.json")) or {}
        finished = marker.get("key") == entry["key"]
        rows.append({"stage": entry["name"], "status": "done" if finished else "not finished",
                     "seconds": marker.get("seconds") if finished else None,
                     "finished": marker.get("finished") if finished else None, "key": entry["key"][:16]})
    rows += [{"stage": skipped["name"], "status": f"skipped ({skipped['reason']})"}
             for skipped in run.record["skipped"]]
    return [Heading("Stages"),
            Paragraph("Each stage is cached under its key: SHA-256 of the stage name, its options, the keys of the "
                      "stages it reads and the rotaq version (stages/<stage>.json). Seconds are those of the run "
                      "that produced the output."),
            Table(rows, ["stage", "status", "seconds", "finished", "key"], {"seconds": ".1f"})]


def _configuration_section(run: RunFiles) -> list[Block]:
    rows = [{"key": key, "value": yaml_value(value)} for key, value in _flatten(run.record["config"])
            if key != "out"]  # the folder this report is in
    return [Heading("Configuration"), Table(rows, ["key", "value"])]


def _flatten(values: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    flat = []
    for key, value in values.items():
        flat += _flatten(value, f"{prefix}{key}.") if isinstance(value, Mapping) else [(f"{prefix}{key}", value)]
    return flat


def _software_section(run: RunFiles) -> list[Block]:
    """Package versions as each stage's manifest recorded them; differing versions get one row each."""
    stages_by_version: dict[tuple[str, str], list[str]] = {}
    reporting = []
    for entry in run.stages():
        manifest = run.json(entry["done_file"]) if entry["done_file"].endswith(".json") else None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("versions"), dict):
            continue
        reporting.append(entry["name"])
        for package, version in manifest["versions"].items():
            stages_by_version.setdefault((package, version), []).append(entry["name"])
    if not reporting:
        return []
    rows = [{"package": package, "version": version,
             "stages": "all" if len(names) == len(reporting) else ", ".join(names)}
            for (package, version), names in stages_by_version.items()]
    return [Heading("Software"), Paragraph(f"From the manifests of {', '.join(reporting)}."),
            Table(rows, ["package", "version", "stages"])]
