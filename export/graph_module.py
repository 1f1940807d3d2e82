"""An export-friendly decoder: the HF model's weights behind a forward with explicit KV-cache tensors.

transformers' cache classes and mask helpers do not trace cleanly, so the decoder forward is written
again here from the HF modules' own weights: RMSNorm, RoPE, GQA attention over past + new tokens with
a causal (optionally sliding-window) mask and a padding mask, the SiLU-gated MLP, q/k/v biases,
Qwen3's q_norm/k_norm, SmolLM3's NoPE layers and tied or untied heads. It computes what the HF
model computes (float32 logits within 1e-5 relative, checked before every export).

Calling convention (the ONNX graph's, see `rotaq.export.layout`):
    logits, present = graph(input_ids [B, S], attention_mask [B, P + S], past (2 * layers tensors
    [B, kv_heads, P, head_dim]: key, value per layer)); P may be 0. Position ids are derived from
    the attention mask (count of real tokens before each position), so left padding works.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from rotaq.export.emitters import LinearEmitter
from rotaq.quantizers.linear import QuantizedLinear, quantize_output
from rotaq.quantizers.rtn import QuantizedWeight
from rotaq.pipeline.errors import UnsupportedModelError
from rotaq.pipeline.families import DecoderFamily, LayerTraits, decoder_layers
from rotaq.rotations.online import input_rotation_of

# RoPE types whose frequencies are fixed at load time; "dynamic" and "longrope" recompute them from
# the sequence length at run time, which a static graph built here does not reproduce.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
_SILU_NAMES = ("silu", "swish")


@dataclass(frozen=True)
class DecoderShape:
    """The sizes that fix the graph's inputs and outputs."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int


class RMSNorm(nn.Module):
    """HF's RMSNorm arithmetic (float32 variance, weight applied last), sharing the HF weight."""

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        self.weight = source.weight
        self.eps = float(source.variance_epsilon)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        variance = hidden_states.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states.float() * torch.rsqrt(variance + self.eps)).to(hidden_states.dtype)


