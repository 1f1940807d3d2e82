"""The fused export one decoder layer at a time: read a layer (and its codes) from the memory-mapped stage
folder, check it, emit its nodes, spill its initializers to model.onnx.data, let it go.

The whole-model export holds the model in float32, the export forward's transposed copy of every weight, each
kernel's dequantized reference and the whole ONNX graph with its initializers: 18 GB for a W4A8 Qwen2.5-1.5B
shape before it was stopped. Here the same `FusedBuilder` steps run on one `DecoderLayer` at a time, built by
the same class from the same tensors, and `SpilledInitializers` writes each step's tensors as `save_graph`
would, so model.onnx and model.onnx.data are byte-for-byte the whole-model export's
(tests/test_streamed_export.py).

The checks are the whole-model export's, computed as the layers pass: the HF model and the export forward
run side by side on the check sequences (each feeding its own next layer), giving the "graph vs model" logits
and the PyTorch prefill logits ONNX Runtime is later held against; each quantized linear is run alone in ONNX
Runtime on the inputs it sees there. onnxruntime-genai's greedy tokens are compared with ONNX Runtime's own
on the written graph (the PyTorch greedy reference would need the whole model once per token).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rotaq.export.checks import captured_matmul_inputs, check_quantized_modules, quantized_modules
from rotaq.export.fused_graph import FusedBuilder, fused_layout_problem
from rotaq.export.graph_module import DecoderGraph, DecoderLayer, ExportLinear, RMSNorm
from rotaq.export.onnx_export import SpilledInitializers, save_graph
from rotaq.export.quantized import emitters_for, quantized_weights
from rotaq.pipeline.families import DecoderFamily, decoder_layers
from rotaq.pipeline.loading import WeightsFolder
from rotaq.pipeline.progress import progress_bar
from rotaq.pipeline.streamed_model import load_module, release_module
from rotaq.pipeline.tensor_files import TensorFiles
from rotaq.quantizers.calibration import advanced, capture_first_layer_inputs, float32_inputs
from rotaq.quantizers.streamed import streamable_model


def streaming_problem(weights: WeightsFolder, model: nn.Module, family: DecoderFamily,
                      graph: DecoderGraph) -> str | None:
    """Why this folder is exported whole instead, or None."""
    manifest = weights.manifest or {}
    if manifest.get("side_paths") or manifest.get("adapters"):
        return "its LoR2C side paths span layers"
    if graph.lm_head is None or getattr(model.config, "tie_word_embeddings", False):
        return "its lm_head is tied to the embeddings"
    stored = set(TensorFiles(weights.folder).names())
    if missing := [name for name in model.state_dict() if name not in stored]:
        return f"its safetensors do not hold {missing[0]} under that name"
    return fused_layout_problem(graph)


def streamed_skeleton(weights: WeightsFolder, family: DecoderFamily) -> tuple[nn.Module, DecoderGraph]:
    """The folder's model with no parameter memory (its structure installed) and the export forward over it,
    which knows the graph's shapes, online rotations and layer traits before any weight is read."""
    model = streamable_model(weights.config, family, weights.manifest)
    return model, DecoderGraph(model, family).eval()


@dataclass
class StreamedExport:
    """What the pass measured, for the export's checks and manifest."""

    graph_logits: torch.Tensor  # the export forward's prefill logits of the check sequences
    model_logits: torch.Tensor  # the HF model's
    linears: dict[str, dict[str, Any]] = field(default_factory=dict)  # path → kernel description
    quantized_layers_max_rel_error: float | None = None


