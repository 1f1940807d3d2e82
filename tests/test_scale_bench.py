"""The scale benchmark's harness: each stage's peak memory and status are measured per process, a stage past the
memory limit is stopped and the stages after it are skipped, and the tables are written. No timing is asserted."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from rotaq.eval.scale_bench import GIB, STAGES, run_measured, seven_b_estimates, write_scale_outputs
from rotaq.pipeline.errors import RotaqError


def test_a_process_past_the_limit_is_stopped_and_its_peak_recorded(tmp_path: Path) -> None:
    grow = "import time; x = bytearray(400 * 1024 * 1024); x[::4096] = b'1' * len(x[::4096]); time.sleep(60)"
    measured = run_measured([sys.executable, "-c", grow], int(0.2 * GIB), tmp_path / "grow.log", poll_s=0.05)
    assert measured.status == "stopped over 0.2 GB"
    assert measured.peak_rss_bytes > 0.2 * GIB


def test_status_and_peak_of_a_finished_process(tmp_path: Path) -> None:
    ok = run_measured([sys.executable, "-c", "x = bytearray(64 * 1024 * 1024); x[::4096] = b'1' * len(x[::4096])"],
                      8 * GIB, tmp_path / "ok.log")
    assert ok.status == "ok" and ok.peak_rss_bytes > 64 * 1024 * 1024
    failed = run_measured([sys.executable, "-c", "raise SystemExit(3)"], 8 * GIB, tmp_path / "failed.log")
    assert failed.status == "failed (exit 3)"


def test_tables_and_seven_b_estimate(tmp_path: Path) -> None:
    rows = [{"shape": "a", "layers": 2, "bf16_gb": 1.0, "stage": "rotate", "status": "ok", "wall_s": 4.0,
             "wall_s_per_layer": 2.0, "peak_rss_gb": 3.0, "peak_over_bf16": 3.0},
            {"shape": "b", "layers": 4, "bf16_gb": 2.0, "stage": "rotate", "status": "ok", "wall_s": 8.0,
             "wall_s_per_layer": 2.0, "peak_rss_gb": 5.0, "peak_over_bf16": 2.5},
            {"shape": "b", "layers": 4, "bf16_gb": 2.0, "stage": "quantize-rtn", "status": "stopped over 1.0 GB"}]
    (estimate,) = seven_b_estimates(rows)
    assert estimate["estimated_7b_peak_gb"] == 5.0 + 2.0 * (15.2 - 2.0)  # 2 GB per bf16 GB above 1 GB of overhead
    assert seven_b_estimates(rows[:1])[0]["estimated_7b_peak_gb"] == 3.0 * 15.2
    paths = write_scale_outputs(tmp_path, rows, 1.0)
    saved = json.loads(paths["json"].read_text())
    assert saved["format"] == "rotaq-scale/1" and len(saved["rows"]) == 3
    assert "stopped over 1.0 GB" in paths["md"].read_text()
    assert [stage.name for stage in STAGES][:2] == ["rotate", "quantize-rtn"]


def test_the_tiny_shape_runs_every_stage(tmp_path: Path) -> None:
    """The stage commands the benchmark runs are real ones: a tiny Qwen2-shaped model gets through all four."""
    from rotaq.eval.scale_bench import run_scale_bench

    paths = run_scale_bench(tmp_path, ["tiny"], memory_limit_gb=8.0, progress=lambda line: None)
    rows = json.loads(paths["json"].read_text())["rows"]
    assert [(row["stage"], row["status"]) for row in rows] == [(stage.name, "ok") for stage in STAGES]
    assert all(row["peak_rss_gb"] > 0 and row["bf16_gb"] > 0 for row in rows)
    assert (tmp_path / "tiny" / "export-rtn" / "model.onnx").is_file()


def test_selected_stages_reuse_an_earlier_runs_folders(tmp_path: Path) -> None:
    """--stages export after a full run measures only the export, reading the earlier quantized folder;
    without that folder the export is skipped, not failed."""
    from rotaq.eval.scale_bench import run_scale_bench

    paths = run_scale_bench(tmp_path / "fresh", ["tiny"], memory_limit_gb=8.0, progress=lambda line: None,
                            stages=["export"])
    rows = json.loads(paths["json"].read_text())["rows"]
    assert [(row["stage"], row["status"]) for row in rows] == [("export", "skipped (quantize-rtn did not finish)")]
    run_scale_bench(tmp_path / "reused", ["tiny"], memory_limit_gb=8.0, progress=lambda line: None,
                    stages=["rotate", "quantize-rtn"])
    paths = run_scale_bench(tmp_path / "reused", ["tiny"], memory_limit_gb=8.0, progress=lambda line: None,
                            stages=["export"])
    rows = json.loads(paths["json"].read_text())["rows"]
    # The earlier run's rows stay in the table, in stage order, each with the time it was measured.
    assert [(row["stage"], row["status"]) for row in rows] == [("rotate", "ok"), ("quantize-rtn", "ok"), ("export", "ok")]
    assert all(row["measured"] for row in rows)
    with pytest.raises(RotaqError, match="unknown stage"):
        run_scale_bench(tmp_path, ["tiny"], memory_limit_gb=8.0, stages=["rotat"])
