"""Fake quantizers for quantization-aware adapter training, with straight-through gradients.

The forward sees exactly what the quantize stage will deploy for the scheme: both read the decoder layers'
`LayerQuantSpec` from `rotaq.quantizers.linear.decoder_layer_spec` (RTN weight grid, dynamic activation grid
per token or per block, the block fitted inside the weight groups as deployed); the backward treats rounding
as the identity, so A and B still learn.
"""

from __future__ import annotations

import dataclasses

from torch import Tensor

from rotaq.quantizers.activations import fake_quantize_activations
from rotaq.quantizers.linear import LayerQuantSpec, decoder_layer_spec
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
        self.spec: LayerQuantSpec = decoder_layer_spec(scheme)

    @property
    def name(self) -> str:
        return self.scheme.name

    def check_layer(self, in_features: int, layer_name: str) -> None:
        """Fail at install time, not mid-training, when the scheme's group size does not tile a layer."""
        validate_group(self.spec.group_size, in_features, layer_name, self.scheme.ragged_groups)

    def weight(self, weight: Tensor) -> Tensor:
        """RTN quantize-dequantize in the forward, identity in the backward."""
        spec = self.spec
        quantized = fake_quantize_weight(weight.detach(), spec.weight_bits, spec.group_size, spec.weight_symmetric,
                                         self.scheme.weight_clip_search, allow_ragged=self.scheme.ragged_groups)
        return weight + (quantized - weight).detach()

    def activations(self, inputs: Tensor) -> Tensor:
        """Dynamic fake quantization as deployed (per token, or per block of K where the scheme follows
        ONNX Runtime's A8 kernel; already straight-through); identity for a16 schemes."""
        spec = self.spec
        return fake_quantize_activations(inputs, spec.act_bits, spec.act_symmetric, spec.act_clip_ratio,
                                         spec.act_block_size)
