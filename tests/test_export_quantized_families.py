"""Every scheme on every tiny family, exported with its integer kernels: ONNX Runtime computes what
the PyTorch fake-quant model computes (the issue's whole-model criteria), and the KV cache is exact."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from rotaq.eval.metrics import evaluate_logits_fn
from rotaq.export.checks import check_onnx_file, decode_logits, max_relative_error
from rotaq.export.generate import SamplingOptions, generate_ids
from rotaq.export.graph_module import DecoderGraph
from rotaq.export.quantized import emitters_for
from rotaq.export.runtime import OnnxDecoder
from rotaq.export.stage import write_onnx_folder
from rotaq.pipeline.families import family_for_model
from rotaq.pipeline.loading import LoadedModel
from rotaq.quantizers.quantize_model import QuantizeSettings, quantize_model
from rotaq.quantizers.schemes import parse_scheme
from rotaq.rotations.rotate import RotationConfig, rotate_model
from rotaq.export.fused_graph import FUSED_LAYOUT, TRACED_LAYOUT
from tests.test_export_families import check_genai_generates_like_the_decoder
from tests.tiny_models import FUSED_OVERRIDES, TINY_CONFIGS, random_tokens, tiny_model

# Tiny widths (36-64) are not multiples of 32: w4a16-g32 has a ragged last group.
SCHEMES = ("w8a8", "w4a8", "w4a16-g32", "w4a4")
# The traced layout on the tiny widths as they are; the fused layout (onnxruntime-genai's operators) on
# the same families with the head size GroupQueryAttention needs.
CASES = [(family, scheme, layout) for layout in (FUSED_LAYOUT, TRACED_LAYOUT) for family in sorted(TINY_CONFIGS)
         for scheme in SCHEMES]


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-{s}-{layout}" for f, s, layout in CASES])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    name, scheme_name, layout = request.param
    overrides = FUSED_OVERRIDES[name] if layout == FUSED_LAYOUT else None
    model = tiny_model(name, num_hidden_layers=1, overrides=overrides)
    family = family_for_model(model)
    rotate_model(model, family, RotationConfig(seed=1))
    scheme = dataclasses.replace(parse_scheme(scheme_name), ragged_groups=True)
    codes, specs = quantize_model(model, family, QuantizeSettings(scheme=scheme, weights="rtn", progress=False), None)
    graph = DecoderGraph(model, family, emitters_for(codes, specs, model))
    folder = tmp_path_factory.mktemp(f"onnx-{name}-{scheme_name}")
    manifest = write_onnx_folder(LoadedModel(model, None, family, {"kind": "test"}), graph, folder, layout)
    assert manifest["layout"] == layout, manifest.get("layout_reason")
    return model, OnnxDecoder(folder)


def test_runtime_computes_the_fake_quant_model(exported) -> None:
    """Same argmax on >= 99% of positions and perplexity within 1% (the issue's criteria)."""
    model, decoder = exported
    check_onnx_file(decoder.layout.graph_path)
    tokens = random_tokens(4, 32, seed=11)
    with torch.inference_mode():
        expected = model(input_ids=tokens).logits
    produced = decoder.logits(tokens.numpy())
    agreement = float((produced.argmax(-1) == expected.argmax(-1).numpy()).mean())
    assert agreement >= 0.99
    onnx_ppl = evaluate_logits_fn(decoder.logits, tokens, progress=False).perplexity
    torch_ppl = evaluate_logits_fn(lambda ids: model(input_ids=ids).logits, tokens, progress=False).perplexity
    assert abs(onnx_ppl / torch_ppl - 1) < 0.01


def test_quantized_prefill_then_decode_equals_one_long_prefill(exported) -> None:
    _, decoder = exported
    tokens = random_tokens(2, 16, seed=3).numpy()
    full = decoder.logits(tokens)
    assert max_relative_error(decode_logits(decoder, tokens, steps=5), full[:, -5:]) < _decode_tolerance(decoder)


def _decode_tolerance(decoder: OnnxDecoder) -> float:
    """1e-4; in the fused layout, 8-bit MatMulNBits at accuracy level 4 runs M=1 (decode) and M>1 (prefill)
    through different MLAS int8 paths whose float32 correction term cancels, the 1e-3 bound the
    emitter documents (`MatMulNBitsLinear.check_tolerance`; measured 1.4e-4 on qwen2-bias w8a8)."""
    linears = decoder.layout.manifest["linears"].values()
    eight_bit_level_4 = any(e.get("weight_bits") == 8 and e.get("accuracy_level") == 4 for e in linears)
    return 1e-3 if eight_bit_level_4 and decoder.layout.manifest["layout"] == FUSED_LAYOUT else 1e-4


def test_quantized_greedy_generation_matches_pytorch(exported) -> None:
    model, decoder = exported
    prompt = random_tokens(1, 6, seed=7)
    with torch.inference_mode():
        expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10,
                                  do_sample=False, pad_token_id=0)[0, prompt.shape[1]:].tolist()
    produced = list(generate_ids(decoder, prompt[0].tolist(), SamplingOptions(max_new_tokens=10)))
    assert produced == expected


def test_quantized_graph_runs_in_onnxruntime_genai(exported) -> None:
    """genai opens the folder and its greedy tokens are the ONNX Runtime loop's (per-layer numerics are
    checked against PyTorch above)."""
    model, decoder = exported
    check_genai_generates_like_the_decoder(model, decoder)
