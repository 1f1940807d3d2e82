"""What LoR2C side paths cost in an exported graph: FLOPs per token, and their share of ONNX Runtime's time.

The FLOPs are counted from the shapes. The time is measured rather than estimated: one ORT session with
per-node profiling runs a prefill and a few cached decode steps, and the kernel time of the side paths'
MatMul nodes (found by their initializers, `side_paths.*.down_t` / `up_t`) is set against the time of
every node. Profiling adds its own overhead per node, so the share is the number to read; the
milliseconds are those of the profiled run.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from rotaq.export.graph_module import DecoderGraph, ExportLinear
from rotaq.export.runtime import OnnxDecoder

SIDE_PATH_PREFIX = "side_paths."


def side_path_flops(graph: DecoderGraph) -> dict[str, Any]:
    """Side-path FLOPs per token beside the graph's matmul FLOPs per token (2 per weight of every linear and
    of the head; attention over the cache is left out, so the share is an upper bound)."""
    side = sum(2 * (path.down_t.numel() + path.up_t.numel()) for path in graph.side_paths)
    linears = sum(2 * module.weight_t.numel() for module in graph.modules() if isinstance(module, ExportLinear))
    head = 0 if graph.lm_head is not None else 2 * graph.embed_weight.numel()
    total = linears + head + side
    return {"count": len(graph.side_paths), "spans": [[path.first, path.last] for path in graph.side_paths],
            "flops_per_token": side, "model_flops_per_token": total, "flops_share": side / total if total else 0.0}


def side_path_nodes(graph_path: Path) -> set[str]:
    """Names of the MatMul nodes that read a side-path initializer."""
    model = onnx.load(str(graph_path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer if init.name.startswith(SIDE_PATH_PREFIX)}
    return {node.name for node in model.graph.node
            if node.op_type == "MatMul" and any(name in initializers for name in node.input)}


def profiled_share(folder: Path, prompt_tokens: int = 128, decode_steps: int = 16,
                   threads: int | None = None) -> dict[str, Any]:
    """Kernel time of the side-path nodes against all nodes, for a prefill and for the decode steps."""
    nodes = side_path_nodes(Path(folder) / "model.onnx")
    with tempfile.TemporaryDirectory() as scratch:
        decoder = OnnxDecoder(Path(folder), threads, profile_prefix=str(Path(scratch) / "profile"))
        vocab = decoder.layout.vocab_size
        tokens = np.random.default_rng(0).integers(0, vocab, (1, prompt_tokens), dtype=np.int64)
        logits, past = decoder.step(tokens, np.ones_like(tokens), decoder.empty_past(1))
        for step in range(decode_steps):
            token = np.array([[int(logits[0, -1].argmax())]], dtype=np.int64)
            logits, past = decoder.step(token, np.ones((1, prompt_tokens + step + 1), dtype=np.int64), past)
        events = json.loads(Path(decoder.session.end_profiling()).read_text())
    runs = [event for event in events if event.get("name") == "model_run"]
    phases = {"prefill": (runs[0]["ts"], runs[0]["ts"] + runs[0]["dur"]),
              "decode": (runs[1]["ts"], runs[-1]["ts"] + runs[-1]["dur"])}
    result: dict[str, Any] = {"prompt_tokens": prompt_tokens, "decode_steps": decode_steps, "nodes": len(nodes)}
    for phase, (start, end) in phases.items():
        kernels = [event for event in events if event.get("cat") == "Node" and event["name"].endswith("_kernel_time")
                   and start <= event["ts"] <= end]
        total = sum(event["dur"] for event in kernels)
        side = sum(event["dur"] for event in kernels if event["name"].removesuffix("_kernel_time") in nodes)
        steps = 1 if phase == "prefill" else decode_steps
        result[phase] = {"side_path_ms": side / 1e3 / steps, "all_nodes_ms": total / 1e3 / steps,
                         "share": side / total if total else 0.0}
    return result
