"""`rotaq bench` on tiny exports: every row measured, ratios against the float32 graph, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from export.bench import BenchOptions, kernel_summary, run_bench, scheme_label
from export.layout import read_layout
from export.stage import ExportOptions, run_export
from pipeline.cli import main
from pipeline.data import DataSpec
from pipeline.errors import ArtifactError, RotaqError
from quantizers.stage import QuantizeOptions, run_quantize
from rotations.stage import RotateOptions, run_rotate


@pytest.fixture(scope="module")
def exports(tiny_hf_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bench")
    rotated = run_rotate(RotateOptions(model=str(tiny_hf_folder), out=root / "rotated"))
    quantized = run_quantize(QuantizeOptions(model=str(rotated), out=root / "w4a8", scheme="w4a8", weights="rtn"))
    return {"fp32": run_export(ExportOptions(model=str(rotated), out=root / "fp32-onnx")),
            "w4a8": run_export(ExportOptions(model=str(quantized), out=root / "w4a8-onnx"))}


def _options(models: tuple[Path, ...], out: Path, text: Path, **overrides) -> BenchOptions:
    values = dict(models=tuple(str(m) for m in models), out=out, prompt_lengths=(8, 16), cached_tokens=8,
                  decode_tokens=3, threads=1, repeats=2, warmup=0, progress=False,
                  evaluation=DataSpec(source=str(text), seq_len=16, max_tokens=64))
    return BenchOptions(**{**values, **overrides})


def test_bench_times_and_scores_every_target(exports: dict[str, Path], tiny_text_file: Path, tmp_path: Path) -> None:
    rows = run_bench(_options((exports["w4a8"], exports["fp32"]), tmp_path / "bench", tiny_text_file))
    by_runtime = {(row["model"], row["runtime"]): row for row in rows}
    assert list(by_runtime) == [("fp32-onnx", "onnxruntime-cpu"), ("fp32-onnx", "pytorch-eager"),
                                ("w4a8-onnx", "onnxruntime-cpu")]
    reference, eager, quantized = rows
    for row in rows:
        assert row["prefill_ms_8"] > 0 and row["prefill_ms_16"] > 0 and row["decode_tokens_per_s"] > 0
        assert row["peak_rss_mb"] >= row["baseline_rss_mb"] > 0
    assert reference["decode_speedup"] == 1.0 and reference["size_ratio"] == 1.0
    assert reference["kl_divergence"] == 0.0 and reference["perplexity"] > 1
    # The quantized graph is scored against the float graph on the same held-out windows.
    assert quantized["kl_divergence"] > 0 and 0 < quantized["top1_agreement"] <= 1
    assert quantized["size_ratio"] < 1 and quantized["scheme"] == "w4a8 rtn +rot"
    assert "matmul_nbits acc4" in quantized["kernels"] and "perplexity" not in eager
    written = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert [row["model"] for row in written] == ["fp32-onnx", "fp32-onnx", "w4a8-onnx"]
    meta = json.loads((tmp_path / "bench" / "bench_meta.json").read_text())
    assert meta["repeats"] == 2 and meta["notes"]["cuda"].startswith("skipped")
    assert "Medians of 2 interleaved repeats" in (tmp_path / "bench" / "bench.md").read_text()


def test_bench_exports_the_float_parent_when_no_reference_is_given(
        exports: dict[str, Path], tiny_text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    rows = run_bench(_options((exports["w4a8"],), out, tiny_text_file, eager=False, perplexity=False))
    assert [row["model"] for row in rows] == ["reference-fp32", "w4a8-onnx"]
    assert read_layout(out / "reference-fp32").manifest["model_source"]["path"] == str(
        read_layout(exports["w4a8"]).manifest["model_source"]["origin"]["path"])
    assert "perplexity" not in rows[1]


def test_labels_describe_scheme_and_kernels(exports: dict[str, Path]) -> None:
    assert scheme_label(read_layout(exports["fp32"])) == "fp32 +rot"
    assert kernel_summary(read_layout(exports["fp32"])) == "float MatMul"
    summary = kernel_summary(read_layout(exports["w4a8"]))
    assert summary.startswith("matmul_nbits acc4 ×") and "matmul_nbits acc0 ×1" in summary  # lm_head at 8 bits


def test_bench_rejects_what_it_cannot_time(exports: dict[str, Path], tmp_path: Path, tiny_hf_folder: Path) -> None:
    with pytest.raises(ArtifactError, match="not a rotaq ONNX export"):
        run_bench(BenchOptions(models=(str(tiny_hf_folder),), out=tmp_path / "b"))
    with pytest.raises(RotaqError, match="is quantized; give a float32 export"):
        run_bench(BenchOptions(models=(str(exports["fp32"]),), out=tmp_path / "b", reference=str(exports["w4a8"])))
    with pytest.raises(RotaqError, match="at least one"):
        BenchOptions(models=(), out=tmp_path / "b")
    assert main(["bench", str(tmp_path / "missing"), "--out", str(tmp_path / "b")]) != 0


def test_bench_builds_and_times_the_genai_peer(exports: dict[str, Path], tiny_text_file: Path, tmp_path: Path) -> None:
    """The peer's graphs come from the same float model (the rotated lineage's origin) and are
    timed and scored in the same run as rotaq's."""
    pytest.importorskip("onnxruntime_genai")
    rows = run_bench(_options((exports["fp32"],), tmp_path / "bench", tiny_text_file, eager=False, peers=("genai",)))
    peers = {row["model"]: row for row in rows if row["runtime"] == "onnxruntime-genai"}
    assert set(peers) == {"peer-genai-int4", "peer-genai-int8"}
    for row in peers.values():
        assert row["decode_tokens_per_s"] > 0 and row["file_mb"] > 0 and row["perplexity"] > 1
        assert row["kl_divergence"] > 0 and 0 < row["top1_agreement"] <= 1 and row["decode_speedup"] > 0
    with pytest.raises(RotaqError, match="unknown peer"):
        _options((exports["fp32"],), tmp_path / "b", tiny_text_file, peers=("vllm",))
