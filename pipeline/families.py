"""Model-family knowledge: what a family's decoder layer is made of and what it computes.

Every stage asks this table instead of probing modules (`hasattr(attn, "q_norm")`) or testing `model_type`
itself, so adding a family is one entry here and a family that differs in a way rotaq does not handle is
refused by name instead of being rotated, quantized or exported wrongly. The layout follows
llm-compressor's mapping tables; the traits are the ones transformers' modeling files branch on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from rotaq.pipeline.errors import UnsupportedModelError

NormKind = Literal["w", "1+w"]  # RMSNorm output x̂·w (Llama) or x̂·(1 + w) (Gemma)
SlidingWindowRule = Literal["none", "every_layer", "layer_types"]
HANDLED_NORM_KINDS: tuple[NormKind, ...] = ("w",)  # what norm folding and the export's RMSNorm compute
NORM_CLASS_SUFFIX = "RMSNorm"  # transformers names every family's norm <Family>RMSNorm


@dataclass(frozen=True)
class LayerTraits:
    """What one decoder layer computes beyond the common pre-norm layer."""

    uses_rope: bool
    sliding_window: int | None  # attention window in tokens, None: full causal attention


@dataclass(frozen=True)
class DecoderFamily:
    """A pre-norm decoder with RMSNorm, split q/k/v and a gated MLP: its module paths and its traits.

    Paths inside a decoder layer are relative to that layer; the others to the causal-LM model.
    """

    name: str
    model_types: tuple[str, ...]
    layers: str = "model.layers"
    embed_tokens: str = "model.embed_tokens"
    rotary_embedding: str = "model.rotary_emb"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    input_norm: str = "input_layernorm"
    post_attention_norm: str = "post_attention_layernorm"
    query: str = "self_attn.q_proj"
    key: str = "self_attn.k_proj"
    value: str = "self_attn.v_proj"
    attention_output: str = "self_attn.o_proj"
    mlp_inputs: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    mlp_output: str = "mlp.down_proj"
    # RMSNorms on each head of q and k after projection (Qwen3): in head space, so the residual rotation
    # never touches them, but the export must apply them.
    head_norms: tuple[str, str] | None = None
    norm_kind: NormKind = "w"
    # q/k/v biases: True always there (Qwen2), None as the config's `attention_bias` says.
    qkv_bias: bool | None = None
    # Config attribute with one flag per layer, 1 where the layer applies RoPE and 0 where it has none (NoPE).
    rope_flags: str | None = None
    sliding_window: SlidingWindowRule = "none"

    @property
    def attention_inputs(self) -> tuple[str, str, str]:
        return (self.query, self.key, self.value)

    @property
    def key_value(self) -> tuple[str, str]:
        """The projections whose outputs the KV cache stores."""
        return (self.key, self.value)

    @property
    def decoder_linears(self) -> tuple[str, ...]:
        """The seven projections of a decoder layer, in execution order."""
        return (*self.attention_inputs, self.attention_output, *self.mlp_inputs, self.mlp_output)

    @property
    def layer_norms(self) -> tuple[str, ...]:
        """Every RMSNorm of a decoder layer, as the family describes it."""
        return (self.input_norm, self.post_attention_norm, *(self.head_norms or ()))

    def layer_traits(self, config: Any, index: int) -> LayerTraits:
        """RoPE and attention window of layer `index`, read the way the family's modeling code reads them."""
        uses_rope = bool(getattr(config, self.rope_flags)[index]) if self.rope_flags else True
        window = getattr(config, "sliding_window", None)
        if self.sliding_window == "none" or not window:
            return LayerTraits(uses_rope, None)
        if self.sliding_window == "layer_types":
            layer_types = getattr(config, "layer_types", None) or []
            sliding = index < len(layer_types) and layer_types[index] == "sliding_attention"
            if not getattr(config, "use_sliding_window", True):
                sliding = False
            return LayerTraits(uses_rope, int(window) if sliding else None)
        return LayerTraits(uses_rope, int(window))

    def head_dim(self, config: Any) -> int:
        return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)

    @property
    def attention_module(self) -> str:
        """The attention block inside a layer (self_attn), parent of q/k/v/o and the head norms."""
        return self.attention_output.rpartition(".")[0]

    @property
    def mlp_module(self) -> str:
        return self.mlp_output.rpartition(".")[0]

    def check_norm_kind(self, refused: str) -> None:
        """Norm folding and the export's RMSNorm both take the norm's scale to be its weight w; a family whose
        norm scales otherwise is refused with `refused`, the consequence for the caller."""
        if self.norm_kind not in HANDLED_NORM_KINDS:
            raise UnsupportedModelError(f"{self.name} RMSNorm scales by ({self.norm_kind}); rotaq handles norms "
                                        f"that scale by w only, so {refused}")


FAMILIES: tuple[DecoderFamily, ...] = (
    DecoderFamily(name="Llama (incl. SmolLM2)", model_types=("llama",)),
    DecoderFamily(name="Mistral", model_types=("mistral",), sliding_window="every_layer"),
    DecoderFamily(name="Qwen2 / Qwen2.5", model_types=("qwen2",), qkv_bias=True, sliding_window="layer_types"),
    DecoderFamily(name="Qwen3", model_types=("qwen3",), head_norms=("self_attn.q_norm", "self_attn.k_norm"),
                  sliding_window="layer_types"),
    DecoderFamily(name="SmolLM3", model_types=("smollm3",), rope_flags="no_rope_layers", sliding_window="layer_types"),
    # Described so that what rotaq cannot do with it is refused by name: its norms scale by (1 + w) and its
    # MLP is GELU-gated (export refuses that).
    DecoderFamily(name="Gemma (unrotated, PyTorch only)", model_types=("gemma",), norm_kind="1+w"),
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


def check_family_layout(model: nn.Module, family: DecoderFamily) -> None:
    """Refuse a model whose layers are not what its family entry describes (a norm the table does not list,
    a missing q/k norm or bias), so no stage computes a different function from the model's without a word.

    Checked on the first decoder layer: transformers builds every layer of a family from one class."""
    layer = decoder_layers(model, family)[0]
    norms = sorted(name for name, module in layer.named_modules() if type(module).__name__.endswith(NORM_CLASS_SUFFIX))
    if norms != sorted(family.layer_norms):
        raise UnsupportedModelError(
            f"{type(model).__name__}: its decoder layer has the norms {norms or 'none'}, but rotaq's {family.name} "
            f"entry describes {sorted(family.layer_norms)}; a norm rotaq does not know would not be folded or exported")
    expected_bias = family.qkv_bias if family.qkv_bias is not None else bool(
        getattr(model.config, "attention_bias", False))
    for path in family.attention_inputs:
        if (layer.get_submodule(path).bias is not None) != expected_bias:
            raise UnsupportedModelError(f"{type(model).__name__}: {path} {'has no' if expected_bias else 'has a'} "
                                        f"bias, which rotaq's {family.name} entry does not describe")


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the module at a dotted path (torch's own set_submodule needs the parent to exist as-is)."""
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, module)
