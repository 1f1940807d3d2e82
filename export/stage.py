"""The export stage: any loadable model in, a checked ONNX folder with KV cache out.

Folder layout: model.onnx (+ model.onnx.data with the weights), the tokenizer, and export.json
(graph I/O names and shapes, model sizes, the source's rotaq manifest, check results, file hashes).
The folder is assembled under a temporary name and moved into place only after every check in
`rotaq.export.checks` has passed.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import onnx

from rotaq.export.checks import (check_graph_matches_model, check_onnx_file, check_quantized_layers, check_runtime,
                                 compare_graph_logits, graph_greedy_ids, graph_prefill_logits)
from rotaq.export.generate import SamplingOptions, generate_ids
from rotaq.export.fused_graph import FUSED_LAYOUT, LAYOUTS, TRACED_LAYOUT, build_fused_model, fused_layout_problem
from rotaq.export.genai_folder import check_genai_loads, genai_available, genai_config, write_genai_config
from rotaq.export.graph_module import DecoderGraph, ExportLinear
from rotaq.export.layout import DATA_NAME, EXPORT_FORMAT, GRAPH_NAME, MANIFEST_NAME, OPSET, SESSION_CONFIG, io_spec
from rotaq.export.onnx_export import export_onnx, save_graph
from rotaq.export.quantized import emitters_for, quantized_weights
from rotaq.export.runtime import OnnxDecoder
from rotaq.export.side_path_cost import profiled_share, side_path_flops
from rotaq.pipeline.artifacts import OUTPUT_MARKER, file_records, package_versions, refuse_output_over_input, staged_folder
from rotaq.pipeline.errors import RotaqError
from rotaq.export.streamed import export_streamed, streamed_skeleton, streaming_problem
from rotaq.pipeline.families import DecoderFamily, family_for_model_type
from rotaq.pipeline.loading import (LoadedModel, WeightsFolder, folder_generation_config, load_model,
                                    model_files_explained, weights_folder)
from rotaq.pipeline.options import setting

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportOptions:
    model: str | None
    out: Path
    check_tokens: int = setting(32, "tokens per sequence of the export's logit checks", minimum=2)
    decode_steps: int = setting(4, "cached decode steps checked against prefill", minimum=1)
    seed: int = setting(0, "seed of the check sequences")
    layer_by_layer: bool = setting(True, "export one decoder layer at a time from the memory-mapped stage folder "
                                         "(peak memory: one layer, a vocabulary-sized head and ONNX Runtime's "
                                         "session for the checks); false, or .bin weights, the traced "
                                         "layout, LoR2C side paths or a tied lm_head: load the whole model")
    progress: bool = True
    layout: str = setting(FUSED_LAYOUT, "graph layout: fused (onnxruntime-genai's fused operators: "
                          "GroupQueryAttention, SkipSimplifiedLayerNormalization, packed projections) or traced "
                          "(torch.onnx's trace of the export forward, which also takes left-padded batches)",
                          choices=lambda: LAYOUTS)


def check_token_ids(vocab_size: int, length: int, seed: int) -> torch.Tensor:
    """Two seeded random sequences [2, length]: enough to catch any wrong transform or cache slot."""
    return torch.randint(0, vocab_size, (2, length), generator=torch.Generator().manual_seed(seed))


def build_graph(loaded: LoadedModel) -> DecoderGraph:
    """The export forward for a loaded model, with quantized kernels (and the embedding table as
    integer codes) when the folder is quantized."""
    section = (loaded.manifest or {}).get("quantization")
    if not section:
        return DecoderGraph(loaded.model, loaded.family).eval()
    weights = quantized_weights(Path(loaded.source["path"]), section)
    emitters = emitters_for(weights, section.get("layers", {}), loaded.model)
    return DecoderGraph(loaded.model, loaded.family, emitters, weights.get(loaded.family.embed_tokens)).eval()


def run_export(options: ExportOptions) -> Path:
    started = time.perf_counter()
    # Entered first, so a --out that may not be replaced fails before the model is loaded.
    refuse_output_over_input(options.out, options.model)
    if options.layer_by_layer and options.layout == FUSED_LAYOUT:
        weights = weights_folder(options.model)
        if weights is not None:
            family = family_for_model_type(weights.config.model_type)
            with model_files_explained(weights.folder):
                model, graph = streamed_skeleton(weights, family)
                problem = streaming_problem(weights, model, family, graph)
            if problem is None:
                return _export_layer_by_layer(options, weights, model, graph, family, started)
            logger.info("exporting the whole model in memory: %s", problem)
    with staged_folder(options.out) as tmp:
        loaded = load_model(options.model)
        graph = build_graph(loaded)
        tokens = check_token_ids(graph.shape.vocab_size, options.check_tokens, options.seed)
        quantized = bool(graph.quantized_linears())
        checks: dict[str, Any] = {"tokens": list(tokens.shape), "decode_steps": options.decode_steps,
                                  "graph_vs_model": check_graph_matches_model(graph, loaded.model, tokens)}
        manifest = write_onnx_folder(loaded, graph, tmp, options.layout)
        check_onnx_file(tmp / GRAPH_NAME)
        if quantized:
            checks["quantized_layers_max_rel_error"] = check_quantized_layers(graph, tokens)
        checks.update(check_runtime(OnnxDecoder(tmp), graph_prefill_logits(graph, tokens), tokens,
                                    options.decode_steps, quantized))
        if len(graph.side_paths):
            manifest["side_paths"] = {**side_path_flops(graph), "profile": profiled_share(tmp)}
        _finish_export(tmp, loaded, manifest, checks, tokens, started,
                       GreedyReference("pytorch", lambda prompt, n: graph_greedy_ids(graph, prompt, n), not quantized))
    return Path(options.out)


def _export_layer_by_layer(options: ExportOptions, weights: WeightsFolder, model: torch.nn.Module,
                           graph: DecoderGraph, family: DecoderFamily, started: float) -> Path:
    """`export_streamed` into a staged folder, then the whole-model export's checks on what it measured."""
    tokens = check_token_ids(graph.shape.vocab_size, options.check_tokens, options.seed)
    loaded = LoadedModel(model, weights.tokenizer(), family, weights.source, weights.manifest)
    model.generation_config = folder_generation_config(weights.folder, model.config)
    with staged_folder(options.out) as tmp:
        with model_files_explained(weights.folder):
            measured = export_streamed(weights, model, graph, family, tmp, context_length(model.config), tokens,
                                       options.progress)
        quantized = bool(measured.linears)
        checks: dict[str, Any] = {
            "tokens": list(tokens.shape), "decode_steps": options.decode_steps, "layer_by_layer": True,
            "graph_vs_model": compare_graph_logits(measured.graph_logits, measured.model_logits, quantized)}
        manifest = export_manifest(loaded, graph, FUSED_LAYOUT, measured.linears)
        _write_json(tmp / MANIFEST_NAME, manifest)
        check_onnx_file(tmp / GRAPH_NAME)
        if quantized:
            checks["quantized_layers_max_rel_error"] = measured.quantized_layers_max_rel_error
        checks.update(check_runtime(OnnxDecoder(tmp), measured.graph_logits, tokens, options.decode_steps, quantized))
        _finish_export(tmp, loaded, manifest, checks, tokens, started,
                       GreedyReference("onnxruntime", lambda prompt, n: runtime_greedy_ids(tmp, prompt, n),
                                       not quantized))
    return Path(options.out)


