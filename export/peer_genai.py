"""The peer a user would otherwise pick: ONNX Runtime GenAI's model builder (int4 / int8 / fp32, CPU).

`rotaq bench --peer genai` builds its graphs from the same float model (fused GroupQueryAttention,
SkipSimplifiedLayerNormalization, MatMulNBits with block 32 and accuracy_level 4, as
`python -m onnxruntime_genai.models.builder -p int4|int8|fp32 -e cpu` makes them), then times them through
the onnxruntime-genai Generator API and scores them on the same text. The builder is run as the
command users run; rotaq only prepares a Hugging Face folder for it (a GGUF source is written out
as float safetensors first, since the builder reads only float GGUF files).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from rotaq.pipeline.errors import RotaqError

PRECISIONS = ("int4", "int8", "fp32")
CONFIG_NAME = "genai_config.json"
MARKER_NAME = ".rotaq-peer.json"


def require_genai() -> Any:
    try:
        import onnxruntime_genai
    except ImportError as exc:
        raise RotaqError("--peer genai needs onnxruntime-genai: pip install 'rotaq[peer]' "
                         "(or pip install onnxruntime-genai)") from exc
    return onnxruntime_genai


def original_float_model(source: dict[str, Any]) -> str:
    """The first model in a rotaq lineage that is not a rotaq stage folder (GGUF, hub id or HF folder):
    what a user would hand the builder."""
    while source.get("kind") == "artifact" and source.get("origin"):
        source = source["origin"]
    reference = source.get("path") or source.get("id")
    if not reference:
        raise RotaqError("cannot tell which float model the exports came from, so the peer cannot be built")
    return str(reference)


def hf_folder_for(model: str, folder: Path) -> Path:
    """A Hugging Face folder of `model` for the builder: the folder itself, or one written from it."""
    path = Path(model)
    if path.is_dir() and (path / "config.json").is_file() and not (path / "rotaq.json").is_file():
        return path
    if (folder / "config.json").is_file():
        return folder
    from rotaq.pipeline.artifacts import new_manifest, write_model_artifact
    from rotaq.pipeline.loading import load_model

    loaded = load_model(model)
    manifest = new_manifest("peer-input", {"model": model}, loaded.source, None)
    return write_model_artifact(folder, loaded.model, loaded.tokenizer, manifest)


def build_peer(model: str, precision: str, folder: Path, work: Path) -> Path:
    """GenAI graphs of `model` at `precision` in `folder` (reused when already built from it)."""
    if precision not in PRECISIONS:
        raise RotaqError(f"unknown peer precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    require_genai()
    marker = folder / MARKER_NAME
    if marker.is_file() and json.loads(marker.read_text()).get("model") == model:
        return folder
    source = hf_folder_for(model, work / "peer-hf")
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source), "-o", str(folder),
               "-p", precision, "-e", "cpu", "-c", str(work / "peer-cache")]
    print(f"building the onnxruntime-genai peer: {' '.join(command[1:])}")
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not (folder / CONFIG_NAME).is_file():
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-5:])
        raise RotaqError(f"onnxruntime-genai's builder failed on {source} ({precision}):\n{tail}")
    marker.write_text(json.dumps({"model": model, "precision": precision, "command": command[1:]}) + "\n")
    return folder


def graph_files_mb(folder: Path) -> float:
    """Size of the peer's ONNX graph and external weights in MiB."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".onnx", ".data")) / 2**20


class GenaiTimed:
    """Prefill and decode through onnxruntime-genai's Generator, as a GenAI user runs the model."""

    def __init__(self, folder: str, threads: int | None = None) -> None:
        from rotaq.export.genai_folder import open_genai_model

        self.og = require_genai()
        self.model = open_genai_model(Path(folder), threads)
        self.vocab_size = json.loads((Path(folder) / CONFIG_NAME).read_text())["model"]["vocab_size"]

    def _generator(self, max_length: int) -> Any:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=max_length, do_sample=False)
        return self.og.Generator(self.model, params)

    def prefill(self, input_ids: np.ndarray, extra: int = 0) -> Any:
        generator = self._generator(input_ids.shape[1] + extra + 1)
        generator.append_tokens(input_ids.astype(np.int32))
        return generator

    def decode(self, state: Any, token: int) -> Any:
        state.append_tokens(np.asarray([[token]], dtype=np.int32))
        return state

    def logits(self, input_ids: Any) -> np.ndarray:
        """Logits of every position of each window [B, T] (one generator per window)."""
        rows = []
        for window in np.asarray(input_ids):
            generator = self.prefill(window[None, :])
            rows.append(generator.get_output("logits")[0])
        return np.stack(rows).astype(np.float32)
