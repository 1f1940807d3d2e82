"""The folder format that passes a model between stages: safetensors + config + tokenizer + rotaq.json.

A folder is complete exactly when its manifest `rotaq.json` exists: folders are assembled under a
temporary name and renamed into place, so an interrupted write never looks like a finished one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from rotaq.pipeline.errors import ArtifactError, RotaqError
from rotaq.pipeline.leftovers import dead_owners, owned_name, remove_path

MANIFEST_NAME = "rotaq.json"
WEIGHTS_NAME = "model.safetensors"
OUTPUT_MARKER = ".rotaq-output"  # in a folder rotaq wrote that has no rotaq.json (an export, the GGUF cache)
FORMAT_VERSION = "rotaq-model/1"
_VERSIONED_PACKAGES = ("rotaq", "torch", "transformers", "safetensors", "onnx", "onnxruntime", "gguf")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _VERSIONED_PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return versions


def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def is_artifact(path: Path) -> bool:
    return (Path(path) / MANIFEST_NAME).is_file()


def read_versioned_json(path: Path, expected_format: str, missing_message: str) -> dict[str, Any]:
    """A JSON manifest carrying a `format` tag; clear errors when absent, unreadable or of another format."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(missing_message)
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from exc
    if manifest.get("format") != expected_format:
        raise ArtifactError(f"{path.parent} has format {manifest.get('format')!r}; this rotaq reads {expected_format!r}")
    return manifest


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of a finished stage folder, or a clear error if the folder is not one."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path} does not exist")
    return read_versioned_json(path / MANIFEST_NAME, FORMAT_VERSION,
                               f"{path} is not a finished rotaq stage folder (no {MANIFEST_NAME}); "
                               "rerun the stage that writes it")


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC / EDQUOT, also when a Rust writer (safetensors' SafetensorError, tokenizers' bare Exception)
    reports it only in its message."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(exc)
    return any(f"os error {number}" in text for number in (errno.ENOSPC, errno.EDQUOT)) or \
        os.strerror(errno.ENOSPC) in text


@contextlib.contextmanager
def _disk_errors_explained(target: Path) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        if is_disk_full(exc):
            raise RotaqError(f"disk full while writing {target}; nothing was replaced") from exc
        raise


def refuse_output_over_input(out_dir: Path, model: str | Path | None) -> None:
    """A stage's --out must not be its input nor a folder holding it: replacing the output folder would
    delete the model being read (and the user's files inside it). A folder inside the input is harmless."""
    if model is None or not Path(model).exists():
        return  # a hub id or the embedded model
    out_path, model_path = Path(out_dir).resolve(), Path(model).resolve()
    if model_path.is_relative_to(out_path):
        raise ArtifactError(f"--out {out_dir} overlaps the input model {model}; write the output to another folder")


