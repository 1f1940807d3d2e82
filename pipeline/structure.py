"""Rebuild the non-standard modules a stage folder needs before its weights are loaded.

A rotated model is a plain transformers model plus online rotations; later stages add their own
sections to the manifest. Each section is installed here, in pipeline order.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from pipeline.families import DecoderFamily


def install_structure(model: nn.Module, family: DecoderFamily, manifest: dict[str, Any]) -> None:
    if rotation := manifest.get("rotation"):
        from rotations.rotate import install_rotation_structure

        install_rotation_structure(model, rotation)
