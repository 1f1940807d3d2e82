"""The quantize stage on tiny models: codes agree with the fake-quant model, folders reload, errors are clear."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rotaq.eval.metrics import evaluate
from rotaq.pipeline.artifacts import read_manifest
from rotaq.pipeline.data import DataSpec
from rotaq.pipeline.errors import RotaqError
from rotaq.pipeline.families import family_for_model
from rotaq.pipeline.loading import load_model
from rotaq.quantizers.linear import QuantizedLinear
from rotaq.quantizers.quantize_model import QuantizeSettings, quantize_model
from rotaq.quantizers.rtn import dequantize_codes
from rotaq.quantizers.schemes import parse_scheme
from rotaq.quantizers.stage import CODES_NAME, QuantizeOptions, run_quantize
from rotaq.rotations.rotate import RotationConfig, rotate_model
from rotaq.rotations.stage import RotateOptions, run_rotate
from tests.tiny_models import random_tokens, tiny_model

CALIBRATION = DataSpec(seq_len=32, max_tokens=32 * 8)


@pytest.fixture(scope="module")
def rotated_tiny(tiny_hf_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_rotate(RotateOptions(model=str(tiny_hf_folder), out=tmp_path_factory.mktemp("q") / "rotated"))


@pytest.mark.parametrize("scheme, weights", [("w4a4", "gptq"), ("w8a8", "rtn"), ("w4a16-g16", "gptq"),
                                             ("w4a16-g32", "gptq")])  # 48 and 80 wide: a ragged last group
def test_quantized_folder_codes_match_fake_quant_weights(rotated_tiny: Path, tiny_text_file: Path, tmp_path: Path,
                                                         scheme: str, weights: str) -> None:
    out = run_quantize(QuantizeOptions(model=str(rotated_tiny), out=tmp_path / scheme, scheme=scheme, weights=weights,
                                       ragged_groups=True, calibration=DataSpec(str(tiny_text_file), 32, 256),
                                       progress=False))
    manifest = read_manifest(out)
    section = manifest["quantization"]
    assert section["scheme"]["name"] == scheme and manifest["rotation"]["online"]
    codes = load_file(str(out / CODES_NAME))
    loaded = load_model(str(out))
    state = loaded.model.state_dict()
    for path, spec in section["layers"].items():
        bits = spec["weight_bits"]
        layer_codes = codes[f"{path}.codes"]
        assert layer_codes.min() >= -(2 ** (bits - 1)) and layer_codes.max() <= 2 ** (bits - 1) - 1
        scales = codes[f"{path}.scales"]
        group = spec["group_size"] or layer_codes.shape[1]
        assert scales.shape[1] == -(-layer_codes.shape[1] // group)
        rebuilt = torch.cat([dequantize_codes(part.float(), scales[:, g : g + 1], None)
                             for g, part in enumerate(layer_codes.split(group, dim=1))], dim=1)
        torch.testing.assert_close(rebuilt, state[f"{path}.weight"], rtol=0, atol=1e-6)
    down = loaded.model.model.layers[0].mlp.down_proj
    assert isinstance(down, QuantizedLinear) and down.input_rotation is not None
    assert down.spec.act_bits == parse_scheme(scheme).act_bits


def test_gptq_beats_rtn_on_a_tiny_model() -> None:
    """Same W4A16 scheme, same model: GPTQ's KL to the float model is below RTN's."""
    windows = random_tokens(count=8, length=32, seed=5)
    reference = tiny_model("llama-untied", num_hidden_layers=2)
    results = {}
    for weights in ("rtn", "gptq"):
        model = tiny_model("llama-untied", num_hidden_layers=2)
        family = family_for_model(model)
        rotate_model(model, family, RotationConfig())
        settings = QuantizeSettings(scheme=parse_scheme("w4a16"), weights=weights, progress=False)
        quantize_model(model, family, settings, windows)
        results[weights] = evaluate(model, windows, reference=reference, progress=False).kl_divergence
    assert results["gptq"] < results["rtn"]


def test_quantize_refuses_bad_input(rotated_tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(RotaqError, match="unknown quantization scheme"):
        run_quantize(QuantizeOptions(model=str(rotated_tiny), out=tmp_path / "x", scheme="w3a3", progress=False))
    with pytest.raises(RotaqError, match="does not divide"):
        run_quantize(QuantizeOptions(model=str(rotated_tiny), out=tmp_path / "x", scheme="w4a16", group=7,
                                     weights="rtn", progress=False))
    assert not (tmp_path / "x").exists()
    first = run_quantize(QuantizeOptions(model=str(rotated_tiny), out=tmp_path / "q", scheme="w8a8", weights="rtn",
                                         progress=False))
    with pytest.raises(RotaqError, match="already quantized"):
        run_quantize(QuantizeOptions(model=str(first), out=tmp_path / "y", weights="rtn", progress=False))


@pytest.mark.parametrize("kv_bits", [8, 4])
def test_kv_cache_quantization_is_per_token_and_head_and_exports(rotated_tiny: Path, tmp_path: Path,
                                                                 kv_bits: int) -> None:
    """k_proj / v_proj outputs (the cache) on a per-head int grid; the ONNX graph computes the same."""
    from rotaq.export.layout import read_layout
    from rotaq.export.runtime import OnnxDecoder
    from rotaq.export.stage import ExportOptions, run_export
    from tests.tiny_models import random_tokens

    out = run_quantize(QuantizeOptions(model=str(rotated_tiny), out=tmp_path / "q", scheme="w8a8", weights="rtn",
                                       kv_bits=kv_bits, progress=False))
    loaded = load_model(str(out))
    attention = loaded.model.model.layers[0].self_attn
    assert attention.k_proj.spec.output_bits == kv_bits and attention.q_proj.spec.output_bits is None
    head_dim = attention.k_proj.spec.output_group
    captured = {}
    attention.v_proj.register_forward_hook(lambda module, args, output: captured.setdefault("v", output))
    tokens = random_tokens(2, 12)
    with torch.inference_mode():
        logits = loaded.model(tokens).logits
    heads = captured["v"].unflatten(-1, (-1, head_dim))
    scale = heads.abs().amax(-1, keepdim=True) / (2 ** (kv_bits - 1) - 1)
    codes = heads / torch.where(scale > 0, scale, torch.ones_like(scale))
    assert float((codes - codes.round()).abs().max()) < 1e-3  # every head of every token on its own grid
    without = load_model(str(run_quantize(QuantizeOptions(model=str(rotated_tiny), out=tmp_path / "q0",
                                                          scheme="w8a8", weights="rtn", progress=False)))).model
    with torch.inference_mode():
        assert not torch.allclose(without(tokens).logits, logits)
    exported = run_export(ExportOptions(model=str(out), out=tmp_path / "onnx"))
    assert read_layout(exported).manifest["checks"]["ort_vs_torch"]["top1_agreement"] >= 0.99
    produced = OnnxDecoder(exported).logits(tokens.numpy())
    assert (produced.argmax(-1) == logits.argmax(-1).numpy()).mean() >= 0.99
