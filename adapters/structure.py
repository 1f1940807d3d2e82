"""Put adapters into a model, find them again, and take them out.

`install_adapter_structure` is what `rotaq.pipeline.structure` calls for a manifest with an 'adapters'
section: it rebuilds the adapter modules (their tensors come from model.safetensors right after).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from rotaq.adapters.chain import ProjectionChain, refuse_reentrant_checkpointing
from rotaq.adapters.config import LORA, AdapterConfig
from rotaq.adapters.layers import AdaptedLinear, LowRankAdapter
from rotaq.adapters.lor2c import LOR2C_TYPES, install_lor2c_structure, lor2c_paths
from rotaq.adapters.qat import FakeQuantizers
from rotaq.pipeline.errors import ArtifactError, RotaqError
from rotaq.pipeline.families import DecoderFamily, decoder_layers, set_submodule

_ATTRIBUTE = "rotaq_adapters"


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


def install_adapters(model: nn.Module, family: DecoderFamily, config: AdapterConfig,
                     seed: int = 0) -> InstalledAdapters:
    """Wrap every target linear of every decoder layer; A is Kaiming-initialised from `seed`, B is zero.

    Everything is checked before the first module is replaced, so a bad configuration leaves the model as it was.
    """
    if _ATTRIBUTE in vars(model):
        raise RotaqError("this model already has adapters; merge them first (rotaq merge)")
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
    setattr(model, _ATTRIBUTE, installed)
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


def install_adapter_structure(model: nn.Module, family: DecoderFamily, section: dict[str, Any]) -> None:
    """Rebuild the adapter modules a finetune folder describes; their tensors are loaded afterwards."""
    if section["type"] in LOR2C_TYPES:
        install_lor2c_structure(model, family, section)
    else:
        install_adapters(model, family, AdapterConfig.from_section(section))


def installed_adapters(model: nn.Module) -> InstalledAdapters:
    """The adapters `install_adapters` put into `model`, or a clear error if it has none."""
    installed = vars(model).get(_ATTRIBUTE)
    if installed is None:
        raise ArtifactError("the model has no adapters (nothing to merge); pass a finetune stage folder")
    return installed


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Every adapter tensor (or LoR2C tensor), under its name in the model's state dict."""
    if (paths := lor2c_paths(model)) is not None:
        return paths.named_tensors(model)
    return {f"{path}.adapter.{name}": tensor.detach()
            for path, linear in installed_adapters(model).adapted_linears()
            for name, tensor in linear.adapter.state_dict().items()}


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
    if (paths := lor2c_paths(model)) is not None:
        parameters = list(paths.parameters())
    else:
        parameters = [p for _, linear in installed_adapters(model).adapted_linears()
                      for p in linear.adapter.parameters()]
    for parameter in parameters:
        parameter.requires_grad_(True)
    return parameters


def set_fake_quantization(model: nn.Module, scheme_name: str | None) -> None:
    """Turn QAT fake quantization of the adapted linears on (a scheme name) or off (None)."""
    fake_quantizers = FakeQuantizers(scheme_name) if scheme_name else None
    for _, linear in installed_adapters(model).adapted_linears():
        linear.fake_quantizers = fake_quantizers


def remove_adapters(model: nn.Module, merged_weights: dict[str, Tensor]) -> None:
    """Replace every adapted linear by its base module carrying `merged_weights[path]`; drop the hook.

    Callers check the weights first (rotaq.adapters.merge.check_merged_weights): this step only rewires modules.
    """
    installed = installed_adapters(model)
    for path, linear in list(installed.adapted_linears()):
        set_submodule(model, path, linear.base_layer(merged_weights[path]))
    installed.reset_hook.remove()
    delattr(model, _ATTRIBUTE)
