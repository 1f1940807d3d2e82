"""The layer-by-layer export writes the whole-model export's graph, byte for byte, holding one layer at a time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rotaq.export.stage import ExportOptions, run_export
from rotaq.pipeline.errors import RotaqError
from rotaq.quantizers.stage import QuantizeOptions, run_quantize
from rotaq.rotations.stage import RotateOptions, run_rotate
from tests.tiny_models import FUSED_OVERRIDES, TINY_CONFIGS, save_hf_folder, tiny_model

# One scheme per family, so every kernel the fused graph emits is streamed once.
SCHEMES = {"llama-tied": "w4a8", "llama-untied": "w4a4", "mistral": "float", "qwen2-bias": "w8a8",
           "qwen3-qknorm": "w4a16", "smollm3": "w4a8"}
# Measured per run, or named differently by whose greedy tokens genai is held against.
RUN_FIELDS = ("created", "checks", "export_seconds")


def stage_folder(name: str, scheme: str, tmp_path: Path, layers: int = 3) -> Path:
    """A rotated (and, unless `scheme` is float, RTN-quantized) stage folder of a tiny fused-layout model."""
    source = save_hf_folder(tiny_model(name, num_hidden_layers=layers, overrides=FUSED_OVERRIDES[name]),
                            tmp_path / "source")
    rotated = run_rotate(RotateOptions(model=str(source), out=tmp_path / "rotated", progress=False))
    if scheme == "float":
        return rotated
    return run_quantize(QuantizeOptions(model=str(rotated), out=tmp_path / "quantized", scheme=scheme,
                                        weights="rtn", progress=False))


def export_both_ways(model: Path, out: Path) -> tuple[Path, Path]:
    streamed = run_export(ExportOptions(model=str(model), out=out / "streamed", progress=False))
    whole = run_export(ExportOptions(model=str(model), out=out / "whole", layer_by_layer=False))
    return streamed, whole


def manifest(folder: Path) -> dict:
    return json.loads((folder / "export.json").read_text())


def assert_same_exports(streamed: Path, whole: Path) -> None:
    for name in ("model.onnx", "model.onnx.data", "genai_config.json"):
        assert (streamed / name).read_bytes() == (whole / name).read_bytes(), name
    streamed_manifest, whole_manifest = manifest(streamed), manifest(whole)
    assert streamed_manifest["checks"].pop("layer_by_layer") is True
    assert {key: value for key, value in streamed_manifest.items() if key not in RUN_FIELDS} == \
        {key: value for key, value in whole_manifest.items() if key not in RUN_FIELDS}
    streamed_checks, whole_checks = streamed_manifest["checks"], whole_manifest["checks"]
    streamed_genai, whole_genai = streamed_checks.pop("genai", None), whole_checks.pop("genai", None)
    assert streamed_checks == whole_checks  # the same logits compared in the same order: the same numbers
    if whole_genai is not None:
        assert streamed_genai["greedy_tokens"] == whole_genai["greedy_tokens"]
        assert streamed_genai["onnxruntime_tokens"] == streamed_genai["greedy_tokens"]


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_layer_by_layer_export_equals_the_whole_model_export(name: str, tmp_path: Path) -> None:
    model = stage_folder(name, SCHEMES[name], tmp_path)
    streamed, whole = export_both_ways(model, tmp_path)
    assert_same_exports(streamed, whole)
    assert bool(manifest(streamed)["linears"]) == (SCHEMES[name] != "float")


def test_a_bf16_folder_is_exported_in_float32_the_same_way(tmp_path: Path) -> None:
    model = tiny_model("llama-untied", num_hidden_layers=2, overrides=FUSED_OVERRIDES["llama-untied"])
    source = save_hf_folder(model.to(torch.bfloat16), tmp_path / "source")
    streamed, whole = export_both_ways(source, tmp_path)
    assert_same_exports(streamed, whole)
    assert manifest(streamed)["checks"]["graph_vs_model"]["max_rel_error"] < 1e-5


def test_only_one_decoder_layer_holds_memory_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import rotaq.export.streamed as streamed

    model = stage_folder("qwen3-qknorm", "w4a8", tmp_path, layers=4)
    loaded_counts: list[int] = []
    real_layer = streamed.DecoderLayer

    def watching(source, prefix, family, emitters, traits):
        layers = source_model["model"].model.layers
        loaded_counts.append(sum(not next(layer.parameters()).is_meta for layer in layers))
        return real_layer(source, prefix, family, emitters, traits)

    source_model: dict = {}
    real_skeleton = streamed.streamed_skeleton

    def remembering(weights, family):
        skeleton = real_skeleton(weights, family)
        source_model["model"] = skeleton[0]
        return skeleton

    monkeypatch.setattr(streamed, "DecoderLayer", watching)
    monkeypatch.setattr("rotaq.export.stage.streamed_skeleton", remembering)
    run_export(ExportOptions(model=str(model), out=tmp_path / "export", progress=False))
    assert loaded_counts == [1, 1, 1, 1]


def test_what_cannot_stream_is_exported_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tied head (an unrotated tied model) and the traced layout load the whole model instead."""
    monkeypatch.setattr("rotaq.export.stage.export_streamed", lambda *a, **k: pytest.fail("must not stream"))
    tied = save_hf_folder(tiny_model("llama-tied", overrides=FUSED_OVERRIDES["llama-tied"]), tmp_path / "tied")
    assert "layer_by_layer" not in manifest(run_export(ExportOptions(model=str(tied), out=tmp_path / "a")))["checks"]
    untied = save_hf_folder(tiny_model("llama-untied"), tmp_path / "untied")
    traced = run_export(ExportOptions(model=str(untied), out=tmp_path / "b", layout="traced"))
    assert manifest(traced)["layout"] == "traced"


def test_a_graph_that_departs_from_the_model_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The float check (export forward vs the HF model, < 1e-5) holds in the streamed pass too."""
    import rotaq.export.streamed as streamed

    model = stage_folder("mistral", "float", tmp_path, layers=2)
    real_layer = streamed.DecoderLayer

    def off_by_a_little(*args):
        layer = real_layer(*args)
        norm = layer.post_attention_norm  # shares the HF layer's weight: give it a changed copy of its own
        norm.weight = torch.nn.Parameter(norm.weight.detach() * 1.001, requires_grad=False)
        return layer

    monkeypatch.setattr(streamed, "DecoderLayer", off_by_a_little)
    with pytest.raises(RotaqError, match="export forward vs model"):
        run_export(ExportOptions(model=str(model), out=tmp_path / "export", progress=False))
    assert not (tmp_path / "export").exists()
