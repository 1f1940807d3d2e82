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
    head_rotation_matrix,
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
    start = start_rotations(model, family, config, learn_heads)
    settings = LearnSettings(parse_scheme("w4a4"), steps=3, lr=0.3, learn_heads=learn_heads, progress=False)
    learned = learn_rotations(model, family, random_tokens(4, 16, seed=5), settings, start,
                              online_rotation_specs(model, family, config)).matrices
    assert not torch.allclose(learned.residual, start.residual, atol=1e-3)
    if learn_heads:
        assert not torch.allclose(learned.heads[0], start.heads[0], atol=1e-4)
    return learned


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("kind", ["hadamard", "random", "learned", "learned-r1"])
@pytest.mark.parametrize("o_proj", ["head", "online"])
def test_rotation_keeps_logits(name: str, kind: str, o_proj: str) -> None:
    """Every kind keeps the logits, with o_proj's input rotated per head offline (R2 folded into v_proj and
    o_proj, only down_proj online) or by an online Hadamard across heads."""
    model = tiny_model(name)
    tokens = random_tokens()
    expected = logits(model, tokens)
    family = family_for_model(model)
    config = RotationConfig(kind=kind.removesuffix("-r1"), seed=3, o_proj_rotation=o_proj)
    matrices = learned_matrices(model, config, learn_heads=kind == "learned") if kind.startswith("learned") else None
    section = rotate_model(model, family, config, matrices)
    assert max_relative_error(logits(model, tokens), expected) < TOLERANCE
    assert section["o_proj_rotation"] == o_proj
    assert section.get("head_rotations", False) == (kind == "learned" or o_proj == "head")
    assert len(section["online"]) == (2 if o_proj == "online" else 1) * model.config.num_hidden_layers
    for layer in model.model.layers:
        linears = layer_linears(layer, family)
        assert isinstance(linears[family.mlp_output], OnlineRotatedLinear)
        assert isinstance(linears[family.attention_output], OnlineRotatedLinear) == (o_proj == "online")


def test_head_rotation_is_a_fixed_hadamard_per_value_head() -> None:
    """o_proj_rotation head folds one randomized Hadamard R2 into every value head (v_proj's rows), the same
    in every layer; `--rotation random` uses a seeded orthogonal R2; a learned rotation defaults to online."""
    model = tiny_model("llama-untied")
    family = family_for_model(model)
    head_dim = family.head_dim(model.config)
    r2 = head_rotation_matrix(head_dim, RotationConfig(seed=3))
    assert torch.allclose(r2.abs(), torch.full_like(r2, head_dim ** -0.5), atol=1e-12)
    assert torch.allclose(r2 @ r2.T, torch.eye(head_dim, dtype=r2.dtype), atol=1e-12)
    random_r2 = head_rotation_matrix(head_dim, RotationConfig(kind="random", seed=3))
    assert not torch.allclose(random_r2.abs(), r2.abs())
    assert head_rotation_matrix(head_dim, RotationConfig(o_proj_rotation="online")) is None
    assert RotationConfig(kind="learned").o_proj_rotation == "online"
    assert RotationConfig().o_proj_rotation == "head"
    with pytest.raises(RotaqError, match="unknown o_proj rotation 'cross'"):
        RotationConfig(o_proj_rotation="cross")
    without_r2 = copy.deepcopy(model)
    rotate_model(model, family, RotationConfig(seed=3, online=False))
    rotate_model(without_r2, family, RotationConfig(seed=3, online=False, o_proj_rotation="online"))
    for layer, plain in zip(model.model.layers, without_r2.model.layers):
        value, plain_value = layer.self_attn.v_proj.weight.double(), plain.self_attn.v_proj.weight.double()
        expected = (r2.T @ plain_value.reshape(-1, head_dim, plain_value.shape[1])).reshape(value.shape)
        assert torch.allclose(value, expected, atol=1e-6)
        assert not torch.allclose(value, plain_value, atol=1e-3)


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


@pytest.mark.parametrize("width,block,blocked", [(1536, 128, True), (576, 64, True), (80, 128, False),
                                                  (72, 8, True), (60, 8, False)])
def test_block_diagonal_online_rotation_is_the_folded_matrix(width: int, block: int, blocked: bool) -> None:
    """A block-diagonal online Hadamard applies, block by block, exactly the orthonormal matrix folded into the
    weight; a block that does not divide the width falls back to the whole-width Hadamard."""
    from rotaq.rotations.online import OnlineRotation, online_rotation_spec

    spec = online_rotation_spec(width, "hadamard", seed=0, block=block)
    assert ("block" in spec) == blocked
    rotation = OnlineRotation(spec)
    matrix = rotation.matrix()
    assert torch.allclose(matrix @ matrix.T, torch.eye(width, dtype=torch.float64), atol=1e-12)
    if blocked:
        off_block = matrix.clone()
        for start in range(0, width, block):
            off_block[start:start + block, start:start + block] = 0
        assert off_block.abs().max() == 0 and matrix[:block, :block].abs().min() == pytest.approx(block ** -0.5)
    x = torch.randn(2, 3, width, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(rotation.double()(x), x @ matrix, atol=1e-10)


def test_default_rotation_blocks_the_down_proj_hadamard_and_keeps_logits() -> None:
    """The default (head R2, block 128) on widths 128 divides: down_proj's online Hadamard is block-diagonal,
    o_proj has none, the logits are kept; `online_block: 0` rotates the whole width."""
    model = tiny_model("llama-untied", overrides={"intermediate_size": 256})
    tokens = random_tokens()
    expected = logits(model, tokens)
    family = family_for_model(model)
    config = RotationConfig(seed=3)
    assert (config.o_proj_rotation, config.online_block) == ("head", 128)
    assert (RotationConfig(kind="learned").online_block, RotationConfig(online_block=0).online_block) == (0, 0)
    section = rotate_model(copy.deepcopy(model), family, RotationConfig(seed=3, online_block=0))
    assert all("block" not in spec for spec in section["online"].values())
    section = rotate_model(model, family, config)
    assert max_relative_error(logits(model, tokens), expected) < TOLERANCE
    assert [spec.get("block") for spec in section["online"].values()] == [128] * model.config.num_hidden_layers
    assert section["online_block"] == 128
    with pytest.raises(RotaqError, match="online_block=-1"):
        RotationConfig(online_block=-1)
