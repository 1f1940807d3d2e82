"""The rotation keeps every supported family's float32 logits (relative error < 1e-4)."""

from __future__ import annotations

import copy

import pytest
import torch

from rotaq.pipeline.errors import NoHadamardError, RotaqError
from rotaq.pipeline.families import family_for_model, layer_linears
from rotaq.quantizers.schemes import parse_scheme
from rotaq.rotations.learn_stage import start_rotations
from rotaq.rotations.learned import LearnSettings, learn_rotations
from rotaq.rotations.online import OnlineRotatedLinear
from rotaq.rotations.rotate import (
    RotationConfig,
    RotationMatrices,
    fold_all_norms,
    online_rotation_specs,
    rotate_model,
    untie_word_embeddings,
)
from rotaq.rotations.stage import max_relative_error
from tests.tiny_models import TINY_CONFIGS, random_tokens, tiny_model

TOLERANCE = 1e-4


def logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=tokens).logits


def learned_matrices(model: torch.nn.Module, config: RotationConfig, learn_heads: bool = True) -> RotationMatrices:
    """A few W4A4 learning steps from the fixed rotation; the result must have moved away from it."""
    family = family_for_model(model)
    start = start_rotations(model, family, config.seed, learn_heads)
    settings = LearnSettings(parse_scheme("w4a4"), steps=3, lr=0.3, learn_heads=learn_heads, progress=False)
    learned = learn_rotations(model, family, random_tokens(4, 16, seed=5), settings, start,
                              online_rotation_specs(model, family, config)).matrices
    assert not torch.allclose(learned.residual, start.residual, atol=1e-3)
    if learn_heads:
        assert not torch.allclose(learned.heads[0], start.heads[0], atol=1e-4)
    return learned


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("kind", ["hadamard", "random", "learned", "learned-r1"])
def test_rotation_keeps_logits(name: str, kind: str) -> None:
    model = tiny_model(name)
    tokens = random_tokens()
    expected = logits(model, tokens)
    family = family_for_model(model)
    config = RotationConfig(kind=kind.removesuffix("-r1"), seed=3)
    matrices = learned_matrices(model, config, learn_heads=kind == "learned") if kind.startswith("learned") else None
    section = rotate_model(model, family, config, matrices)
    assert max_relative_error(logits(model, tokens), expected) < TOLERANCE
    assert section.get("head_rotations", False) == (kind == "learned")
    assert len(section["online"]) == 2 * model.config.num_hidden_layers
    for layer in model.model.layers:
        linears = layer_linears(layer, family)
        assert isinstance(linears[family.mlp_output], OnlineRotatedLinear)
        assert isinstance(linears[family.attention_output], OnlineRotatedLinear)


@pytest.mark.parametrize("name", ["llama-tied", "qwen2-bias"])
def test_norm_folding_alone_keeps_logits_and_unties(name: str) -> None:
    model = tiny_model(name)
    tokens = random_tokens()
    expected = logits(model, tokens)
    family = family_for_model(model)
    untie_word_embeddings(model, family)
    fold_all_norms(model, family)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert torch.all(model.model.norm.weight == 1)
    assert max_relative_error(logits(model, tokens), expected) < TOLERANCE


def test_rotation_flattens_a_planted_outlier_channel() -> None:
    """A residual channel 30× larger than the rest is spread over all channels by the Hadamard."""
    model = tiny_model("llama-untied")
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 5] *= 30.0
    family = family_for_model(model)
    embeddings_before = model.model.embed_tokens.weight.detach().clone()
    rotate_model(model, family, RotationConfig())
    embeddings_after = model.model.embed_tokens.weight.detach()

    def peak_to_rms(x: torch.Tensor) -> float:
        x = x[x.abs().amax(-1) > 0]  # the padding row is all zeros
        return float((x.abs().amax(-1) / x.pow(2).mean(-1).sqrt()).max())

    assert peak_to_rms(embeddings_after) < 0.5 * peak_to_rms(embeddings_before)


def test_width_without_hadamard_fails_before_changing_weights() -> None:
    model = tiny_model("llama-untied")
    model.model.layers[0].mlp.down_proj = torch.nn.Linear(70, 48, bias=False)
    model.model.layers[0].mlp.up_proj = torch.nn.Linear(48, 70, bias=False)
    model.model.layers[0].mlp.gate_proj = torch.nn.Linear(48, 70, bias=False)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(NoHadamardError, match="--rotation random"):
        rotate_model(model, family_for_model(model), RotationConfig(kind="hadamard"))
    after = model.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)

    tokens = random_tokens()
    expected = logits(model, tokens)
    rotate_model(model, family_for_model(model), RotationConfig(kind="random"))
    assert max_relative_error(logits(model, tokens), expected) < TOLERANCE


def test_unknown_rotation_kind_is_rejected() -> None:
    with pytest.raises(RotaqError, match="unknown rotation"):
        RotationConfig(kind="givens")
