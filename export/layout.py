"""The exported folder's contract: file names, graph input/output names and the export.json manifest.

Torch-free on purpose: the runtime and `rotaq generate` read it on machines that only have
onnxruntime. Names follow onnxruntime-genai's decoder convention (`past_key_values.{i}.key`,
`present.{i}.key`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rotaq.pipeline.artifacts import read_versioned_json
from rotaq.pipeline.errors import ArtifactError

EXPORT_FORMAT = "rotaq-onnx/1"
MANIFEST_NAME = "export.json"
GRAPH_NAME = "model.onnx"
DATA_NAME = "model.onnx.data"
OPSET = 21
# Tensors below this many bytes stay inside model.onnx; the weights go to model.onnx.data.
EXTERNAL_DATA_THRESHOLD = 1024
# ORT fuses DequantizeLinear + MatMul into MatMulNBits and would, by default, quantize that MatMul's
# activations to int8 per block (accuracy level 4); level 0 keeps the QDQ layers' float32 product.
SESSION_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "0"}

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
LOGITS = "logits"


def past_names(num_layers: int) -> list[str]:
    """Past KV inputs, key then value for each layer: past_key_values.{i}.key / .value."""
    return [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    """Present KV outputs in the same order as `past_names`: present.{i}.key / .value."""
    return [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def io_spec(num_layers: int, num_kv_heads: int, head_dim: int, vocab_size: int) -> dict[str, list[dict]]:
    """Names, dtypes and shapes (symbolic axes as strings) of the graph's inputs and outputs."""
    kv_in = ["batch", num_kv_heads, "past_sequence", head_dim]
    kv_out = ["batch", num_kv_heads, "total_sequence", head_dim]
    return {
        "inputs": [
            {"name": INPUT_IDS, "dtype": "int64", "shape": ["batch", "sequence"]},
            {"name": ATTENTION_MASK, "dtype": "int64", "shape": ["batch", "total_sequence"]},
            *({"name": name, "dtype": "float32", "shape": kv_in} for name in past_names(num_layers)),
        ],
        "outputs": [
            {"name": LOGITS, "dtype": "float32", "shape": ["batch", "sequence", vocab_size]},
            *({"name": name, "dtype": "float32", "shape": kv_out} for name in present_names(num_layers)),
        ],
    }


@dataclass(frozen=True)
class ExportLayout:
    """What a runtime needs from export.json to drive the graph."""

    folder: Path
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    manifest: dict[str, Any]

    @property
    def graph_path(self) -> Path:
        return self.file_in_folder(self.manifest.get("graph", GRAPH_NAME))

    def graph_files(self) -> list[Path]:
        """The graph and its external weights, as they are on disk."""
        names = sorted({self.manifest.get("graph", GRAPH_NAME), self.manifest.get("external_data", "")} - {""})
        return [path for path in map(self.file_in_folder, names) if path.is_file()]

    def verify_graph(self, full: bool = False) -> None:
        """The graph files against export.json before a runtime loads them: sizes always (a truncated or
        swapped file), every byte's SHA-256 when `full` (about 1 s per 500 MB here)."""
        from rotaq.pipeline.artifacts import verify_files

        names = [str(path.relative_to(self.folder)) for path in self.graph_files()]
        verify_files(self.folder, self.manifest, full=full, names=[n for n in names if n in self.manifest.get("files", {})])

    def file_in_folder(self, name: str) -> Path:
        """A file export.json names, refused unless it lies inside the folder: a manifest must not make a
        runtime load a graph from elsewhere (`"../other/model.onnx"`)."""
        path = self.folder / name
        if Path(name).is_absolute() or not path.resolve().is_relative_to(self.folder.resolve()):
            raise ArtifactError(f"{self.folder / MANIFEST_NAME} names {name!r}, which is outside the export folder")
        return path


def read_layout(folder: Path) -> ExportLayout:
    """The layout of an export folder, or a clear error if the folder is not one."""
    folder = Path(folder)
    manifest = read_versioned_json(folder / MANIFEST_NAME, EXPORT_FORMAT,
                                   f"{folder} is not a rotaq ONNX export (no {MANIFEST_NAME}); run `rotaq export` first")
    return ExportLayout(folder=folder, num_layers=int(manifest["num_layers"]),
                        num_kv_heads=int(manifest["num_kv_heads"]), head_dim=int(manifest["head_dim"]),
                        vocab_size=int(manifest["vocab_size"]),
                        eos_token_ids=tuple(manifest.get("eos_token_ids") or ()), manifest=manifest)
