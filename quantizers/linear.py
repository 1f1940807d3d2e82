"""The fake-quant linear layer: what the deployed integer kernel computes, in float PyTorch.

Input → online rotation (if the rotated model has one here) → dynamic activation fake-quant (per
token, or per block of K where the runtime kernel does that) → matmul with the dequantized weight.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from rotaq.pipeline.families import DecoderFamily
from rotaq.quantizers.activations import fake_quantize_activations, fake_quantize_per_token
from rotaq.quantizers.schemes import QuantScheme
from rotaq.rotations.online import OnlineRotation, RotatedInputLinear


@dataclass(frozen=True)
class LayerQuantSpec:
    """How one layer is quantized; stored per layer in the manifest so export needs nothing else."""

    weight_bits: int
    group_size: int | None
    weight_symmetric: bool
    act_bits: int
    act_symmetric: bool = True
    act_clip_ratio: float = 1.0
    act_block_size: int | None = None  # None: per token; else per block of K (ONNX Runtime's A8 kernels)
    # KV-cache quantization on k_proj / v_proj: the output, i.e. what the cache stores, fake-quantized
    # symmetric per token and per head (groups of `output_group` = head_dim).
    output_bits: int | None = None
    output_group: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LayerQuantSpec:
        return cls(**{key: values[key] for key in cls.__dataclass_fields__ if key in values})


def activation_block(scheme: QuantScheme) -> int | None:
    """The scheme's activation block, shrunk to fit inside its weight groups (a MatMulNBits block
    must not straddle two groups); per token when no kernel block size fits (below 16)."""
    block = scheme.act_block_size
    if block is None or scheme.weight_group_size is None:
        return block
    fitted = math.gcd(block, scheme.weight_group_size)
    return fitted if fitted >= 16 else None


def decoder_layer_spec(scheme: QuantScheme) -> LayerQuantSpec:
    """What a decoder linear deploys under `scheme`: the quantize stage writes it, QAT trains against it."""
    return LayerQuantSpec(weight_bits=scheme.weight_bits, group_size=scheme.weight_group_size,
                          weight_symmetric=scheme.weight_symmetric, act_bits=scheme.act_bits,
                          act_symmetric=scheme.act_symmetric, act_clip_ratio=scheme.act_clip_ratio,
                          act_block_size=activation_block(scheme))


def kv_cache_spec(spec: LayerQuantSpec, scheme: QuantScheme, family: DecoderFamily, model: nn.Module) -> LayerQuantSpec:
    """k_proj / v_proj: the decoder spec plus, with `kv_bits`, per-token per-head output quantization."""
    if scheme.kv_bits is None or scheme.kv_bits >= 16:
        return spec
    return dataclasses.replace(spec, output_bits=scheme.kv_bits, output_group=family.head_dim(model.config))


def decoder_layer_specs(scheme: QuantScheme, family: DecoderFamily, model: nn.Module) -> dict[str, LayerQuantSpec]:
    """The spec of each decoder linear (a path inside a layer, e.g. self_attn.k_proj) under `scheme`."""
    spec = decoder_layer_spec(scheme)
    return {path: kv_cache_spec(spec, scheme, family, model) if path in family.key_value else spec
            for path in family.decoder_linears}


def quantize_output(output: torch.Tensor, spec: LayerQuantSpec) -> torch.Tensor:
    """The KV-cache fake quantization of a k_proj / v_proj output (identity for other layers)."""
    if not spec.output_bits or spec.output_bits >= 16:
        return output
    heads = output.unflatten(-1, (-1, spec.output_group))
    return fake_quantize_per_token(heads, spec.output_bits).flatten(-2)


class QuantizedLinear(RotatedInputLinear):
    """A linear layer whose weight holds dequantized codes and whose input is fake-quantized at run time.

    `QuantizedLinear.wrap(linear, spec)` takes over `linear`'s parameters (no copy) and, for a rotated layer,
    its online rotation; `matmul_input` is the float tensor the quantizer sees (rotated, not yet quantized).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, spec: LayerQuantSpec,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 input_rotation: OnlineRotation | None = None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype, input_rotation=input_rotation)
        self.spec = spec

    def quantize_input(self, hidden_states: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        return fake_quantize_activations(hidden_states, spec.act_bits, spec.act_symmetric, spec.act_clip_ratio,
                                         spec.act_block_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        output = F.linear(self.quantize_input(self.matmul_input(hidden_states)), self.weight, self.bias)
        return quantize_output(output, self.spec)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.spec}"
