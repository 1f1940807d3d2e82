"""`rotaq bench` on tiny exports: every row measured, ratios against the float32 graph, clear errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from rotaq.export.bench import BenchOptions, kernel_summary, run_bench, scheme_label
from rotaq.export.layout import read_layout
from rotaq.export.stage import ExportOptions, run_export
from rotaq.pipeline.cli import main
from rotaq.pipeline.data import DataSpec
from rotaq.pipeline.errors import ArtifactError, RotaqError
from rotaq.quantizers.stage import QuantizeOptions, run_quantize
from rotaq.rotations.stage import RotateOptions, run_rotate


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
    rows = run_bench(_options((exports["w4a8"], exports["fp32"]), tmp_path / "bench", tiny_text_file, genai=False))
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
    rows = run_bench(_options((exports["w4a8"],), out, tiny_text_file, eager=False, perplexity=False, genai=False))
    assert [row["model"] for row in rows] == ["reference-fp32", "w4a8-onnx"]
    assert read_layout(out / "reference-fp32").manifest["model_source"]["path"] == str(
        read_layout(exports["w4a8"]).manifest["model_source"]["origin"]["path"])
    assert "perplexity" not in rows[1]


def test_labels_describe_scheme_and_kernels(exports: dict[str, Path]) -> None:
    assert scheme_label(read_layout(exports["fp32"])) == "fp32 +rot"
    assert kernel_summary(read_layout(exports["fp32"])) == "float MatMul"
    summary = kernel_summary(read_layout(exports["w4a8"]))
    assert summary == "matmul_nbits acc4 ×15"  # 14 decoder linears and the 8-bit lm_head


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
    rows = run_bench(_options((exports["fp32"], exports["w4a8"]), tmp_path / "bench", tiny_text_file, eager=False,
                              peers=("genai",), profile=True))
    peers = {row["model"]: row for row in rows if row["runtime"] == "onnxruntime-genai"}
    assert set(peers) == {"fp32-onnx", "w4a8-onnx", "peer-genai-int4", "peer-genai-int8", "peer-genai-fp32"}
    own = peers.pop("fp32-onnx")  # rotaq's exports through the peer's Generator loop
    assert peers.pop("w4a8-onnx")["decode_vs_peer"] > 0  # against genai int4
    for row in peers.values():
        assert row["decode_tokens_per_s"] > 0 and row["file_mb"] > 0 and row["perplexity"] > 1
        assert row["decode_speedup"] > 0
    for name in ("peer-genai-int4", "peer-genai-int8"):
        assert peers[name]["kl_divergence"] > 0 and 0 < peers[name]["top1_agreement"] <= 1
    # The same float model in the builder's fp32 graph and in rotaq's rotated one: the same function.
    assert abs(peers["peer-genai-fp32"]["perplexity"] / own["perplexity"] - 1) < 1e-3
    plain = next(row for row in rows if row["model"] == "fp32-onnx" and row["runtime"] == "onnxruntime-cpu")
    assert own["perplexity"] == plain["perplexity"] and own["graph_sha256"] == plain["graph_sha256"]
    # "× peer": rotaq's rows against the builder graph at the same weight precision (fp32 here).
    assert own["decode_vs_peer"] > 0 and plain["decode_vs_peer"] > 0 and "decode_vs_peer" not in peers["peer-genai-int4"]
    # --profile: one decode step of rotaq's 4-bit graph and the builder's int4 graph, per operator type.
    profile = (tmp_path / "bench" / "profile.md").read_text()
    assert "w4a8-onnx ms" in profile and "peer-genai-int4 ms" in profile
    assert "| GroupQueryAttention |" in profile and "| MatMulNBits |" in profile
    with pytest.raises(RotaqError, match="unknown peer"):
        _options((exports["fp32"],), tmp_path / "b", tiny_text_file, peers=("vllm",))


def _gate_run(models: tuple[Path, ...], out: Path, *flags: str) -> int:
    return main(["bench", *map(str, models), "--out", str(out), "--no-eager", "--eval-tokens", "0",
                 "--prompt-lengths", "16", "--cached-tokens", "8", "--decode-tokens", "4", "--repeats", "3",
                 "--warmup", "0", "--threads", "1", *flags])


def test_gate_plumbing_baseline_samples_verdict_files_and_identity(exports: dict[str, Path], tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    """What the CLI gate does whatever the machine's speed: the verdict itself is tested on recorded
    samples (tests/test_gate.py) and measured by `make gate-check`, never asserted from a wall clock."""
    import shutil

    from rotaq.export.bench_gate import EXIT_CODES

    baseline = tmp_path / "base.json"
    models = (exports["fp32"], exports["w4a8"])
    assert _gate_run(models, tmp_path / "b0", "--save-baseline", str(baseline)) == 0
    saved = json.loads(baseline.read_text())
    w4a8 = next(row for row in saved["rows"] if row["model"] == "w4a8-onnx")
    assert len(w4a8["round_speedups"]["decode_step"]) == 3 and len(w4a8["samples_seconds"]["prefill_16"]) == 3
    assert len(w4a8["graph_sha256"]) == 64 and saved["reference_sha256"] != w4a8["graph_sha256"]
    capsys.readouterr()

    code = _gate_run(models, tmp_path / "b1", "--baseline", str(baseline), "--max-repeats", "5")
    gate = json.loads((tmp_path / "b1" / "gate.json").read_text())
    assert code == EXIT_CODES[gate["verdict"]] and 3 <= gate["repeats"] <= 5
    assert gate["verdict"] != "inconclusive" or gate["repeats"] == 5  # inconclusive only after every round allowed
    decode = next(row for row in gate["rows"] if row["model"] == "w4a8-onnx" and row["measure"] == "decode_tokens_per_s")
    assert decode["rounds"] == f"{gate['repeats']}/3" and "low" in decode and "high" in decode
    output = capsys.readouterr().out
    assert f"latency gate {gate['verdict'].upper()}" in output and "| low |" in output
    assert (tmp_path / "b1" / "gate.md").is_file()

    # A renamed folder is found by its graph's hash; a baselined model missing from the run fails.
    renamed = tmp_path / "renamed" / "w4a8-renamed"
    shutil.copytree(exports["w4a8"], renamed)
    _gate_run((exports["fp32"], renamed), tmp_path / "b2", "--baseline", str(baseline), "--inconclusive", "pass")
    assert "matched by its hash" in capsys.readouterr().err
    assert _gate_run((exports["fp32"],), tmp_path / "b3", "--baseline", str(baseline)) == 1
    assert "missing from this run" in capsys.readouterr().out


def test_gate_refuses_bad_input_before_timing_anything(exports: dict[str, Path], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "rotaq-bench-baseline/1", "rows": [{"model": "a", "runtime": "r", '
                   '"decode_tokens_per_s": 0}]}')
    models = (exports["fp32"], exports["w4a8"])
    assert _gate_run(models, tmp_path / "b1", "--baseline", str(bad)) == 2
    assert _gate_run(models, tmp_path / "b2", "--baseline", str(bad), "--max-regression", "10") == 2
    errors = capsys.readouterr().err
    assert "is not a positive number" in errors and "max-regression" in errors and "Traceback" not in errors
    assert not (tmp_path / "b1").exists() and not (tmp_path / "b2").exists()  # nothing was timed


def test_bench_and_generate_refuse_a_corrupted_graph(exports: dict[str, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    import shutil

    broken = Path(shutil.copytree(exports["w4a8"], tmp_path / "broken"))
    data = broken / "model.onnx.data"
    payload = bytearray(data.read_bytes())
    payload[len(payload) // 2] ^= 0xFF  # same size: found by the hash
    data.write_bytes(bytes(payload))
    assert _gate_run((exports["fp32"], broken), tmp_path / "b") == 2
    assert "does not match the SHA-256" in capsys.readouterr().err
    assert main(["generate", str(broken), "--prompt", "w3 w4", "--max-new-tokens", "2", "--verify"]) == 2
    assert "does not match the SHA-256" in capsys.readouterr().err
    data.write_bytes(bytes(payload[:-100]))  # truncated: found by the size, without --verify
    assert main(["generate", str(broken), "--prompt", "w3 w4", "--max-new-tokens", "2"]) == 2
    assert "truncated or replaced" in capsys.readouterr().err


def test_bench_writes_only_where_it_may(exports: dict[str, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    users = tmp_path / "reports"
    users.mkdir()
    (users / "bench.md").write_text("my notes")
    assert _gate_run((exports["fp32"],), users) == 2
    assert "holds no earlier bench output" in capsys.readouterr().err
    assert _gate_run((exports["fp32"],), exports["w4a8"]) == 2  # an export folder is not a bench folder
    capsys.readouterr()
    (tmp_path / "rows.json").write_text('{"mine": 1}')
    assert _gate_run((exports["fp32"],), tmp_path / "b", "--json", str(tmp_path / "rows.json")) == 2
    assert "not a rotaq bench --json file" in capsys.readouterr().err
    assert (users / "bench.md").read_text() == "my notes" and (tmp_path / "rows.json").read_text() == '{"mine": 1}'
    assert not (tmp_path / "b").exists()
