"""Put per-linear adapters (LoRA, ResLoRA) into a model, find them again, and take them out; and the
functions every stage calls for the adapters of either kind (state dict, trainable parameters).

`InstalledAdapters` is the per-linear kind's `InstalledAdapter` (adapters/kinds.py);
`install_adapter_structure` (there) is what `rotaq.pipeline.structure` calls for a manifest with an
'adapters' section: it rebuilds the adapter modules (their tensors come from model.safetensors right after).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from rotaq.adapters.chain import ProjectionChain, refuse_reentrant_checkpointing
from rotaq.adapters.config import LORA, AdapterConfig
from rotaq.adapters.kinds import attach, detach, refuse_installed, required_adapter
from rotaq.adapters.layers import AdaptedLinear, LowRankAdapter
from rotaq.adapters.qat import FakeQuantizers
from rotaq.pipeline.errors import ArtifactError, RotaqError
from rotaq.pipeline.families import DecoderFamily, decoder_layers, set_submodule


@dataclass
class InstalledAdapters:
    """The adapters of one model: their configuration, one chain per projection type, the reset hook."""

    config: AdapterConfig
    family: DecoderFamily
    chains: dict[str, ProjectionChain]
    decoder_layers: nn.ModuleList
    reset_hook: RemovableHandle | None = None

    def start_forward(self, model: nn.Module, args: tuple) -> None:
        """Forward pre-hook of the whole model: a new pass sees no inputs of the previous one."""
        if self.config.has_shortcuts and model.training:
            refuse_reentrant_checkpointing(self.decoder_layers)
        for chain in self.chains.values():
            chain.clear()

    def adapted_linears(self) -> Iterator[tuple[str, AdaptedLinear]]:
        """(model path, layer) for every adapted linear, layer by layer in execution order."""
        for index, layer in enumerate(self.decoder_layers):
            for projection in self.chains:
                yield f"{self.family.layers}.{index}.{projection}", layer.get_submodule(projection)

    def track_input_norms(self, enabled: bool) -> None:
        for chain in self.chains.values():
            chain.track_input_norms = enabled

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for _, linear in self.adapted_linears() for p in linear.adapter.parameters()]

    def named_tensors(self, model: nn.Module) -> dict[str, Tensor]:
        return {f"{path}.adapter.{name}": tensor.detach() for path, linear in self.adapted_linears()
                for name, tensor in linear.adapter.state_dict().items()}

    def describe(self) -> dict[str, Any]:
        """Nothing beyond the config: the adapters sit on the configured targets of every layer."""
        return {}

    def rebuild(self, structure: dict[str, Any]) -> None:
        if structure:
            raise ArtifactError(f"{self.config.kind} adapters have no structure to rebuild, got {sorted(structure)}")

    def change_steps(self, total_steps: int) -> list[int]:
        return []

    def change_structure(self) -> dict[str, Any]:
        raise RotaqError(f"{self.config.kind} has no structure changes")

    def side_paths(self) -> list[nn.Module]:
        return []  # everything folds into the weights on merge

    def layer_by_layer(self) -> AbstractContextManager[None]:
        """The adapters live inside the linears, so layer-at-a-time execution applies them as it is."""
        return nullcontext()


def install_adapters(model: nn.Module, family: DecoderFamily, config: AdapterConfig,
                     seed: int = 0) -> InstalledAdapters:
    """Wrap every target linear of every decoder layer; A is Kaiming-initialised from `seed`, B is zero.

    Everything is checked before the first module is replaced, so a bad configuration leaves the model as it was.
    """
    refuse_installed(model, "this model already has adapters; merge them first (rotaq merge)")
    layers = decoder_layers(model, family)
    _check_targets(layers, config)
    fake_quantizers = FakeQuantizers(config.qat, config.qat_act_clip_ratio) if config.qat else None
    generator = torch.Generator().manual_seed(seed)
    chains = {projection: ProjectionChain(projection, config) for projection in config.targets}
    for index, layer in enumerate(layers):
        for projection, chain in chains.items():
            linear = layer.get_submodule(projection)
            if fake_quantizers is not None:
                fake_quantizers.check_layer(linear.in_features, f"{family.layers}.{index}.{projection}")
            adapter = LowRankAdapter(linear.in_features, linear.out_features, config.rank, config.dropout,
                                     dtype=linear.weight.dtype)
            adapter.reset_parameters(generator)
            adapter.to(linear.weight.device)
            adapted = AdaptedLinear.wrap(linear, adapter, chain, index)
            adapted.fake_quantizers = fake_quantizers
            set_submodule(layer, projection, adapted)
            chain.adapters.append(adapter)
    installed = InstalledAdapters(config, family, chains, layers)
    installed.reset_hook = model.register_forward_pre_hook(installed.start_forward)
    attach(model, installed)
    return installed


def _check_targets(layers: nn.ModuleList, config: AdapterConfig) -> None:
    """Rank within every target's width; equal shapes across layers, since adapters of layers mix."""
    for projection in config.targets:
        shapes = set()
        for layer in layers:
            linear = layer.get_submodule(projection)
            if not isinstance(linear, nn.Linear):
                raise RotaqError(f"{projection} is a {type(linear).__name__}, not a linear layer; cannot adapt it")
            if config.rank > min(linear.in_features, linear.out_features):
                raise RotaqError(f"--rank {config.rank} is larger than the width of {projection} "
                                 f"({linear.in_features} → {linear.out_features})")
            shapes.add((linear.in_features, linear.out_features))
        if len(shapes) > 1 and config.kind != LORA:
            raise RotaqError(f"{config.kind} mixes layers, but {projection} has different shapes across layers")


