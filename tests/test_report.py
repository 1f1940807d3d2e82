"""The run report is written from the run folder's JSON files alone, and leaves out sections with no file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from rotaq.pipeline.report.write import write_report


def write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))


def stage(name: str, kind: str, done_file: str, model: str | None = None) -> dict[str, Any]:
    return {"name": name, "stage": kind, "inputs": {"model": model} if model else {},
            "key": f"{name}-key".ljust(64, "0"), "output": name, "done_file": done_file}


@pytest.fixture
def run_folder(tmp_path: Path) -> Path:
    """A finished run as JSON files only, with numbers no code path could produce by itself."""
    write_json(tmp_path / "run.json", {
        "rotaq_version": "9.9.9",
        "config": {"model": "tiny-model", "data": "corpus.txt", "seq_len": 7, "out": "elsewhere",
                   "quantize": {"schemes": ["w4a4"], "weights": "rtn"}},
        "stages": [stage("merge", "merge", "merge/rotaq.json", "source"),
                   stage("quantize-w4a4", "quantize", "quantize-w4a4/rotaq.json", "merge"),
                   stage("export-w4a4", "export", "export-w4a4/export.json", "quantize-w4a4"),
                   {**stage("bench", "bench", "bench/bench.json"), "inputs": {"model-w4a4": "export-w4a4"}}],
        "skipped": [{"name": "finetune-extra", "stage": "finetune", "reason": "not available: adapters.x"}]})
    write_json(tmp_path / "stages" / "merge.json", {"key": "merge-key".ljust(64, "0"), "seconds": 12.345,
                                                    "finished": "2030-01-02T03:04:05+0000"})
    write_json(tmp_path / "merge" / "rotaq.json", {
        "versions": {"torch": "7.7.7"},
        "merge": {"method": "lstsq", "exact": False, "error": {"max_relative_logit_error": 0.000617}}})
    write_json(tmp_path / "quantize-w4a4" / "rotaq.json", {"versions": {"torch": "7.7.8"}})
    write_json(tmp_path / "results.json", {"split": "evaluation", "data": "corpus.txt", "reference": ["tiny-model"],
                                           "rows": [{"model": "quantize-w4a4", "stage": "quantize", "scheme": "w4a4",
                                                     "perplexity": 31.41592, "kl_divergence": 0.0271828,
                                                     "top1_agreement": 0.8765, "tokens": 606, "seq_len": 7}]})
    write_json(tmp_path / "bench" / "bench.json", [
        {"model": "export-w4a4", "runtime": "onnxruntime", "scheme": "w4a4", "prefill_ms_128": 3.21,
         "decode_tokens_per_s": 87.6, "file_mb": 0.456, "peak_rss_mb": 222.7}])
    return tmp_path


def test_every_number_comes_from_the_run_files(run_folder: Path) -> None:
    write_report(run_folder)
    markdown, page = (run_folder / "report.md").read_text(), (run_folder / "report.html").read_text()
    for text in ("9.9.9", "31.42", "2.72e-02", "87.6%", "606 predicted tokens", "windows of 7", "0.000617",
                 "12.3", "2030-01-02T03:04:05+0000", "3.2", "87.6", "223", "7.7.7", "7.7.8",
                 "skipped (not available: adapters.x)"):
        assert text in markdown, text
        assert text in page, text
    bench_table = markdown.split("## Latency, size and memory")[1].split("\n## ")[0]
    assert "| 31.42 |" in bench_table  # the perplexity of the quantized model the bench row was exported from
    assert "elsewhere" not in markdown  # the configured folder is not where the report is
    assert page.count("data:image/png;base64,") == 2  # the bench chart and the accuracy trade-off
    assert all((run_folder / "report_files" / name).is_file() for name in ("bench.png", "tradeoff.png"))


def test_sections_without_their_json_are_left_out(run_folder: Path) -> None:
    (run_folder / "bench" / "bench.json").unlink()
    (run_folder / "merge" / "rotaq.json").unlink()
    write_report(run_folder)
    markdown = (run_folder / "report.md").read_text()
    assert "## Accuracy" in markdown and "bench | not finished" in markdown
    for absent in ("Latency", "Fine-tuning and merge", "Activation outliers", "report_files"):
        assert absent not in markdown
    assert not (run_folder / "report_files").exists()


def test_side_path_cost_is_reported_from_the_export_manifest(run_folder: Path) -> None:
    write_json(run_folder / "export-w4a4" / "export.json", {"side_paths": {
        "count": 29, "flops_per_token": 531433, "flops_share": 0.00377,
        "profile": {"prefill": {"side_path_ms": 0.4321, "share": 0.0123},
                    "decode": {"side_path_ms": 0.0567, "share": 0.0089}}}})
    write_report(run_folder)
    markdown = (run_folder / "report.md").read_text()
    section = markdown.split("## Fine-tuning and merge")[1].split("\n## ")[0]
    for text in ("side_path_flops_per_token", "531433", "0.00377", "0.4321", "0.0567", "0.0123", "0.0089"):
        assert text in section, text