@dataclass(frozen=True)
class GreedyReference:
    """The tokens onnxruntime-genai's greedy generation is held against: `name` says whose, `enforced` whether
    a difference refuses the export (float graphs)."""

    name: str
    tokens: Callable[[list[int], int], list[int]]
    enforced: bool


def runtime_greedy_ids(folder: Path, prompt_ids: list[int], new_tokens: int) -> list[int]:
    """ONNX Runtime's greedy continuation with the written graph and its KV cache."""
    return list(generate_ids(OnnxDecoder(folder), prompt_ids, SamplingOptions(max_new_tokens=new_tokens)))


def _finish_export(tmp: Path, loaded: LoadedModel, manifest: dict[str, Any], checks: dict[str, Any],
                   tokens: torch.Tensor, started: float, reference: GreedyReference) -> None:
    """The tokenizer, genai_config.json, onnxruntime-genai's check and export.json with the file hashes."""
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(str(tmp))
    write_genai_config(tmp, genai_config(loaded.model.config, getattr(loaded.model, "generation_config", None),
                                         loaded.tokenizer, manifest, share_buffer=manifest["layout"] == FUSED_LAYOUT,
                                         graph_slots=context_length(loaded.model.config)))
    if genai_available() and loaded.tokenizer is not None:
        checks["genai"] = check_genai_generation(tmp, reference, tokens)
    (tmp / OUTPUT_MARKER).write_text(json.dumps({"stage": "export"}) + "\n")
    manifest["checks"] = checks
    manifest["export_seconds"] = round(time.perf_counter() - started, 2)
    manifest.update(file_records(tmp, exclude=(MANIFEST_NAME,)))
    _write_json(tmp / MANIFEST_NAME, manifest)


