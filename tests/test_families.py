"""The family table describes each family: its traits agree with what transformers' own modules do, a model
that differs from its entry is refused by name, and a norm kind the folding cannot move is refused before
anything changes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from rotaq.pipeline.errors import UnsupportedModelError
from rotaq.pipeline.families import FAMILIES, check_family_layout, decoder_layers, family_for_model
from rotaq.rotations.rotate import RotationConfig, rotate_model
from tests.tiny_models import TINY_CONFIGS, VOCAB_SIZE, tiny_model

# Per family, a config whose layers differ (windows, NoPE), so a trait read from the wrong place shows.
VARIED = {
    "mistral": {"sliding_window": 5},
    "qwen2-bias": {"use_sliding_window": True, "sliding_window": 4, "layer_types": ["full_attention", "sliding_attention"]},
    "qwen3-qknorm": {"use_sliding_window": True, "sliding_window": 3, "layer_types": ["sliding_attention", "full_attention"]},
    "smollm3": {"no_rope_layers": [1, 0]},
}


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_layer_traits_match_the_modeling_code(name: str) -> None:
    model = tiny_model(name, overrides=VARIED.get(name))
    family = family_for_model(model)
    check_family_layout(model, family)
    for index, layer in enumerate(decoder_layers(model, family)):
        traits = family.layer_traits(model.config, index)
        attention = layer.get_submodule(family.attention_module)
        # Where the modeling code keeps the trait on the module (Qwen2/3, SmolLM3), it must agree; Mistral reads
        # config.sliding_window for every layer and Llama has no window.
        expected_window = getattr(attention, "sliding_window", getattr(model.config, "sliding_window", None))
        assert traits.sliding_window == expected_window, (index, traits)
        assert traits.uses_rope == bool(getattr(attention, "use_rope", True)), (index, traits)
        assert all(layer.get_submodule(path) is not None for path in family.layer_norms)
    if name in VARIED:  # the varied configs do vary: both values of a trait occur
        values = [family.layer_traits(model.config, i) for i in range(len(decoder_layers(model, family)))]
        assert len(set(values)) == 2 or name == "mistral"


def test_every_family_entry_names_distinct_model_types() -> None:
    types = [model_type for family in FAMILIES for model_type in family.model_types]
    assert len(types) == len(set(types))


def test_a_norm_the_entry_does_not_describe_is_refused() -> None:
    """Gemma2-style post-norms on the sublayer outputs are not rotation-invariant: refused, not ignored."""
    model = tiny_model("llama-untied")
    layer = decoder_layers(model, family_for_model(model))[0]
    layer.post_feedforward_layernorm = type(layer.input_layernorm)(48)
    with pytest.raises(UnsupportedModelError, match="post_feedforward_layernorm"):
        check_family_layout(model, family_for_model(model))


def test_missing_qkv_bias_is_refused() -> None:
    model = tiny_model("qwen2-bias")
    decoder_layers(model, family_for_model(model))[0].self_attn.q_proj.bias = None
    with pytest.raises(UnsupportedModelError, match="q_proj has no bias"):
        check_family_layout(model, family_for_model(model))


def _tiny_gemma() -> torch.nn.Module:
    config = AutoConfig.for_model("gemma", vocab_size=VOCAB_SIZE, hidden_size=48, intermediate_size=80,
                                  num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1, head_dim=16)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def test_gemma_one_plus_w_norms_are_refused_before_anything_changes() -> None:
    model = _tiny_gemma()
    family = family_for_model(model)
    check_family_layout(model, family)  # described correctly: its layers are what the entry says
    assert family.norm_kind == "1+w"
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(UnsupportedModelError, match=r"scales by \(1\+w\)") as refused:
        rotate_model(model, family, RotationConfig(kind="hadamard"))
    assert "\n" not in str(refused.value)
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert model.config.tie_word_embeddings  # not untied either


def test_gemma_quantizes_unrotated() -> None:
    """What the table says Gemma can do: quantize (here W8A8 RTN) in PyTorch without a rotation."""
    from rotaq.quantizers.quantize_model import QuantizeSettings, quantize_model
    from rotaq.quantizers.schemes import parse_scheme
    from tests.tiny_models import random_tokens

    tokens = random_tokens(2, 16)
    reference = _tiny_gemma()(tokens).logits
    model = _tiny_gemma()
    quantize_model(model, family_for_model(model), QuantizeSettings(parse_scheme("w8a8"), weights="rtn", progress=False),
                   None)
    error = float((model(tokens).logits - reference).norm() / reference.norm())
    assert 0 < error < 0.05
