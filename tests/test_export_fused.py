"""The fused layout's own pieces: the two-matrix Hadamard, stacked kernels, and what it refuses."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from rotaq.export.emitters import ActQuant, choose_emitter, stacked_emitter
from rotaq.export.fused_graph import build_fused_model, fused_layout_problem, two_factor_hadamard
from rotaq.export.graph_module import DecoderGraph
from rotaq.export.quantized import emitters_for
from rotaq.pipeline.families import family_for_model
from rotaq.quantizers.quantize_model import QuantizeSettings, quantize_model
from rotaq.quantizers.rtn import quantize_weight_rtn
from rotaq.quantizers.schemes import parse_scheme
from rotaq.rotations.hadamard import hadamard_factors
from rotaq.rotations.rotate import RotationConfig, rotate_model
from tests.tiny_models import FUSED_OVERRIDES, tiny_model


@pytest.mark.parametrize("width", [36, 48, 64, 80, 576, 896, 1536, 4864])
def test_two_factor_hadamard_is_the_kronecker_product_of_the_factors(width: int) -> None:
    factors = [f.numpy() for f in hadamard_factors(width)]
    left, right = two_factor_hadamard(factors)
    expected = factors[0]
    for factor in factors[1:]:
        expected = np.kron(expected, factor)
    assert np.array_equal(np.kron(left, right), expected)
    # Balanced where a Sylvester factor allows it: the cost n·(a + b) is at most the given split's.
    given = factors[0].shape[0] + width // factors[0].shape[0]
    assert left.shape[0] + right.shape[0] <= given


@pytest.mark.parametrize("scheme", ["w8a8", "w4a8", "w4a4", "w4a16-g32"])
def test_stacked_kernel_computes_the_layers_side_by_side(scheme: str) -> None:
    settings = parse_scheme(scheme)
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(rows, 64, generator=generator) for rows in (48, 16, 16)]
    act = ActQuant(bits=settings.act_bits, clip_ratio=1.0,
                   block_size=32 if settings.act_bits == 8 else None)
    emitters = [choose_emitter(quantize_weight_rtn(w, settings.weight_bits, settings.weight_group_size, True), act) for w in weights]
    stacked = stacked_emitter(emitters)
    assert stacked is not None and type(stacked) is type(emitters[0])
    x = torch.randn(3, 5, 64, generator=generator)
    expected = torch.cat([emitter.reference(x) for emitter in emitters], dim=-1)
    assert torch.allclose(stacked.reference(x), expected, atol=1e-6, rtol=0)


def test_kernels_with_different_numerics_are_not_stacked() -> None:
    weight = quantize_weight_rtn(torch.randn(16, 64), 4, None, True)
    assert stacked_emitter([choose_emitter(weight, ActQuant(bits=16)),
                            choose_emitter(weight, ActQuant(bits=8, block_size=32))]) is None


def test_fused_layout_names_what_it_cannot_express() -> None:
    narrow = tiny_model("qwen3-qknorm", num_hidden_layers=1)  # head_dim 12
    assert "multiple of 16" in fused_layout_problem(DecoderGraph(narrow, family_for_model(narrow)))
    model = tiny_model("llama-untied", num_hidden_layers=1, overrides=FUSED_OVERRIDES["llama-untied"])
    family = family_for_model(model)
    rotate_model(model, family, RotationConfig(seed=1))
    scheme = dataclasses.replace(parse_scheme("w4a8"), kv_bits=4)
    codes, specs = quantize_model(model, family, QuantizeSettings(scheme=scheme, weights="rtn", progress=False), None)
    graph = DecoderGraph(model, family, emitters_for(codes, specs, model))
    assert "--kv-bits" in fused_layout_problem(graph)


def test_fused_graph_packs_projections_and_fuses_norms() -> None:
    model = tiny_model("llama-untied", num_hidden_layers=2, overrides=FUSED_OVERRIDES["llama-untied"])
    family = family_for_model(model)
    rotate_model(model, family, RotationConfig(seed=1))
    codes, specs = quantize_model(model, family, QuantizeSettings(scheme=parse_scheme("w4a8"), weights="rtn",
                                                                  progress=False), None)
    onnx_model = build_fused_model(DecoderGraph(model, family, emitters_for(codes, specs, model)), 64)
    ops = [node.op_type for node in onnx_model.graph.node]
    assert ops.count("GroupQueryAttention") == 2
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * 2  # every norm after the first
    assert ops.count("MatMulNBits") == 2 * 4 + 1  # qkv, o, gate_up, down per layer, the head
