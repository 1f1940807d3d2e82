"""`rotaq export` / `rotaq generate` on stage folders: manifest, checks, quantized kernels, clear errors."""

from __future__ import annotations

import json

import shutil
from pathlib import Path

import onnx
import pytest

from rotaq.export.layout import DATA_NAME, GRAPH_NAME, read_layout
from rotaq.export.runtime import OnnxDecoder
from rotaq.export.stage import ExportOptions, run_export
from rotaq.pipeline.artifacts import sha256_file
from rotaq.pipeline.cli import main
from rotaq.pipeline.errors import ArtifactError, RotaqError
from rotaq.pipeline.loading import load_model
from rotaq.quantizers.stage import QuantizeOptions, run_quantize
from rotaq.rotations.stage import RotateOptions, run_rotate
from tests.test_export_families import (
    check_greedy_matches_hf_generate,
    check_left_padding,
    check_prefill_then_decode,
    check_runtime_matches_pytorch,
)


@pytest.fixture(scope="module")
def rotated_folder(tiny_hf_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_rotate(RotateOptions(model=str(tiny_hf_folder), out=tmp_path_factory.mktemp("stage") / "rotated"))


@pytest.fixture(scope="module")
def exported_folder(rotated_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stage") / "onnx"
    assert main(["export", "--model", str(rotated_folder), "--out", str(out)]) == 0
    return out


def test_export_folder_has_checked_graph_tokenizer_and_manifest(exported_folder: Path, rotated_folder: Path) -> None:
    manifest = read_layout(exported_folder).manifest
    names = [entry["name"] for entry in manifest["inputs"]]
    assert names[:4] == ["input_ids", "attention_mask", "past_key_values.0.key", "past_key_values.0.value"]
    assert [entry["name"] for entry in manifest["outputs"]][:2] == ["logits", "present.0.key"]
    assert manifest["inputs"][2]["shape"] == ["batch", manifest["num_kv_heads"], "past_sequence", manifest["head_dim"]]
    assert manifest["source_manifest"]["rotation"]["online"] and manifest["model_source"]["kind"] == "artifact"
    checks = manifest["checks"]
    assert checks["graph_vs_model"]["max_rel_error"] < 1e-5 and checks["ort_vs_torch"]["max_rel_error"] < 1e-4
    assert checks["decode_vs_prefill"]["max_rel_error"] < 1e-4 and manifest["linears"] == {}
    assert {GRAPH_NAME, DATA_NAME, "tokenizer.json"} <= set(manifest["files"])
    assert all(sha256_file(exported_folder / name) == digest for name, digest in manifest["files"].items())
    graph = onnx.load(str(exported_folder / GRAPH_NAME), load_external_data=False)
    assert {opset.domain or "ai.onnx": opset.version for opset in graph.opset_import}["ai.onnx"] >= 21
    assert [dim.dim_param for dim in graph.graph.input[0].type.tensor_type.shape.dim] == ["batch", "sequence"]


def test_exported_rotated_folder_is_faithful(exported_folder: Path, rotated_folder: Path) -> None:
    """The family checks, on the stage's own path: a rotated folder reloaded with its online rotations."""
    model, decoder = load_model(str(rotated_folder)).model, OnnxDecoder(exported_folder)
    check_runtime_matches_pytorch(model, decoder)
    check_prefill_then_decode(decoder)
    check_left_padding(decoder)
    check_greedy_matches_hf_generate(model, decoder)


def test_generate_streams_the_greedy_continuation(exported_folder: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["generate", str(exported_folder), "--prompt", "w5 w6 w7", "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr()
    assert printed.out.startswith("w5 w6 w7 w") and "new tokens" in printed.err


def test_quantized_folder_exports_with_its_integer_kernels(rotated_folder: Path, tmp_path: Path) -> None:
    quantized = run_quantize(QuantizeOptions(model=str(rotated_folder), out=tmp_path / "w4a4", scheme="w4a4",
                                             weights="rtn", progress=False))
    manifest = read_layout(run_export(ExportOptions(model=str(quantized), out=tmp_path / "onnx"))).manifest
    kinds = {path: entry["kind"] for path, entry in manifest["linears"].items()}
    assert kinds.pop("lm_head") == "matmul_nbits"
    assert set(kinds.values()) == {"qdq"} and len(kinds) == 7 * manifest["num_layers"]
    assert manifest["linears"]["lm_head"]["accuracy_level"] == 4  # 8-bit head: int8 activations, fast kernel
    assert manifest["checks"]["quantized_layers_max_rel_error"] < 1e-3
    assert manifest["checks"]["ort_vs_torch"]["top1_agreement"] > 0.9
    graph = onnx.load(str(tmp_path / "onnx" / GRAPH_NAME), load_external_data=False)
    # Per-token 4-bit activations in float ops (Round), 4-bit weights in MatMulNBits, the fused attention.
    assert {"Round", "MatMulNBits", "GroupQueryAttention"} <= {node.op_type for node in graph.graph.node}
    assert manifest["layout"] == "fused"
    # The (untied, rotated) embedding table is stored as its int8 codes, looked up and scaled per row.
    int8_tables = [t for t in graph.graph.initializer if t.data_type == onnx.TensorProto.INT8
                   and list(t.dims) == [manifest["vocab_size"], manifest["hidden_size"]]]
    assert len(int8_tables) == 1
    assert not [t for t in graph.graph.initializer if t.data_type == onnx.TensorProto.FLOAT
                and list(t.dims) == [manifest["vocab_size"], manifest["hidden_size"]]]


def test_bad_inputs_fail_with_one_clear_line(exported_folder: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    not_a_model = tmp_path / "notes"
    not_a_model.mkdir()
    (not_a_model / "readme.txt").write_text("hello")
    assert main(["export", "--model", str(not_a_model), "--out", str(tmp_path / "x")]) == 2
    assert "neither a rotaq folder" in capsys.readouterr().err
    assert main(["generate", str(not_a_model), "--prompt", "w5"]) == 2
    assert "not a rotaq ONNX export" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(exported_folder, broken)
    (broken / GRAPH_NAME).write_bytes(b"not a protobuf")
    with pytest.raises(ArtifactError, match="truncated or replaced"):  # export.json records its size
        OnnxDecoder(broken)
    manifest = json.loads((broken / "export.json").read_text())
    del manifest["file_sizes"], manifest["files"]  # an export.json that records nothing: ONNX Runtime finds it
    (broken / "export.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="ONNX Runtime cannot load"):
        OnnxDecoder(broken)
    assert not (tmp_path / "x").exists()


def test_export_refuses_a_folder_it_did_not_write(rotated_folder: Path, tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(RotaqError, match="refusing to overwrite"):
        run_export(ExportOptions(model=str(rotated_folder), out=tmp_path))
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_generate_runs_through_onnxruntime_genai_like_the_plain_loop(exported_folder: Path) -> None:
    """Greedy tokens are the same on both runtimes; genai's seeded sampling repeats itself."""
    pytest.importorskip("onnxruntime_genai")
    from rotaq.export.generate import SamplingOptions, generate_text

    greedy = SamplingOptions(max_new_tokens=8)
    through_genai = generate_text(exported_folder, "w5 w6 w7", greedy)  # auto: genai is installed
    plain = generate_text(exported_folder, "w5 w6 w7", greedy, runtime="onnxruntime")
    assert through_genai.runtime == "genai" and plain.runtime == "onnxruntime"
    assert through_genai.token_ids == plain.token_ids and through_genai.text == plain.text
    sampled = SamplingOptions(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    first, again = (generate_text(exported_folder, "w5 w6 w7", sampled, runtime="genai") for _ in range(2))
    assert first.token_ids == again.token_ids


def test_generate_through_genai_needs_its_config(exported_folder: Path, tmp_path: Path) -> None:
    from rotaq.export.genai_folder import GENAI_CONFIG
    from rotaq.export.generate import SamplingOptions, generate_text

    copy = tmp_path / "no-genai"
    shutil.copytree(exported_folder, copy)
    (copy / GENAI_CONFIG).unlink()
    with pytest.raises(RotaqError, match="genai_config.json"):
        generate_text(copy, "w5", SamplingOptions(max_new_tokens=2), runtime="genai")
    assert generate_text(copy, "w5", SamplingOptions(max_new_tokens=2)).runtime == "onnxruntime"