@torch.no_grad()
def export_streamed(weights: WeightsFolder, model: nn.Module, graph: DecoderGraph, family: DecoderFamily,
                    folder: Path, context_length: int, tokens: torch.Tensor, progress: bool = True) -> StreamedExport:
    """Write folder/model.onnx (+ model.onnx.data) layer by layer; returns the checks' measurements."""
    files = TensorFiles(weights.folder)
    section = (weights.manifest or {}).get("quantization") or {}
    builder = FusedBuilder(graph, context_length)
    spilled = SpilledInitializers(folder)
    pass_ = _Pass(weights, model, section)

    embed = pass_.load(family.embed_tokens, files)
    model_inputs = float32_inputs(capture_first_layer_inputs(model, family, tokens, tokens.shape[0]))
    graph.use_embedding(embed.weight, pass_.codes([family.embed_tokens]).get(family.embed_tokens))
    hidden = graph.embed(tokens)
    builder.begin()
    spilled.spill(builder.emission.initializers)
    release_module(embed)
    graph.use_embedding(embed.weight, None)  # the empty one again

    mask = torch.ones_like(tokens)
    cos, sin = graph.rope_tables(mask, 0)
    masks = graph.attention_masks(mask, tokens.shape[1], 0)
    shape = graph.shape
    empty = torch.zeros(tokens.shape[0], shape.num_kv_heads, 0, shape.head_dim)
    layers = decoder_layers(model, family)
    bar = progress_bar(range(len(layers)), desc="export", unit="layer", disable=not progress)
    for index in bar:
        prefix = f"{family.layers}.{index}"
        source = pass_.load(prefix, files)
        layer = DecoderLayer(source, prefix, family, pass_.emitters(prefix),
                             family.layer_traits(model.config, index)).eval()
        model_inputs = advanced(model_inputs, source)
        hidden = pass_.checked(layer, lambda: layer(hidden, cos, sin, masks[layer.sliding_window], empty, empty)[0])
        builder.add_layer(index, layer)
        spilled.spill(builder.emission.initializers)
        del layer
        release_module(source)

    skeleton_norm, skeleton_head = graph.norm, graph.lm_head
    norm, head = pass_.load(family.final_norm, files), pass_.load(family.lm_head, files)
    graph.norm = RMSNorm(norm)
    model_logits = head(norm(model_inputs.hidden_states[0]))
    if family.lm_head in section.get("layers", {}) and head.bias is None:
        # A quantized head is computed from its codes alone: the export linear only needs the float weight's
        # shape, so it is built over the released (meta) module instead of a transposed vocabulary-sized copy.
        release_module(head)
    emitter = pass_.emitters(family.lm_head).get(family.lm_head)
    graph.lm_head = ExportLinear(head, family.lm_head, emitter)
    graph_logits = pass_.checked(graph.lm_head, lambda: graph.head(hidden))
    builder.add_head()
    spilled.spill(builder.emission.initializers)
    save_graph(builder.model_proto(), folder)
    # The head's kernel holds its codes and their dequantized reference (1.2 GB for a 152k x 1536 head): let
    # them go before ONNX Runtime loads the graph for the checks.
    graph.norm, graph.lm_head = skeleton_norm, skeleton_head
    release_module(head)
    return StreamedExport(graph_logits, model_logits, pass_.linears, pass_.worst)


class _Pass:
    """The per-module work of the pass: reading a module and its codes, and the quantized-layer check."""

    def __init__(self, weights: WeightsFolder, model: nn.Module, section: dict[str, Any]) -> None:
        self.weights, self.model, self.section = weights, model, section
        self.linears: dict[str, dict[str, Any]] = {}
        self.worst: float | None = None

    def load(self, path: str, files: TensorFiles) -> nn.Module:
        module = self.model.get_submodule(path)
        load_module(module, f"{path}.", files)
        return module.float()

    def codes(self, paths: list[str]) -> dict[str, Any]:
        return quantized_weights(self.weights.folder, self.section, paths) if self.section else {}

    def emitters(self, prefix: str) -> dict[str, Any]:
        """Emitters of the quantized linears at or under `prefix`, from their codes alone."""
        specs = {path: spec for path, spec in self.section.get("layers", {}).items()
                 if path == prefix or path.startswith(f"{prefix}.")}
        emitters = emitters_for(self.codes(list(specs)), specs, self.model) if specs else {}
        self.linears.update({path: emitter.describe() for path, emitter in emitters.items()})
        return emitters

    def checked(self, block: nn.Module, run: Any) -> torch.Tensor:
        """`run()`'s output, with each quantized linear of `block` held against ONNX Runtime on its input."""
        modules = quantized_modules(block)
        with captured_matmul_inputs(modules) as inputs:
            output = run()
        if modules:
            error = check_quantized_modules(modules, inputs)
            self.worst = max(self.worst or 0.0, error)
        return output

