"""Run a model one decoder layer at a time on calibration windows.

GPTQ needs each layer's inputs as the quantized model will produce them: we capture the inputs of
layer 0 once, then feed each layer's (already quantized) outputs to the next. Only one layer's
activations are alive at a time, so memory stays bounded by the calibration set, not the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rotaq.pipeline.families import DecoderFamily, decoder_layers


class StopForward(Exception):
    """Raised by a hook once it has what it needs: the rest of the forward pass is skipped."""


@dataclass
class LayerInputs:
    """Per batch: the hidden states entering a layer and the keyword arguments the model passed it."""

    hidden_states: list[torch.Tensor]
    layer_kwargs: list[dict[str, Any]]


@torch.no_grad()
def capture_first_layer_inputs(model: nn.Module, family: DecoderFamily, windows: torch.Tensor,
                               batch_size: int) -> LayerInputs:
    first_layer = decoder_layers(model, family)[0]
    captured = LayerInputs([], [])

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.hidden_states.append(args[0] if args else kwargs.pop("hidden_states"))
        captured.layer_kwargs.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise StopForward

    handle = first_layer.register_forward_pre_hook(hook, with_kwargs=True)
    device = model.get_input_embeddings().weight.device
    try:
        for start in range(0, windows.shape[0], batch_size):
            try:
                model(input_ids=windows[start:start + batch_size].to(device), use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: LayerInputs) -> list[torch.Tensor]:
    outputs = []
    for hidden_states, kwargs in zip(inputs.hidden_states, inputs.layer_kwargs):
        output = layer(hidden_states, **kwargs)
        outputs.append(output[0] if isinstance(output, tuple) else output)
    return outputs


def float32_inputs(inputs: LayerInputs) -> LayerInputs:
    """The captured layer-0 inputs in float32, so a bf16 model is checked against itself in float32."""
    return _mapped(inputs, lambda tensor: tensor.float() if tensor.is_floating_point() else tensor)


def inputs_on(inputs: LayerInputs, device: torch.device) -> LayerInputs:
    """The captured inputs (hidden states, masks, position embeddings) on `device`."""
    return _mapped(inputs, lambda tensor: tensor.to(device))


def _mapped(inputs: LayerInputs, convert: Callable[[torch.Tensor], torch.Tensor]) -> LayerInputs:
    def apply(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return convert(value)
        return tuple(apply(v) for v in value) if isinstance(value, tuple) else value

    return LayerInputs([convert(h) for h in inputs.hidden_states],
                       [{key: apply(value) for key, value in kwargs.items()} for kwargs in inputs.layer_kwargs])


def advanced(inputs: LayerInputs, layer: nn.Module) -> LayerInputs:
    """The next layer's inputs: this layer's outputs, with the same masks and position embeddings."""
    return LayerInputs(run_layer(layer, inputs), inputs.layer_kwargs)


@torch.no_grad()
def run_layer_until_stopped(layer: nn.Module, inputs: LayerInputs) -> None:
    """Feed every batch to `layer` for its hooks' sake; a hook may end a batch early with StopForward."""
    for hidden_states, kwargs in zip(inputs.hidden_states, inputs.layer_kwargs):
        try:
            layer(hidden_states, **kwargs)
        except StopForward:
            pass


@contextmanager
def recording_inputs(modules: dict[str, nn.Module],
                     record: Callable[[str, nn.Module, torch.Tensor], None]) -> Iterator[None]:
    """Call `record(name, module, input)` on every forward of the given modules, hooks removed after."""
    handles = [module.register_forward_pre_hook(lambda m, args, n=name: record(n, m, args[0]))
               for name, module in modules.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
