"""Model-family knowledge: which modules are the norms, projections and embeddings.

Every stage asks this table instead of testing `model_type` itself, so adding a family is one
entry here (the layout follows llm-compressor's mapping tables).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from rotaq.pipeline.errors import UnsupportedModelError


@dataclass(frozen=True)
class DecoderFamily:
    """Module paths of a pre-norm decoder with RMSNorm, split q/k/v and a gated MLP.

    Paths inside a decoder layer are relative to that layer; the others to the causal-LM model.
    """

    name: str
    model_types: tuple[str, ...]
    layers: str = "model.layers"
    embed_tokens: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    input_norm: str = "input_layernorm"
    post_attention_norm: str = "post_attention_layernorm"
    attention_inputs: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    attention_output: str = "self_attn.o_proj"
    mlp_inputs: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    mlp_output: str = "mlp.down_proj"

    @property
    def decoder_linears(self) -> tuple[str, ...]:
        """The seven projections of a decoder layer, in execution order."""
        return (*self.attention_inputs, self.attention_output, *self.mlp_inputs, self.mlp_output)


FAMILIES: tuple[DecoderFamily, ...] = (
    DecoderFamily(name="Llama (incl. SmolLM2)", model_types=("llama",)),
    DecoderFamily(name="Mistral", model_types=("mistral",)),
    DecoderFamily(name="Qwen2 / Qwen2.5", model_types=("qwen2",)),
    # q_norm/k_norm act on q/k after projection, in head space, so the residual rotation never touches them.
    DecoderFamily(name="Qwen3", model_types=("qwen3",)),
    DecoderFamily(name="SmolLM3", model_types=("smollm3",)),
)


def supported_families_text() -> str:
    return ", ".join(f"{f.name} [{'/'.join(f.model_types)}]" for f in FAMILIES)


def family_for_model_type(model_type: str) -> DecoderFamily:
    """The family entry for a config's `model_type`, or a clear error naming what is supported."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise UnsupportedModelError(
        f"model type '{model_type}' is not supported; supported families: {supported_families_text()}"
    )


def family_for_model(model: nn.Module) -> DecoderFamily:
    return family_for_model_type(getattr(model.config, "model_type", "<unknown>"))


def decoder_layers(model: nn.Module, family: DecoderFamily) -> nn.ModuleList:
    return model.get_submodule(family.layers)


def layer_linears(layer: nn.Module, family: DecoderFamily) -> dict[str, nn.Linear]:
    """Projection name (e.g. 'self_attn.q_proj') → module, for one decoder layer."""
    return {name: layer.get_submodule(name) for name in family.decoder_linears}


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the module at a dotted path (torch's own set_submodule needs the parent to exist as-is)."""
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, module)