@contextlib.contextmanager
def staged_folder(out_dir: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `out_dir` in one rename.

    An existing `out_dir` is only replaced if it is a rotaq folder or empty, so a typo in `--out`
    cannot delete unrelated files. Temporary folders left by a killed writer are removed first.
    """
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and not (is_artifact(out_dir) or _is_replaceable(out_dir)):
        raise ArtifactError(f"refusing to overwrite {out_dir}: it exists and is not a rotaq output folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)
    tmp = _owned_sibling(out_dir, TEMP_KIND)
    with _disk_errors_explained(out_dir):
        tmp.mkdir()
    try:
        with _disk_errors_explained(out_dir):
            yield tmp
            _swap_into_place(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


TEMP_KIND, TRASH_KIND = "tmp", "old"


def _owned_sibling(out_dir: Path, kind: str) -> Path:
    """`.NAME.KIND-PID-HEX`: the pid says whose it is (see rotaq.pipeline.leftovers)."""
    return out_dir.parent / owned_name(f".{out_dir.name}.{kind}")


def remove_stale_temporaries(out_dir: Path) -> list[Path]:
    """Remove the temporary and half-swapped folders of `out_dir` whose writer is gone: without this a
    killed export left ~630 MB behind for good. Returns what was removed."""
    out_dir = Path(out_dir)
    removed = []
    for kind in (TRASH_KIND, TEMP_KIND):
        for leftover in dead_owners(out_dir.parent, f".{out_dir.name}.{kind}"):
            if kind == TRASH_KIND and not out_dir.exists():
                os.replace(leftover, out_dir)  # killed mid-swap: the previous output comes back
                continue
            remove_path(leftover)
            removed.append(leftover)
    return removed


def _is_replaceable(path: Path) -> bool:
    return path.is_dir() and (not any(path.iterdir()) or (path / OUTPUT_MARKER).exists())


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    trash = _owned_sibling(out_dir, TRASH_KIND)
    os.replace(out_dir, trash)
    os.replace(tmp, out_dir)
    shutil.rmtree(trash, ignore_errors=True)


def new_manifest(stage: str, options: dict[str, Any], source: dict[str, Any], parent: dict[str, Any] | None) -> dict:
    """The provenance every stage records: what it ran on, with which options and software."""
    return {
        "format": FORMAT_VERSION,
        "stage": stage,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "options": options,
        "source": source,
        "history": [*(parent or {}).get("history", []), *([_history_entry(parent)] if parent else [])],
        "versions": package_versions(),
    }


def _history_entry(parent: dict[str, Any]) -> dict[str, Any]:
    return {"stage": parent.get("stage"), "options": parent.get("options"), "created": parent.get("created")}


def write_model_artifact(
    out_dir: Path,
    model: Any,
    tokenizer: Any,
    manifest: dict[str, Any],
    extra_writers: dict[str, Callable[[Path], None]] | None = None,
) -> Path:
    """Write weights, config, tokenizer and extras, then the manifest with every file's hash."""
    from safetensors.torch import save_model

    with staged_folder(out_dir) as tmp:
        save_model(model, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        finish_model_folder(tmp, model.config.to_dict(), tokenizer, manifest, extra_writers)
    return Path(out_dir)


def finish_model_folder(folder: Path, config: dict[str, Any], tokenizer: Any, manifest: dict[str, Any],
                        extra_writers: dict[str, Callable[[Path], None]] | None = None) -> None:
    """Everything of a stage folder but its weights (written first, whole or streamed): config, tokenizer,
    extras, and last the manifest with every file's hash."""
    # quantization_config is a GGUF source's marker; the weights here are plain tensors
    config = {key: value for key, value in config.items() if key != "quantization_config"}
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    for name, writer in (extra_writers or {}).items():
        writer(folder / name)
    manifest = {**manifest, **file_records(folder)}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, default=str) + "\n")


CHEAP_HASH_BYTES = 64 << 20
"""Files up to this size are hashed on every reuse (config, tokenizer, small graphs: milliseconds); larger
ones (weights: about 1 s per 500 MB here) are checked by size, and hashed on request (`--verify`)."""


def file_records(folder: Path, exclude: tuple[str, ...] = (MANIFEST_NAME,)) -> dict[str, dict[str, Any]]:
    """The manifest's `files` (SHA-256) and `file_sizes` (bytes) of every file under `folder`."""
    paths = [p for p in sorted(Path(folder).rglob("*")) if p.is_file() and p.name not in exclude]
    return {"files": {str(p.relative_to(folder)): sha256_file(p) for p in paths},
            "file_sizes": {str(p.relative_to(folder)): p.stat().st_size for p in paths}}


def verify_files(path: Path, manifest: dict[str, Any], full: bool = True, names: Iterable[str] | None = None) -> None:
    """Check the files a manifest lists are present and unchanged: sizes always, SHA-256 of every file when
    `full`, else of the small ones. `names` limits the check to some files (a graph and its data).
    A mismatch means a truncated, corrupted or edited folder."""
    hashes, sizes = manifest.get("files", {}), manifest.get("file_sizes", {})
    for name in names if names is not None else hashes:
        file_path = Path(path) / name
        if not file_path.is_file():
            raise ArtifactError(f"{path} is missing {name}, listed in its manifest; rerun the stage that wrote it")
        size, expected_size = file_path.stat().st_size, sizes.get(name)
        if expected_size is not None and size != expected_size:
            raise ArtifactError(f"{file_path} is {size} bytes, its manifest says {expected_size}: the file is "
                                "truncated or replaced; rerun the stage that wrote it")
        if name in hashes and (full or size <= CHEAP_HASH_BYTES) and sha256_file(file_path) != hashes[name]:
            raise ArtifactError(f"{file_path} does not match the SHA-256 in its manifest: the folder was modified "
                                "or corrupted; rerun the stage that wrote it")
