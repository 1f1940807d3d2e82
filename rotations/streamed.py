"""The rotation one decoder layer at a time: read a layer from the memory-mapped source, rotate it, write it.

Peak memory is one layer (twice, with the check) plus the embedding matrix, instead of the whole model in
float32 and a copy of it for the check: the rotate stage of a Qwen2.5-1.5B shape held 16.4 GB that way
(docs/pipeline.md's scale table). Every tensor keeps its source dtype, so a bf16 model stays bf16.

The weights are those of `rotate_model` (both call `rotate_decoder_layer` and `rotate_head`): for a float32
source the file is byte-for-byte the whole-model path's (tests/test_streamed_rotation.py). The check runs the
original and the rotated layers side by side in float32 on the check prompt, each feeding the next layer, and
compares the final logits, so it measures what the whole-model check measures in time linear in the layers.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rotaq.pipeline.errors import RotaqError
from rotaq.pipeline.families import DecoderFamily, check_family_layout, decoder_layers
from rotaq.pipeline.progress import progress_bar
from rotaq.pipeline.streamed_model import empty_model, load_module, release_module, write_module
from rotaq.pipeline.tensor_files import StreamedSafetensorsWriter, TensorFiles
from rotaq.quantizers.calibration import (LayerInputs, advanced, capture_first_layer_inputs, float32_inputs,
                                         inputs_on)
from rotaq.rotations.rotate import (CANNOT_ROTATE, RotationConfig, head_rotation_matrix, layer_online_specs,
                                    max_relative_error, online_rotation_specs, residual_rotation_matrix,
                                    rotate_decoder_layer, rotate_head, rotate_weight_rows, rotation_section)

logger = logging.getLogger(__name__)


def streaming_problem(files: TensorFiles, model: nn.Module, family: DecoderFamily) -> str | None:
    """Why this source cannot be rotated layer by layer (tensors stored under names its modules do not have,
    as some older checkpoints do), or None."""
    stored = set(files.names())
    tied_head = f"{family.lm_head}.weight"
    missing = [name for name in model.state_dict() if name not in stored and name != tied_head]
    if missing:
        return f"its safetensors do not hold {missing[0]} under that name"
    if tied_head not in stored and not _is_tied(model, family):
        return f"its safetensors do not hold {tied_head}"
    return None


def _is_tied(model: nn.Module, family: DecoderFamily) -> bool:
    """Whether lm_head is the embedding (the config says so; a skeleton on the meta device may not share it)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return bool(getattr(config, "tie_word_embeddings", False)) or \
        model.get_submodule(family.lm_head).weight is model.get_submodule(family.embed_tokens).weight


def output_layout(files: TensorFiles, model: nn.Module, family: DecoderFamily) -> dict[str, tuple[torch.dtype, tuple]]:
    """Every tensor of the rotated model with its source dtype and shape; an untied lm_head of its own."""
    embed_name, head_name = f"{family.embed_tokens}.weight", f"{family.lm_head}.weight"
    stored = set(files.names())
    return {name: files.layout(embed_name if name == head_name and name not in stored else name)
            for name in model.state_dict()}


@torch.no_grad()
def rotate_streamed(files: TensorFiles, hf_config: Any, family: DecoderFamily, config: RotationConfig,
                    weights_path: Path, check_tokens: torch.Tensor | None, progress: bool = False,
                    device: torch.device = torch.device("cpu")) -> dict[str, Any]:
    """Write the rotated weights of the model in `files` to `weights_path`; returns the manifest's rotation
    section, with the check's logit error when `check_tokens` is given. Each module is rotated (and checked)
    on `device`; the check's first-layer inputs are captured on the CPU, where the skeleton's buffers are."""
    model = empty_model(hf_config)
    check_family_layout(model, family)
    family.check_norm_kind(CANNOT_ROTATE)
    if problem := streaming_problem(files, model, family):
        raise RotaqError(f"cannot rotate this model layer by layer: {problem}")
    hidden_size = model.get_submodule(family.embed_tokens).weight.shape[1]
    rotation = residual_rotation_matrix(hidden_size, config).to(device)
    online_specs = online_rotation_specs(model, family, config) if config.online else {}
    head_rotation = head_rotation_matrix(family.head_dim(model.config), config)
    if head_rotation is not None:
        head_rotation = head_rotation.to(device)
    tied = _is_tied(model, family)
    embed_prefix, head_prefix = f"{family.embed_tokens}.", f"{family.lm_head}."
    layers = decoder_layers(model, family)

    with StreamedSafetensorsWriter(weights_path, output_layout(files, model, family), {"format": "pt"}) as writer:
        embed = model.get_submodule(family.embed_tokens)
        load_module(embed, embed_prefix, files)
        original = _check_inputs(model, family, check_tokens, device)
        rotate_weight_rows(embed.to(device), rotation)
        embed.cpu()  # the skeleton's forward (its rotary buffers) runs on the CPU
        rotated = _check_inputs(model, family, check_tokens, device)
        write_module(embed, embed_prefix, writer)
        release_module(embed)

        for index, layer in enumerate(progress_bar(layers, desc="rotate", unit="layer", disable=not progress)):
            prefix = f"{family.layers}.{index}."
            load_module(layer, prefix, files)
            layer.to(device)
            if original is not None:
                original = advanced(original, copy.deepcopy(layer).float())
            rotate_decoder_layer(layer, family, rotation, layer_online_specs(online_specs, family, index), head_rotation)
            write_module(layer, prefix, writer)
            if rotated is not None:
                rotated = advanced(rotated, layer.float())
            release_module(layer)

        norm, head = model.get_submodule(family.final_norm), model.get_submodule(family.lm_head)
        load_module(norm, f"{family.final_norm}.", files)
        load_module(head, head_prefix, files, {f"{head_prefix}weight": f"{embed_prefix}weight"} if tied else None)
        norm.to(device), head.to(device)
        expected = _logits(norm, head, original) if original is not None else None
        rotate_head(model, family, rotation)
        write_module(norm, f"{family.final_norm}.", writer)
        write_module(head, head_prefix, writer)
        actual = _logits(norm, head, rotated) if rotated is not None else None

    section = rotation_section(config, hidden_size, online_specs, head_rotations=head_rotation is not None)
    if expected is not None:
        section["check"] = {"tokens": int(check_tokens.shape[-1]), "layer_by_layer": True,
                            "max_relative_logit_error": max_relative_error(actual, expected)}
    return section


def _check_inputs(model: nn.Module, family: DecoderFamily, tokens: torch.Tensor | None,
                  device: torch.device) -> LayerInputs | None:
    """The check's float32 layer-0 inputs on `device`, captured on the CPU, where the skeleton's buffers are."""
    if tokens is None:
        return None
    return inputs_on(float32_inputs(capture_first_layer_inputs(model, family, tokens, 1)), device)


def _logits(norm: nn.Module, head: nn.Module, inputs: LayerInputs, rows_at_once: int = 8192) -> torch.Tensor:
    """Float32 logits, lm_head's rows cast a chunk at a time: a float32 copy of a 150k-row vocabulary is GBs."""
    hidden = copy.deepcopy(norm).float()(inputs.hidden_states[0])
    weight = head.weight
    return torch.cat([hidden @ weight[start:start + rows_at_once].float().T
                      for start in range(0, weight.shape[0], rows_at_once)], dim=-1)
