"""Quantization one decoder layer at a time: read a layer from the memory-mapped folder, quantize it (RTN, or
GPTQ on the calibration inputs that reach it), write its fake-quant weights and its codes, let it go.

The same per-layer functions as `quantize_model` run in the same order on the same float32 tensors, so for a
float32 folder both files are byte-for-byte the whole-model path's (tests/test_streamed_quantization.py).
Peak memory is one layer in float32, the embedding matrix and the calibration activations (GPTQ), instead of
the whole model in float32: the GPTQ stage of a Qwen2.5-1.5B shape held 13.7 GB that way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rotaq.pipeline.families import DecoderFamily, check_family_layout, decoder_layers
from rotaq.pipeline.progress import progress_bar
from rotaq.pipeline.streamed_model import empty_model, load_module, release_module, write_module
from rotaq.pipeline.structure import install_structure
from rotaq.pipeline.tensor_files import AppendedSafetensorsWriter, StreamedSafetensorsWriter, TensorFiles
from rotaq.quantizers.calibration import capture_first_layer_inputs, inputs_on
from rotaq.quantizers.quantize_model import QuantizeSettings, _quantize_layer, decoder_layer_specs, quantize_head
from rotaq.quantizers.rtn import QuantizedWeight


def streaming_problem(model: torch.nn.Module, family: DecoderFamily, manifest: dict[str, Any] | None) -> str | None:
    """Why a folder is quantized whole instead (LoR2C side paths run across layers; a tied head is shared)."""
    if manifest and (manifest.get("side_paths") or manifest.get("adapters")):
        return "its LoR2C side paths span layers"
    if model.get_submodule(family.lm_head).weight is model.get_submodule(family.embed_tokens).weight or \
            getattr(model.config, "tie_word_embeddings", False):
        return "its lm_head is tied to the embeddings"
    return None


@torch.no_grad()
def quantize_streamed(files: TensorFiles, model: torch.nn.Module, family: DecoderFamily, settings: QuantizeSettings,
                      windows: torch.Tensor | None, weights_path: Path, codes_path: Path,
                      codes_tensors: Any, device: torch.device = torch.device("cpu")) -> dict[str, dict]:
    """Write the fake-quant weights to `weights_path` and the codes to `codes_path`; returns the layer specs
    for the manifest. `model` is the folder's empty model with its structure installed (`streamable_model`).
    Each layer is quantized on `device`; GPTQ's layer-0 inputs are captured on the CPU, where the skeleton's
    buffers are, and move there."""
    scheme = settings.scheme
    layout = {name: (torch.float32 if files.layout(name)[0].is_floating_point else files.layout(name)[0],
                     files.layout(name)[1]) for name in model.state_dict()}
    layer_specs = decoder_layer_specs(scheme, family, model)
    specs: dict[str, dict] = {}
    embed_prefix = f"{family.embed_tokens}."
    with StreamedSafetensorsWriter(weights_path, layout, {"format": "pt"}) as weights, \
            AppendedSafetensorsWriter(codes_path) as codes:
        embed = model.get_submodule(family.embed_tokens)
        inputs = None
        if settings.weights == "gptq":
            load_module(embed, embed_prefix, files)
            embed.float()
            inputs = inputs_on(capture_first_layer_inputs(model, family, windows, settings.batch_size), device)
            release_module(embed)
        layers = decoder_layers(model, family)
        bar = progress_bar(layers, desc=f"quantize {scheme.name} ({settings.weights})", disable=not settings.progress)
        for index, layer in enumerate(bar):
            prefix = f"{family.layers}.{index}."
            load_module(layer, prefix, files)
            layer.to(device).float()
            layer_codes = _quantize_layer(layer, index, layer_specs, inputs, None, settings, family)
            write_module(layer, prefix, weights)
            _write_codes(codes, codes_tensors, {f"{prefix}{path}": quantized for path, quantized in layer_codes.items()})
            specs.update({f"{prefix}{path}": layer_specs[path].to_dict() for path in layer_codes})
            release_module(layer)
        norm = model.get_submodule(family.final_norm)
        load_module(norm, f"{family.final_norm}.", files)
        write_module(norm.float(), f"{family.final_norm}.", weights)
        for path in (family.embed_tokens, family.lm_head):  # one vocabulary-sized matrix at a time
            load_module(model.get_submodule(path), f"{path}.", files)
            model.get_submodule(path).to(device).float()
            head_codes: dict[str, QuantizedWeight] = {}
            if scheme.lm_head_bits is not None:
                quantize_head(model, family, scheme, path, head_codes, specs)
            write_module(model.get_submodule(path), f"{path}.", weights)
            _write_codes(codes, codes_tensors, head_codes)
            release_module(model.get_submodule(path))
    return specs


def _write_codes(writer: AppendedSafetensorsWriter, codes_tensors: Any, codes: dict[str, QuantizedWeight]) -> None:
    for name, tensor in codes_tensors(codes).items():
        writer.write(name, tensor)


def streamable_model(config: Any, family: DecoderFamily, manifest: dict[str, Any] | None) -> torch.nn.Module:
    model = empty_model(config)
    check_family_layout(model, family)
    install_structure(model, family, manifest or {})
    return model
