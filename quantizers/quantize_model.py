"""Quantize a whole model in memory: every decoder linear by the scheme, lm_head and embeddings at 8 bits.

Returns the integer codes of every quantized tensor and leaves the model as its fake-quant twin
(dequantized weights, activation fake-quant in each `QuantizedLinear`), so one pass gives both the
model that is scored and the codes that are exported.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from rotaq.pipeline.progress import progress_bar

from rotaq.adapters.kinds import installed_adapter
from rotaq.pipeline.errors import RotaqError
from rotaq.pipeline.families import DecoderFamily, decoder_layers
from rotaq.quantizers.calibration import (
    LayerInputs,
    StopForward,
    capture_first_layer_inputs,
    recording_inputs,
    run_layer,
    run_layer_until_stopped,
)
from rotaq.quantizers.gptq import HessianAccumulator, gptq_quantize
from rotaq.quantizers.linear import (  # noqa: F401  (activation_block, kv_cache_spec: imported from here too)
    LayerQuantSpec,
    QuantizedLinear,
    activation_block,
    decoder_layer_spec,
    decoder_layer_specs,
    kv_cache_spec,
)
from rotaq.quantizers.rtn import QuantizedWeight, quantize_weight_rtn
from rotaq.quantizers.schemes import QuantScheme
from rotaq.quantizers.structure import install_quantized_linear

if TYPE_CHECKING:
    from rotaq.adapters.lor2c_layer_by_layer import LayerByLayer

WEIGHT_METHODS = ("rtn", "gptq")


@dataclass(frozen=True)
class QuantizeSettings:
    scheme: QuantScheme
    weights: str = "gptq"
    act_order: bool = True
    damp_percent: float = 0.01
    # Hessians from the fake-quantized inputs the deployed layer will see (a GPTQ lever for W4A4).
    hessian_from_quantized_inputs: bool = True
    true_sequential: bool = True
    batch_size: int = 4
    progress: bool = True

    def __post_init__(self) -> None:
        if self.weights not in WEIGHT_METHODS:
            raise RotaqError(f"unknown weight quantizer '{self.weights}'; choose one of {', '.join(WEIGHT_METHODS)}")


# The lm_head's input is quantized to int8 per block of 64, as ONNX Runtime's 8-bit MatMulNBits
# computes it at accuracy_level 4: at accuracy_level 0 (float activations) that kernel has no fast
# path for 8-bit weights and dequantizes the whole head on every call (measured: 142 ms per decode
# step for SmolLM2's 49152 x 576 head, against 0.7 ms at level 4).
LM_HEAD_ACT_BLOCK = 64


def head_spec(bits: int, quantize_input: bool = False) -> LayerQuantSpec:
    """lm_head and embeddings: per-channel (per-row) symmetric weights; the lm_head's input in int8
    per block as its kernel computes it, the embedding table's lookups in float."""
    if quantize_input:
        return LayerQuantSpec(weight_bits=bits, group_size=None, weight_symmetric=True, act_bits=8,
                              act_block_size=LM_HEAD_ACT_BLOCK)
    return LayerQuantSpec(weight_bits=bits, group_size=None, weight_symmetric=True, act_bits=16)


def _sequential_groups(family: DecoderFamily, true_sequential: bool) -> list[tuple[str, ...]]:
    if not true_sequential:
        return [family.decoder_linears]
    return [family.attention_inputs, (family.attention_output,), family.mlp_inputs, (family.mlp_output,)]


@torch.no_grad()
def _set_dequantized(module: nn.Module, quantized: QuantizedWeight) -> None:
    weight = module.weight.data
    if weight.dtype == torch.float32 and weight.shape == quantized.shape and weight.is_contiguous():
        quantized.dequantize(out=weight)  # in place: a vocabulary-sized head is not copied
    else:
        module.weight.data = quantized.dequantize().to(weight.dtype).reshape(weight.shape)


def _quantize_rtn(module: nn.Module, spec: LayerQuantSpec, scheme: QuantScheme, name: str) -> QuantizedWeight:
    return quantize_weight_rtn(module.weight.detach(), spec.weight_bits, spec.group_size, spec.weight_symmetric,
                               scheme.weight_clip_search, layer_name=name, allow_ragged=scheme.ragged_groups)


@torch.no_grad()
def _quantize_layer_gptq(layer: nn.Module, prefix: str, wrapped: dict[str, QuantizedLinear],
                         inputs, settings: QuantizeSettings, family: DecoderFamily) -> dict[str, QuantizedWeight]:
    """GPTQ each group of a layer in execution order, with Hessians from the layer's current state.

    Groups are in execution order, so each pass stops once the group's last projection has seen its input.
    """
    results: dict[str, QuantizedWeight] = {}
    for group in _sequential_groups(family, settings.true_sequential):
        modules = {path: wrapped[path] for path in group}
        accumulators = {path: HessianAccumulator(m.in_features, f"{prefix}.{path}", device=m.weight.device)
                        for path, m in modules.items()}

        def record(path: str, module: QuantizedLinear, hidden_states: torch.Tensor) -> None:
            x = module.matmul_input(hidden_states)
            accumulators[path].add_batch(module.quantize_input(x) if settings.hessian_from_quantized_inputs else x)
            if path == group[-1]:
                raise StopForward

        with recording_inputs(modules, record):
            run_layer_until_stopped(layer, inputs)
        for path, module in modules.items():
            spec = module.spec
            results[path] = gptq_quantize(module.weight.detach(), accumulators[path].hessian, spec.weight_bits,
                                          spec.group_size, spec.weight_symmetric, settings.act_order,
                                          settings.damp_percent, clip_search=settings.scheme.weight_clip_search,
                                          layer_name=f"{prefix}.{path}",
                                          allow_ragged=settings.scheme.ragged_groups)
            _set_dequantized(module, results[path])
    return results


