"""Rebuild a quantized stage folder's fake-quant modules (its weights are already dequantized)."""

from __future__ import annotations

from typing import Any

from torch import nn

from rotaq.pipeline.families import DecoderFamily, set_submodule
from rotaq.quantizers.linear import LayerQuantSpec, QuantizedLinear


def install_quantized_linear(model: nn.Module, path: str, spec: LayerQuantSpec) -> QuantizedLinear:
    wrapped = QuantizedLinear.wrap(model.get_submodule(path), spec)
    set_submodule(model, path, wrapped)
    return wrapped


def install_quantization_structure(model: nn.Module, family: DecoderFamily, section: dict[str, Any]) -> None:
    """Wrap every quantized linear; embeddings need no module, only their dequantized weights."""
    for path, values in section.get("layers", {}).items():
        if isinstance(model.get_submodule(path), nn.Linear):
            install_quantized_linear(model, path, LayerQuantSpec.from_dict(values))