def write_onnx_folder(loaded: LoadedModel, graph: DecoderGraph, folder: Path,
                      layout: str = FUSED_LAYOUT) -> dict[str, Any]:
    """model.onnx, model.onnx.data and a first export.json (no checks or hashes yet); returns the manifest.
    A graph the fused layout cannot express is traced instead, with the reason printed and recorded."""
    if layout not in LAYOUTS:
        raise RotaqError(f"unknown graph layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    reason = fused_layout_problem(graph) if layout == FUSED_LAYOUT else None
    if reason:
        print(f"rotaq export: the traced graph layout is used because {reason}")
        layout = TRACED_LAYOUT
    if layout == FUSED_LAYOUT:
        save_graph(build_fused_model(graph, context_length(loaded.model.config)), folder)
    else:
        export_onnx(graph, folder)
    manifest = export_manifest(loaded, graph, layout)
    if reason:
        manifest["layout_reason"] = reason
    _write_json(folder / MANIFEST_NAME, manifest)
    return manifest


# The fused graph's RoPE caches cover at least this many slots, so a small-context model still runs the
# bench's prompts (as the traced graph, which computes RoPE from positions, does); 8192 × head_dim floats
# is a few MiB.
MIN_ROPE_SLOTS = 8192


def context_length(config: Any) -> int:
    """Slots the fused graph's RoPE caches cover: the model's context length, at least `MIN_ROPE_SLOTS`."""
    return max(int(getattr(config, "max_position_embeddings", 0) or 0), MIN_ROPE_SLOTS)


def check_genai_generation(folder: Path, reference: GreedyReference, tokens: torch.Tensor,
                           new_tokens: int = 4) -> dict[str, Any]:
    """onnxruntime-genai opens the folder and greedy-generates; for a float graph its tokens must be the
    reference's (the PyTorch export forward's, or ONNX Runtime's for a layer-streamed export)."""
    prompt = tokens[0, :8].tolist()
    genai = check_genai_loads(folder, prompt, new_tokens)
    expected = reference.tokens(prompt, len(genai.greedy_tokens))
    if reference.enforced and genai.greedy_tokens != expected:
        raise RotaqError(f"onnxruntime-genai generates {genai.greedy_tokens} where {reference.name} generates "
                         f"{expected}; nothing was written")
    result = {"loads": True, "greedy_tokens": genai.greedy_tokens, f"{reference.name}_tokens": expected,
              "same": genai.greedy_tokens == expected}
    if genai.tokenizer_problem:
        print(f"warning: onnxruntime-genai cannot read this tokenizer ({genai.tokenizer_problem}); the graph "
              "runs, but genai's own text encoding does not")
        result["tokenizer_problem"] = genai.tokenizer_problem
    return result


def export_manifest(loaded: LoadedModel, graph: DecoderGraph, layout: str = TRACED_LAYOUT,
                    linears: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Everything a runtime or a reader needs to know about the graph, and where it came from. `linears`:
    the kernels of a layer-streamed export, whose graph holds no layer's emitter any more."""
    shape = graph.shape
    return {
        "format": EXPORT_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "graph": GRAPH_NAME,
        "external_data": DATA_NAME,
        "opset": OPSET,
        "layout": layout,
        "exporter": (f"rotaq.export.fused_graph, onnx {onnx.__version__}" if layout == FUSED_LAYOUT
                     else f"torch.onnx.export(dynamo=True), torch {torch.__version__}"),
        "session_config": SESSION_CONFIG,
        **io_spec(shape.num_layers, shape.num_kv_heads, shape.head_dim, shape.vocab_size),
        "position_ids": ("GroupQueryAttention: a token's index in its row (rows unpadded or right-padded)"
                         if layout == FUSED_LAYOUT else
                         "computed in the graph: cumsum(attention_mask) - 1 (left padding is supported)"),
        "model_type": loaded.model.config.model_type,
        "num_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads,
        "num_kv_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "hidden_size": shape.hidden_size,
        "vocab_size": shape.vocab_size,
        "sliding_windows": [layer.sliding_window for layer in graph.layers],
        "eos_token_ids": eos_token_ids(loaded),
        "linears": linears if linears is not None else {
            module.path: module.emitter.describe() for module in graph.modules()
            if isinstance(module, ExportLinear) and module.emitter is not None},
        "model_source": loaded.source,
        "source_manifest": loaded.manifest,
        "versions": package_versions(),
    }


def eos_token_ids(loaded: LoadedModel) -> list[int]:
    """End-of-sequence ids from the generation config, the model config and the tokenizer, merged."""
    found: list[Any] = []
    for owner in (getattr(loaded.model, "generation_config", None), loaded.model.config, loaded.tokenizer):
        value = getattr(owner, "eos_token_id", None) if owner is not None else None
        found += value if isinstance(value, list) else [value]
    return sorted({int(token) for token in found if token is not None})


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