@torch.no_grad()
def quantize_model(model: nn.Module, family: DecoderFamily, settings: QuantizeSettings,
                   calibration_windows: torch.Tensor | None) -> tuple[dict[str, QuantizedWeight], dict[str, dict]]:
    """Quantize `model` in place; returns (codes per layer path, layer spec per path for the manifest)."""
    scheme = settings.scheme
    if settings.weights == "gptq" and (calibration_windows is None or calibration_windows.numel() == 0):
        raise RotaqError("GPTQ needs calibration data, and the calibration set is empty")
    codes: dict[str, QuantizedWeight] = {}
    specs: dict[str, dict] = {}
    layers = decoder_layers(model, family)
    inputs = (capture_first_layer_inputs(model, family, calibration_windows, settings.batch_size)
              if settings.weights == "gptq" else None)
    layer_specs = decoder_layer_specs(scheme, family, model)
    adapters = installed_adapter(model)  # a merged LoR2C model keeps its side paths
    with adapters.layer_by_layer() if adapters is not None and inputs is not None else nullcontext() as runner:
        bar = progress_bar(layers, desc=f"quantize {scheme.name} ({settings.weights})", disable=not settings.progress)
        for index, layer in enumerate(bar):
            layer_codes = _quantize_layer(layer, index, layer_specs, inputs, runner, settings, family)
            for path, quantized in layer_codes.items():
                codes[f"{family.layers}.{index}.{path}"] = quantized
                specs[f"{family.layers}.{index}.{path}"] = layer_specs[path].to_dict()
    if scheme.lm_head_bits is not None:
        _quantize_heads(model, family, scheme, codes, specs)
    return codes, specs


def _quantize_layer(layer: nn.Module, index: int, layer_specs: dict[str, LayerQuantSpec], inputs: LayerInputs | None,
                    side_paths: LayerByLayer | None, settings: QuantizeSettings,
                    family: DecoderFamily) -> dict[str, QuantizedWeight]:
    """Quantize one decoder layer's linears; with GPTQ, also move the calibration inputs past the layer (and
    add the LoR2C side paths that end there, whose inputs layer-at-a-time execution has to keep itself)."""
    prefix = f"{family.layers}.{index}"
    wrapped = {path: install_quantized_linear(layer, path, layer_specs[path]) for path in family.decoder_linears}
    if inputs is not None:
        if side_paths is not None:
            side_paths.before_layer(index, inputs.hidden_states)
        layer_codes = _quantize_layer_gptq(layer, prefix, wrapped, inputs, settings, family)
        inputs.hidden_states = run_layer(layer, inputs)
        if side_paths is not None:
            inputs.hidden_states = side_paths.after_layer(index, inputs.hidden_states)
        return layer_codes
    layer_codes = {}
    for path, module in wrapped.items():
        layer_codes[path] = _quantize_rtn(module, module.spec, settings.scheme, f"{prefix}.{path}")
        _set_dequantized(module, layer_codes[path])
    return layer_codes


def _head_specs(family: DecoderFamily, scheme: QuantScheme) -> dict[str, LayerQuantSpec]:
    return {family.embed_tokens: head_spec(scheme.lm_head_bits),
            family.lm_head: head_spec(scheme.lm_head_bits, quantize_input=True)}


def quantize_head(model: nn.Module, family: DecoderFamily, scheme: QuantScheme, path: str,
                  codes: dict[str, QuantizedWeight], specs: dict[str, dict]) -> None:
    """The embedding table or an untied lm_head (`path`): per-row RTN at `lm_head_bits`, one at a time so a
    layer-streamed quantization holds one vocabulary-sized matrix."""
    spec = _head_specs(family, scheme)[path]
    module = model.get_submodule(path)
    codes[path] = _quantize_rtn(module, spec, scheme, path)
    _set_dequantized(module, codes[path])
    specs[path] = spec.to_dict()
    if path == family.lm_head:
        install_quantized_linear(model, family.lm_head, spec)


def _quantize_heads(model: nn.Module, family: DecoderFamily, scheme: QuantScheme,
                    codes: dict[str, QuantizedWeight], specs: dict[str, dict]) -> None:
    """lm_head and the embedding table: per-row RTN at `lm_head_bits` (a tied pair is quantized once)."""
    tied = model.get_submodule(family.lm_head).weight is model.get_submodule(family.embed_tokens).weight
    quantize_head(model, family, scheme, family.embed_tokens, codes, specs)
    if not tied:
        quantize_head(model, family, scheme, family.lm_head, codes, specs)
