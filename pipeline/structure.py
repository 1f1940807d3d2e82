"""Rebuild the non-standard modules a stage folder needs before its weights are loaded.

A rotated model is a plain transformers model plus online rotations; later stages add their own
manifest sections (adapters, quantization). Each section is installed here, in pipeline order, by
the package that owns it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from rotaq.pipeline.families import DecoderFamily


def install_structure(model: nn.Module, family: DecoderFamily, manifest: dict[str, Any]) -> None:
    if rotation := manifest.get("rotation"):
        from rotaq.rotations.rotate import install_rotation_structure

        install_rotation_structure(model, rotation)
    if adapters := manifest.get("adapters"):
        from rotaq.adapters.structure import install_adapter_structure

        install_adapter_structure(model, family, adapters)
    if side_paths := manifest.get("side_paths"):
        from rotaq.adapters.lor2c import install_lor2c_structure

        install_lor2c_structure(model, family, side_paths)
    if quantization := manifest.get("quantization"):
        from rotaq.quantizers.structure import install_quantization_structure

        install_quantization_structure(model, family, quantization)
