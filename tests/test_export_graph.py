"""The export forward (PyTorch, before any ONNX) against HF for the config variants export supports."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from rotaq.export.checks import graph_prefill_logits, max_relative_error
from rotaq.export.graph_module import DecoderGraph
from rotaq.pipeline.errors import UnsupportedModelError
from rotaq.pipeline.families import family_for_model
from tests.tiny_models import random_tokens, tiny_config, tiny_model


def graph_error(model: torch.nn.Module, length: int = 20) -> float:
    """Relative logit error of the export forward against the HF model on a prefill."""
    tokens = random_tokens(2, length)
    with torch.inference_mode():
        expected = model(input_ids=tokens).logits
    return max_relative_error(graph_prefill_logits(DecoderGraph(model, family_for_model(model)), tokens), expected)


def model_from(config) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
], ids=lambda rope: rope["rope_type"])
def test_scaled_rope_matches_hf(rope: dict) -> None:
    config = tiny_config("llama-untied")
    config.rope_parameters = {"rope_theta": 10000.0, **rope}
    assert graph_error(model_from(config)) < 1e-5


def test_sliding_window_layers_match_hf() -> None:
    """Qwen2 with one full and one sliding layer (window 4 < 20 tokens): each layer gets its own mask."""
    config = tiny_config("qwen2-bias")
    config.use_sliding_window, config.sliding_window = True, 4
    config.layer_types = ["full_attention", "sliding_attention"]
    model = model_from(config)
    assert [layer.sliding_window for layer in DecoderGraph(model, family_for_model(model)).layers] == [None, 4]
    assert graph_error(model) < 1e-5


def test_mistral_global_sliding_window_matches_hf() -> None:
    config = tiny_config("mistral")
    config.sliding_window = 5
    assert graph_error(model_from(config)) < 1e-5


def test_smollm3_nope_layer_matches_hf() -> None:
    model = tiny_model("smollm3", overrides={"no_rope_layers": [1, 0]})  # SmolLM3-3B has one in every 4 layers
    assert model.model.layers[1].self_attn.use_rope == 0
    assert [layer.attn.use_rope for layer in DecoderGraph(model, family_for_model(model)).layers] == [True, False]
    assert graph_error(model) < 1e-5


def test_unsupported_configs_are_refused_by_name() -> None:
    config = tiny_config("llama-untied")
    config.rope_parameters = {"rope_theta": 10000.0, "rope_type": "dynamic", "factor": 2.0}
    model = model_from(config)
    with pytest.raises(UnsupportedModelError, match="'dynamic'"):
        DecoderGraph(model, family_for_model(model))
    model = tiny_model("llama-untied")
    model.config.hidden_act = "gelu"
    with pytest.raises(UnsupportedModelError, match="gelu"):
        DecoderGraph(model, family_for_model(model))
