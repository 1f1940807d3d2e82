"""Fake quantizers for quantization-aware adapter training, with straight-through gradients.

The forward sees exactly what the quantize stage will deploy for the scheme (RTN weight grid, dynamic
per-token activation grid); the backward treats rounding as the identity, so A and B still learn.
"""

from __future__ import annotations

import dataclasses

from torch import Tensor

from rotaq.quantizers.activations import fake_quantize_activations
from rotaq.quantizers.rtn import fake_quantize_weight
from rotaq.quantizers.schemes import QuantScheme, parse_scheme, validate_group


class FakeQuantizers:
    """The weight and activation fake quantizers of one scheme, e.g. 'w4a4'."""

    def __init__(self, scheme_name: str, act_clip_ratio: float | None = None) -> None:
        """`act_clip_ratio`: the quantize stage's `--act-clip-ratio`, so training clips as deployment will
        (it applies to per-token activations only, as there; per-block A8 stays unclipped)."""
        scheme = parse_scheme(scheme_name)
        if act_clip_ratio is not None and scheme.clips_activations_by_default:
            scheme = dataclasses.replace(scheme, act_clip_ratio=act_clip_ratio)
        self.scheme: QuantScheme = scheme

    @property
    def name(self) -> str:
        return self.scheme.name

    def check_layer(self, in_features: int, layer_name: str) -> None:
        """Fail at install time, not mid-training, when the scheme's group size does not tile a layer."""
        validate_group(self.scheme.weight_group_size, in_features, layer_name)

    def weight(self, weight: Tensor) -> Tensor:
        """RTN quantize-dequantize in the forward, identity in the backward."""
        quantized = fake_quantize_weight(weight.detach(), self.scheme.weight_bits, self.scheme.weight_group_size,
                                         self.scheme.weight_symmetric, self.scheme.weight_clip_search)
        return weight + (quantized - weight).detach()

    def activations(self, inputs: Tensor) -> Tensor:
        """Dynamic fake quantization as deployed (per token, or per block of K where the scheme follows
        ONNX Runtime's A8 kernel; already straight-through); identity for a16 schemes."""
        return fake_quantize_activations(inputs, self.scheme.act_bits, self.scheme.act_symmetric,
                                         self.scheme.act_clip_ratio, self.scheme.act_block_size)
