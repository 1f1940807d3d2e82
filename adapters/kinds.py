"""The adapter kinds, registered once, and the one interface every stage uses to reach installed adapters.

Two kinds exist. Per-linear adapters (LoRA and the ResLoRA variants, adapters/structure.py) wrap each
target linear and fold into its weight on merge. LoR2C paths (adapters/lor2c_paths.py) span whole decoder
layers: hooks on the layers, structure changes while training, and side paths that survive the merge into
quantize and export. A model holds its installed adapters, of either kind, under one attribute; stages ask
`installed_adapter(model)` and call the `InstalledAdapter` methods, and look a kind up by its type name with
`adapter_kind`, so no stage tests which kind a model holds.

Each kind names its code as "module:attribute" strings, resolved on use (as rotaq.pipeline.structure does),
because the kinds' modules import this one.
"""

from __future__ import annotations

import importlib
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor, nn

from rotaq.adapters.config import ADAPTER_TYPES
from rotaq.adapters.lor2c_config import LOR2C_TYPES
from rotaq.pipeline.errors import ArtifactError, RotaqError
from rotaq.pipeline.families import DecoderFamily

# In vars(model), not a submodule: the adapters' own modules are registered where they sit in the model.
ATTRIBUTE = "rotaq_adapters"


class InstalledAdapter(Protocol):
    """What the stages need from the adapters installed in a model, whatever their kind."""

    config: Any  # AdapterConfig or Lor2cConfig: `kind`, `has_shortcuts`, `to_section()`

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every trainable tensor once, in a fixed order (the optimizer's)."""

    def named_tensors(self, model: nn.Module) -> dict[str, Tensor]:
        """Every trainable tensor under its name in the model's state dict."""

    def describe(self) -> dict[str, Any]:
        """The structure to rebuild before tensors are loaded; {} when the config alone fixes it."""

    def rebuild(self, structure: dict[str, Any]) -> None:
        """Go back to a structure `describe` returned (a checkpoint's)."""

    def change_steps(self, total_steps: int) -> list[int]:
        """The optimizer steps after which `change_structure` runs; a schedule that cannot fit is refused."""

    def change_structure(self) -> dict[str, Any]:
        """One scheduled change; returns what the training log records of it."""

    def track_input_norms(self, enabled: bool) -> None:
        """Measure the input norms that a ResLoRA shortcut merge needs (nothing to measure for other kinds)."""

    def side_paths(self) -> list[nn.Module]:
        """Paths that stay beside the weights after a merge, which quantize and export carry."""

    def layer_by_layer(self) -> AbstractContextManager[Any]:
        """The runner a layer-at-a-time caller (GPTQ) needs to apply the adapters, or None."""


@dataclass(frozen=True)
class AdapterKind:
    name: str
    types: tuple[str, ...]  # the `--adapter` values of this kind
    config: str  # a class with from_options(options, family) and from_section(section)
    install: str  # (model, family, config, seed=) -> InstalledAdapter, zero-effect at first
    install_structure: str  # (model, family, manifest section) -> InstalledAdapter, before tensors load

    def resolve(self, field: str) -> Any:
        module, _, attribute = getattr(self, field).partition(":")
        return getattr(importlib.import_module(module), attribute)


PER_LINEAR = AdapterKind("per-linear", ADAPTER_TYPES, "rotaq.adapters.config:AdapterConfig",
                         "rotaq.adapters.structure:install_adapters", "rotaq.adapters.structure:install_per_linear_structure")
LOR2C_PATHS = AdapterKind("lor2c", LOR2C_TYPES, "rotaq.adapters.lor2c_config:Lor2cConfig",
                          "rotaq.adapters.lor2c_paths:install_lor2c", "rotaq.adapters.lor2c_paths:install_lor2c_structure")
ADAPTER_KINDS = (PER_LINEAR, LOR2C_PATHS)


def adapter_type_names() -> tuple[str, ...]:
    return tuple(name for kind in ADAPTER_KINDS for name in kind.types)


def adapter_kind(type_name: str) -> AdapterKind:
    for kind in ADAPTER_KINDS:
        if type_name in kind.types:
            return kind
    raise RotaqError(f"unknown adapter type '{type_name}'; choose one of {', '.join(adapter_type_names())}")


def install_adapter(model: nn.Module, family: DecoderFamily, config: Any, seed: int = 0) -> InstalledAdapter:
    return adapter_kind(config.kind).resolve("install")(model, family, config, seed=seed)


def install_adapter_structure(model: nn.Module, family: DecoderFamily, section: dict[str, Any]) -> InstalledAdapter:
    """Rebuild the adapters a manifest section describes (finetune 'adapters', merge 'side_paths'); their
    tensors are loaded afterwards."""
    return adapter_kind(section["type"]).resolve("install_structure")(model, family, section)


def installed_adapter(model: nn.Module) -> InstalledAdapter | None:
    """The adapters installed in `model` (either kind), or None."""
    return vars(model).get(ATTRIBUTE)


def required_adapter(model: nn.Module) -> InstalledAdapter:
    installed = installed_adapter(model)
    if installed is None:
        raise ArtifactError("the model has no adapters (nothing to merge); pass a finetune stage folder")
    return installed


def attach(model: nn.Module, installed: InstalledAdapter) -> None:
    vars(model)[ATTRIBUTE] = installed


def refuse_installed(model: nn.Module, message: str) -> None:
    """Before installing anything: a model holds one set of adapters at a time."""
    if installed_adapter(model) is not None:
        raise RotaqError(message)


def detach(model: nn.Module) -> None:
    vars(model).pop(ATTRIBUTE, None)