class ExportLinear(nn.Module):
    """y = matmul_input(x) · Wᵀ + b, with Wᵀ stored [in, out] as `weight_t`.

    Each linear therefore exports as exactly one MatMul whose B input is the initializer named after
    this module (e.g. `layers.0.attn.q_proj.weight_t`): the anchor the quantized-kernel rewrite looks
    for. `path` is the HF module path. In eager mode a quantized layer computes its emitter's PyTorch
    reference, i.e. what the rewritten graph computes.
    """

    def __init__(self, source: nn.Linear, path: str, emitter: LinearEmitter | None = None) -> None:
        super().__init__()
        self.path = path
        self.emitter = emitter
        self.weight_t = nn.Parameter(source.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = source.bias
        # Registered so the rotation's factors are this module's buffers (named initializers) on export.
        self.input_rotation = input_rotation_of(source)
        # A k_proj / v_proj with KV-cache quantization fake-quantizes its output in float ops, as in PyTorch.
        self.output_spec = source.spec if isinstance(source, QuantizedLinear) else None

    def matmul_input(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """What the weight multiplies: the input after the online rotation, if the source layer has one."""
        return hidden_states if self.input_rotation is None else self.input_rotation(hidden_states)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = self.matmul_input(hidden_states)
        if self.emitter is None or torch.onnx.is_in_onnx_export():
            output = x @ self.weight_t
        else:
            output = self.emitter.reference(x)
        output = output if self.bias is None else output + self.bias
        return output if self.output_spec is None else quantize_output(output, self.output_spec)


def _in_attention(family: DecoderFamily, path: str) -> str:
    """A layer-relative path (self_attn.q_proj) relative to the attention module (q_proj)."""
    return path.removeprefix(family.attention_module + ".")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    """GQA self-attention over the cached keys/values plus the new tokens."""

    def __init__(self, source: nn.Module, prefix: str, emitters: dict[str, LinearEmitter], family: DecoderFamily,
                 traits: LayerTraits) -> None:
        super().__init__()
        self.head_dim = int(source.head_dim)
        self.scaling = float(source.scaling)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            ExportLinear(getattr(source, name), f"{prefix}.{name}", emitters.get(f"{prefix}.{name}"))
            for name in (_in_attention(family, path) for path in (*family.attention_inputs, family.attention_output)))
        self.num_heads = self.q_proj.weight_t.shape[1] // self.head_dim
        self.num_kv_heads = self.k_proj.weight_t.shape[1] // self.head_dim
        self.q_norm, self.k_norm = ((RMSNorm(source.get_submodule(_in_attention(family, path)))
                                     for path in family.head_norms) if family.head_norms else (None, None))
        self.use_rope = traits.uses_rope  # SmolLM3's NoPE layers have none

    def forward(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, allowed: torch.Tensor,
                past_key: torch.Tensor, past_value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, seq = hidden_states.shape[:2]
        query = self.q_proj(hidden_states).view(batch, seq, -1, self.head_dim)
        key = self.k_proj(hidden_states).view(batch, seq, -1, self.head_dim)
        value = self.v_proj(hidden_states).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            query, key = self.q_norm(query), self.k_norm(key)
        query, key = query.transpose(1, 2), key.transpose(1, 2)
        if self.use_rope:
            query = query * cos + rotate_half(query) * sin
            key = key * cos + rotate_half(key) * sin
        key = torch.cat((past_key, key), dim=2)
        value = torch.cat((past_value, value), dim=2)
        # Grouped heads share a KV head: fold the group into the query rows instead of repeating K/V.
        groups = self.num_heads // self.num_kv_heads
        grouped_query = query.reshape(batch, self.num_kv_heads, groups * seq, self.head_dim)
        scores = (grouped_query @ key.transpose(2, 3)) * self.scaling
        scores = scores.view(batch, self.num_heads, seq, -1)
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
        attn_output = probs.view(batch, self.num_kv_heads, groups * seq, -1) @ value
        attn_output = attn_output.view(batch, self.num_heads, seq, self.head_dim).transpose(1, 2)
        return self.o_proj(attn_output.reshape(batch, seq, -1)), key, value


class GatedMLP(nn.Module):
    def __init__(self, source: nn.Module, prefix: str, emitters: dict[str, LinearEmitter]) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = (
            ExportLinear(getattr(source, name), f"{prefix}.{name}", emitters.get(f"{prefix}.{name}"))
            for name in ("gate_proj", "up_proj", "down_proj"))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


class DecoderLayer(nn.Module):
    def __init__(self, source: nn.Module, prefix: str, family: DecoderFamily, emitters: dict[str, LinearEmitter],
                 traits: LayerTraits) -> None:
        super().__init__()
        attn_path, mlp_path = family.attention_module, family.mlp_module
        self.input_norm = RMSNorm(source.get_submodule(family.input_norm))
        self.attn = Attention(source.get_submodule(attn_path), f"{prefix}.{attn_path}", emitters, family, traits)
        self.post_attention_norm = RMSNorm(source.get_submodule(family.post_attention_norm))
        self.mlp = GatedMLP(source.get_submodule(mlp_path), f"{prefix}.{mlp_path}", emitters)
        self.sliding_window = traits.sliding_window

    def forward(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, allowed: torch.Tensor,
                past_key: torch.Tensor, past_value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn_output, key, value = self.attn(self.input_norm(hidden_states), cos, sin, allowed, past_key, past_value)
        hidden_states = hidden_states + attn_output
        hidden_states = hidden_states + self.mlp(self.post_attention_norm(hidden_states))
        return hidden_states, key, value


class SidePath(nn.Module):
    """A LoR2C side path as two MatMuls: (h_in · Aᵀ) · (s·Bᵀ), added to the output of layer `last`.

    Kept in float: its initializers are not named `weight_t`, so the quantized-kernel rewrite leaves them.
    """

    def __init__(self, first: int, last: int, down_t: nn.Parameter, up_t: nn.Parameter) -> None:
        super().__init__()
        self.first, self.last = first, last
        self.down_t, self.up_t = down_t, up_t

    def forward(self, hidden_in: torch.Tensor) -> torch.Tensor:
        return (hidden_in @ self.down_t) @ self.up_t


def side_paths_of(model: nn.Module) -> nn.ModuleList:
    """The model's LoR2C side paths for the graph; one Aᵀ initializer for a shared A."""
    from rotaq.adapters.kinds import installed_adapter

    installed = installed_adapter(model)
    downs: dict[int, nn.Parameter] = {}
    paths = nn.ModuleList()
    for path in installed.side_paths() if installed is not None else []:
        if id(path.lora_A) not in downs:
            downs[id(path.lora_A)] = nn.Parameter(path.lora_A.detach().t().contiguous(), requires_grad=False)
        up_t = nn.Parameter((path.scaling * path.lora_B.detach()).t().contiguous(), requires_grad=False)
        paths.append(SidePath(path.first, path.last, downs[id(path.lora_A)], up_t))
    return paths


class DecoderGraph(nn.Module):
    """The whole causal LM with an explicit KV cache; see the module docstring for the convention."""

    def __init__(self, model: nn.Module, family: DecoderFamily,
                 emitters: dict[str, LinearEmitter] | None = None,
                 embedding_codes: QuantizedWeight | None = None) -> None:
        super().__init__()
        emitters = emitters or {}
        config = model.config
        check_supported_config(config)
        family.check_norm_kind("it cannot be exported")
        rotary = _rotary_embedding(model, family)
        self.register_buffer("inv_freq", rotary.inv_freq.detach().float().clone(), persistent=False)
        self.attention_scaling = float(rotary.attention_scaling)
        embed = model.get_submodule(family.embed_tokens)
        self.embed_weight = embed.weight
        self.layers = nn.ModuleList(
            DecoderLayer(layer, f"{family.layers}.{index}", family, emitters, family.layer_traits(config, index))
            for index, layer in enumerate(decoder_layers(model, family)))
        self.norm = RMSNorm(model.get_submodule(family.final_norm))
        self.side_paths = side_paths_of(model)
        lm_head = model.get_submodule(family.lm_head)
        # A tied head reads the embedding matrix through a Transpose rather than storing a second copy.
        tied = lm_head.weight is embed.weight
        self.lm_head = None if tied else ExportLinear(lm_head, family.lm_head, emitters.get(family.lm_head))
        self.register_buffer("embed_codes", None, persistent=False)
        self.register_buffer("embed_scales", None, persistent=False)
        self.use_embedding(embed.weight, embedding_codes)
        unplaced = sorted(set(emitters) - {m.path for m in self.modules() if isinstance(m, ExportLinear)})
        if unplaced:
            raise UnsupportedModelError(f"quantized layers with no exported linear: {', '.join(unplaced)} "
                                        "(a tied lm_head reads the embedding table and cannot carry a kernel)")
        attention = self.layers[0].attn
        self.shape = DecoderShape(num_layers=len(self.layers), num_heads=attention.num_heads,
                                  num_kv_heads=attention.num_kv_heads, head_dim=attention.head_dim,
                                  hidden_size=int(self.embed_weight.shape[1]),
                                  vocab_size=int(self.embed_weight.shape[0]))
        if 2 * self.inv_freq.numel() != self.shape.head_dim:
            raise UnsupportedModelError(
                f"RoPE covers {2 * self.inv_freq.numel()} of {self.shape.head_dim} head dims (partial rotary); "
                "export supports full-width RoPE only")

    def use_embedding(self, weight: torch.Tensor, codes: QuantizedWeight | None) -> None:
        """Look tokens up in `weight`, or in 8-bit per-row `codes` where the quantize stage wrote them for an
        untied table. Rows are then int8 codes times their row scale (codes * scale, the quantize stage's own
        dequantization, so the same floats): the table is stored in 8 bits, not 32."""
        self.embed_weight = weight
        if codes is not None and self.lm_head is not None and codes.n_groups == 1 and codes.symmetric \
                and codes.bits == 8:
            self.embed_codes, self.embed_scales = codes.codes.clone(), codes.scales.clone()
        else:
            self.embed_codes = self.embed_scales = None

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.embed_codes is None:
            return F.embedding(input_ids, self.embed_weight)
        return F.embedding(input_ids, self.embed_codes).float() * F.embedding(input_ids, self.embed_scales)

    def head(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Logits of the last layer's output: the final norm, then lm_head (or the tied embedding)."""
        hidden_states = self.norm(hidden_states)
        return hidden_states @ self.embed_weight.t() if self.lm_head is None else self.lm_head(hidden_states)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                past_key_values: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        seq = input_ids.shape[1]
        past = past_key_values[0].shape[2]
        cos, sin = self.rope_tables(attention_mask, past)
        masks = self.attention_masks(attention_mask, seq, past)
        hidden_states = self.embed(input_ids)
        present: list[torch.Tensor] = []
        path_inputs: dict[int, torch.Tensor] = {}
        for index, layer in enumerate(self.layers):
            if any(path.first == index for path in self.side_paths):
                path_inputs[index] = hidden_states
            hidden_states, key, value = layer(hidden_states, cos, sin, masks[layer.sliding_window],
                                              past_key_values[2 * index], past_key_values[2 * index + 1])
            for path in self.side_paths:
                if path.last == index:
                    hidden_states = hidden_states + path(path_inputs[path.first])
            present += [key, value]
        return (self.head(hidden_states), *present)

    def quantized_linears(self) -> dict[str, LinearEmitter]:
        """Weight-initializer name (`<graph module>.weight_t`) → emitter, for every linear that has one."""
        return {f"{name}.weight_t": module.emitter for name, module in self.named_modules()
                if isinstance(module, ExportLinear) and module.emitter is not None}

    def rope_tables(self, attention_mask: torch.Tensor, past: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [B, 1, S, head_dim]; a token's position is the number of real tokens before it."""
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling)[:, None], (emb.sin() * self.attention_scaling)[:, None]

    def attention_masks(self, attention_mask: torch.Tensor, seq: int, past: int) -> dict[int | None, torch.Tensor]:
        """Boolean [B, 1, S, P + S] masks: causal over cache slots, padding slots excluded, and for a
        sliding-window layer only the last `window` slots (HF: kv_idx > q_idx - window)."""
        key_slots = torch.arange(past + seq, device=attention_mask.device)
        query_slots = torch.arange(seq, device=attention_mask.device) + past
        distance = query_slots[:, None] - key_slots[None, :]
        padding = attention_mask.bool()[:, None, None, :]
        return {window: padding & ((distance >= 0) if window is None else ((distance >= 0) & (distance < window)))
                for window in {layer.sliding_window for layer in self.layers}}


def check_supported_config(config: object) -> None:
    """Refuse what the export forward does not reproduce, naming the setting."""
    act = getattr(config, "hidden_act", "silu")
    if act not in _SILU_NAMES:
        raise UnsupportedModelError(f"hidden_act={act!r}: export supports the SiLU-gated MLP only")
    rope = getattr(config, "rope_parameters", None) or {}
    if any(isinstance(value, dict) for value in rope.values()):
        raise UnsupportedModelError("RoPE parameters per layer type are not supported by export")
    rope_type = rope.get("rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        raise UnsupportedModelError(
            f"RoPE type {rope_type!r} is not supported by export (its frequencies depend on the sequence "
            f"length at run time); supported: {', '.join(STATIC_ROPE_TYPES)}")


def _rotary_embedding(model: nn.Module, family: DecoderFamily) -> nn.Module:
    """The backbone's rotary module, whose inv_freq already holds any scaling."""
    try:
        rotary = model.get_submodule(family.rotary_embedding)
    except AttributeError:
        rotary = None
    if rotary is None or not hasattr(rotary, "inv_freq"):
        raise UnsupportedModelError(f"{type(model).__name__} has no rotary embedding module with inv_freq")
    return rotary
