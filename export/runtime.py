"""ONNX Runtime over an exported folder: one session, and the KV-cache bookkeeping of its I/O contract.

Torch-free, so generation runs where only onnxruntime and numpy are installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from rotaq.export.layout import ATTENTION_MASK, INPUT_IDS, SESSION_CONFIG, ExportLayout, past_names, read_layout
from rotaq.pipeline.errors import ArtifactError, first_line


CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def create_session(graph: Path | bytes, threads: int | None = None, provider: str = CPU,
                   profile_prefix: str | None = None) -> ort.InferenceSession:
    """A session with the export's session config (from a file or serialized bytes), or a clear
    error if the graph does not load. A non-CPU provider keeps the CPU one as its fallback.
    `profile_prefix` turns on ORT's per-node profiling, written by `session.end_profiling()`."""
    options = ort.SessionOptions()
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    for key, value in SESSION_CONFIG.items():
        options.add_session_config_entry(key, value)
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only: ORT's shape-merge notices are not the user's concern
    source = graph if isinstance(graph, bytes) else str(graph)
    try:
        providers = [provider] if provider == CPU else [provider, CPU]
        return ort.InferenceSession(source, options, providers=providers)
    except Exception as exc:  # ORT raises its own pybind exception types for every load failure
        name = "the graph" if isinstance(graph, bytes) else str(graph)
        raise ArtifactError(f"ONNX Runtime cannot load {name}: {first_line(exc)}") from exc


class OnnxDecoder:
    """Runs the exported decoder: prefill or decode steps with an explicit KV cache."""

    def __init__(self, folder: Path, threads: int | None = None, provider: str = CPU,
                 profile_prefix: str | None = None, verify: bool = False) -> None:
        self.layout: ExportLayout = read_layout(folder)
        if not self.layout.graph_path.is_file():
            raise ArtifactError(f"{folder} lists {self.layout.graph_path.name} but the file is missing")
        self.layout.verify_graph(full=verify)
        self.session = create_session(self.layout.graph_path, threads, provider, profile_prefix)
        self._past_names = past_names(self.layout.num_layers)

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """A zero-length cache: the first call is then a plain prefill."""
        shape = (batch, self.layout.num_kv_heads, 0, self.layout.head_dim)
        return [np.zeros(shape, dtype=np.float32) for _ in self._past_names]

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray,
             past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits [B, S, V] for `input_ids` [B, S] after `past` ([B, kv, P, d] each), and the cache
        extended to P + S. `attention_mask` [B, P + S] is 1 for real tokens, 0 for (left) padding."""
        feeds: dict[str, Any] = {INPUT_IDS: np.asarray(input_ids, dtype=np.int64),
                                 ATTENTION_MASK: np.asarray(attention_mask, dtype=np.int64)}
        feeds.update(zip(self._past_names, past, strict=True))
        logits, *present = self.session.run(None, feeds)
        return logits, present

    def logits(self, input_ids: Any) -> np.ndarray:
        """Logits of whole unpadded sequences [B, T] in one pass: the `rotaq.eval.metrics` logits-callable shape."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        logits, _ = self.step(input_ids, np.ones_like(input_ids), self.empty_past(input_ids.shape[0]))
        return logits