def install_per_linear_structure(model: nn.Module, family: DecoderFamily, section: dict[str, Any]) -> InstalledAdapters:
    """Rebuild the adapter modules a finetune folder describes; their tensors are loaded afterwards."""
    return install_adapters(model, family, AdapterConfig.from_section(section))


def per_linear_adapters(model: nn.Module) -> InstalledAdapters:
    """The per-linear adapters `install_adapters` put into `model`, or a clear error if it has none."""
    installed = required_adapter(model)
    if not isinstance(installed, InstalledAdapters):
        raise ArtifactError(f"the model holds {installed.config.kind} paths, not per-linear adapters")
    return installed


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Every adapter tensor (or LoR2C tensor), under its name in the model's state dict."""
    return required_adapter(model).named_tensors(model)


@torch.no_grad()
def load_adapter_state(model: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Copy adapter tensors in; every adapter tensor must be given, and nothing else."""
    expected = adapter_state_dict(model)
    if set(tensors) != set(expected):
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise ArtifactError(f"adapter tensors do not match the model (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]})")
    for name, tensor in tensors.items():
        expected[name].copy_(tensor)


def mark_only_adapters_trainable(model: nn.Module) -> list[nn.Parameter]:
    """Freeze the base model; return the adapter parameters, in a fixed order, for the optimizer."""
    model.requires_grad_(False)
    parameters = required_adapter(model).trainable_parameters()
    for parameter in parameters:
        parameter.requires_grad_(True)
    return parameters


def set_fake_quantization(model: nn.Module, scheme_name: str | None) -> None:
    """Turn QAT fake quantization of the adapted linears on (a scheme name) or off (None)."""
    fake_quantizers = FakeQuantizers(scheme_name) if scheme_name else None
    for _, linear in per_linear_adapters(model).adapted_linears():
        linear.fake_quantizers = fake_quantizers


def remove_adapters(model: nn.Module, merged_weights: dict[str, Tensor]) -> None:
    """Replace every adapted linear by its base module carrying `merged_weights[path]`; drop the hook.

    Callers check the weights first (rotaq.adapters.merge.check_merged_weights): this step only rewires modules.
    """
    installed = per_linear_adapters(model)
    for path, linear in list(installed.adapted_linears()):
        set_submodule(model, path, linear.base_layer(merged_weights[path]))
    installed.reset_hook.remove()
    detach(model)
