"""Rebuild the non-standard modules a stage folder needs before its weights are loaded.

A rotated model is a plain transformers model plus online rotations; later stages add their own
manifest sections (adapters, quantization). Each section is installed, in pipeline order, by the
package that owns it. They are named here as strings and imported only when a manifest has the
section: this foundation module must not import the stage packages (tests/test_layers.py).
"""

from __future__ import annotations

import importlib
from typing import Any, NamedTuple

from torch import nn

from rotaq.pipeline.families import DecoderFamily


class Installer(NamedTuple):
    section: str  # the manifest section that needs it
    module: str
    function: str
    takes_family: bool = True  # called as function(model, family, section), else function(model, section)


INSTALLERS = (
    Installer("rotation", "rotaq.rotations.rotate", "install_rotation_structure", takes_family=False),
    Installer("adapters", "rotaq.adapters.kinds", "install_adapter_structure"),
    Installer("side_paths", "rotaq.adapters.kinds", "install_adapter_structure"),  # what LoR2C leaves after a merge
    Installer("quantization", "rotaq.quantizers.structure", "install_quantization_structure"),
)


def install_structure(model: nn.Module, family: DecoderFamily, manifest: dict[str, Any]) -> None:
    for installer in INSTALLERS:
        section = manifest.get(installer.section)
        if not section:
            continue
        install = getattr(importlib.import_module(installer.module), installer.function)
        if installer.takes_family:
            install(model, family, section)
        else:
            install(model, section)
