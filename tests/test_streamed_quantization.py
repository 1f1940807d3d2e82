"""The layer-by-layer quantization writes the whole-model quantization's files, holding one layer at a time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rotaq.pipeline.data import DataSpec
from rotaq.quantizers.stage import QuantizeOptions, run_quantize
from rotaq.rotations.stage import RotateOptions, run_rotate
from tests.tiny_models import TINY_CONFIGS, save_hf_folder, tiny_model


def quantize_both_ways(source: Path, out: Path, **options: object) -> tuple[Path, Path]:
    streamed = run_quantize(QuantizeOptions(model=str(source), out=out / "streamed", progress=False, **options))
    whole = run_quantize(QuantizeOptions(model=str(source), out=out / "whole", layer_by_layer=False, progress=False,
                                         **options))
    return streamed, whole


def assert_same_folders(streamed: Path, whole: Path) -> None:
    for name in ("model.safetensors", "quantized.safetensors"):
        assert (streamed / name).read_bytes() == (whole / name).read_bytes(), name
    assert json.loads((streamed / "config.json").read_text()) == json.loads((whole / "config.json").read_text())
    streamed_section = json.loads((streamed / "rotaq.json").read_text())["quantization"]
    whole_section = json.loads((whole / "rotaq.json").read_text())["quantization"]
    streamed_section.pop("seconds"), whole_section.pop("seconds")
    assert streamed_section == whole_section


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
@pytest.mark.parametrize("scheme,weights", [("w4a8", "rtn"), ("w4a4", "gptq")])
def test_layer_by_layer_files_equal_the_whole_model_files(name: str, scheme: str, weights: str, tmp_path: Path,
                                                          tiny_text_file: Path) -> None:
    source = save_hf_folder(tiny_model(name, num_hidden_layers=3), tmp_path / "source")
    rotated = run_rotate(RotateOptions(model=str(source), out=tmp_path / "rotated", progress=False))
    calibration = DataSpec(str(tiny_text_file), 32, 128)
    streamed, whole = quantize_both_ways(rotated, tmp_path, scheme=scheme, weights=weights, calibration=calibration)
    assert_same_folders(streamed, whole)


def test_a_grouped_kv_quantized_scheme_too(tmp_path: Path, tiny_text_file: Path) -> None:
    source = save_hf_folder(tiny_model("qwen3-qknorm", num_hidden_layers=2), tmp_path / "source")
    rotated = run_rotate(RotateOptions(model=str(source), out=tmp_path / "rotated", progress=False))
    streamed, whole = quantize_both_ways(rotated, tmp_path, scheme="w4a16-g16", weights="gptq", kv_bits=8,
                                         calibration=DataSpec(str(tiny_text_file), 32, 128))
    assert_same_folders(streamed, whole)


def test_a_tied_unrotated_model_is_quantized_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import rotaq.quantizers.stage as stage

    monkeypatch.setattr(stage, "quantize_streamed", lambda *a, **k: pytest.fail("a tied head is shared"))
    source = save_hf_folder(tiny_model("llama-tied"), tmp_path / "source")
    out = run_quantize(QuantizeOptions(model=str(source), out=tmp_path / "q", scheme="w8a8", weights="rtn",
                                       progress=False))
    assert (out / "quantized.safetensors").is_file()


def test_only_one_decoder_layer_holds_memory_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       tiny_text_file: Path) -> None:
    import rotaq.quantizers.streamed as streamed

    source = save_hf_folder(tiny_model("llama-untied", num_hidden_layers=4), tmp_path / "source")
    rotated = run_rotate(RotateOptions(model=str(source), out=tmp_path / "rotated", progress=False))
    loaded_counts: list[int] = []
    real_quantize_layer = streamed._quantize_layer

    def watching(layer, index, *args, **kwargs):
        layers = list(layer_owner.model.model.layers)
        loaded_counts.append(sum(not next(other.parameters()).is_meta for other in layers))
        return real_quantize_layer(layer, index, *args, **kwargs)

    class layer_owner:  # noqa: N801 - a holder for the model the stage builds
        model = None

    real_streamable = streamed.streamable_model

    def remembering(*args, **kwargs):
        layer_owner.model = real_streamable(*args, **kwargs)
        return layer_owner.model

    import rotaq.quantizers.stage as stage

    monkeypatch.setattr(streamed, "_quantize_layer", watching)
    monkeypatch.setattr(stage, "streamable_model", remembering)
    run_quantize(QuantizeOptions(model=str(rotated), out=tmp_path / "q", scheme="w4a8", weights="gptq",
                                 calibration=DataSpec(str(tiny_text_file), 32, 128), progress=False))
    assert loaded_counts == [1, 1, 1, 1]
