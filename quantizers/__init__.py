"""Tensor-level quantizer arithmetic: schemes, RTN and GPTQ weights, dynamic activations."""

from rotaq.quantizers.activations import fake_quantize_per_block, fake_quantize_per_token, quantize_per_token
from rotaq.quantizers.gptq import HessianAccumulator, gptq_quantize
from rotaq.quantizers.rtn import QuantizedWeight, fake_quantize_weight, quantize_weight_rtn
from rotaq.quantizers.schemes import QuantScheme, parse_scheme, validate_group

__all__ = [
    "HessianAccumulator",
    "QuantScheme",
    "QuantizedWeight",
    "fake_quantize_per_block",
    "fake_quantize_per_token",
    "fake_quantize_weight",
    "gptq_quantize",
    "parse_scheme",
    "quantize_per_token",
    "quantize_weight_rtn",
    "validate_group",
]
