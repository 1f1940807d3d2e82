"""Read and write safetensors one tensor at a time, so a stage can hold one decoder layer instead of a model.

Reading goes through safetensors' own `safe_open` (memory-mapped; each call opens and closes the file, so the
pages it touched leave the process's resident set). Writing is hand-written because safetensors has no
incremental writer: `save_file` needs every tensor in memory at once. The writer lays the file out exactly as
safetensors' `serialize` does (tensors sorted by dtype, largest first, then by name; the header padded with
spaces to 8 bytes), so a streamed file is byte-for-byte the file `save_model` writes for the same tensors —
tests/test_tensor_files.py checks that against the library. Where the tensors are not known in advance
(quantization codes), they are appended to a side file and laid out when the last one has come.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from rotaq.pipeline.errors import ArtifactError

SHARD_INDEX_NAME = "model.safetensors.index.json"
SINGLE_FILE_NAME = "model.safetensors"

# safetensors' Dtype enum order (safetensors/src/tensor.rs); the file sorts tensors by it, descending.
_DTYPE_ORDER = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64",
                "I64", "U64")
_DTYPE_NAMES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.float16: "F16",
                torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32", torch.float64: "F64",
                torch.int64: "I64"}


class TensorFiles:
    """The tensors of a model folder's safetensors weights (one file, or shards with an index), by name."""

    def __init__(self, folder: Path, file_name: str | None = None) -> None:
        """`file_name`: one named safetensors file of the folder (a quantized folder's codes) instead of its
        weights."""
        self.folder = Path(folder)
        index = self.folder / SHARD_INDEX_NAME
        if file_name is not None:
            if not (self.folder / file_name).is_file():
                raise ArtifactError(f"{self.folder} has no {file_name}")
            files = [file_name]
        elif (self.folder / SINGLE_FILE_NAME).is_file():
            files = [SINGLE_FILE_NAME]
        elif index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError) as exc:
                raise ArtifactError(f"{index} is not a safetensors shard index: {exc}") from exc
        else:
            raise ArtifactError(f"{self.folder} has no {SINGLE_FILE_NAME} nor {SHARD_INDEX_NAME}")
        self._file_of: dict[str, Path] = {}
        self._layout: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        from safetensors import safe_open

        for name in files:
            path = self.folder / name
            if not path.is_file():
                raise ArtifactError(f"{self.folder} is missing {name}, listed in its {SHARD_INDEX_NAME}")
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    sliced = handle.get_slice(key)
                    self._file_of[key] = path
                    self._layout[key] = (_torch_dtype(sliced.get_dtype()), tuple(sliced.get_shape()))

    @staticmethod
    def present(folder: Path) -> bool:
        return (Path(folder) / SINGLE_FILE_NAME).is_file() or (Path(folder) / SHARD_INDEX_NAME).is_file()

    def names(self) -> list[str]:
        return list(self._layout)

    def layout(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        return self._layout[name]

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Copies of the named tensors (safe_open returns copies, so they can be changed in place)."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self._file_of[name], []).append(name)
        tensors: dict[str, torch.Tensor] = {}
        for path, wanted in by_file.items():
            with safe_open(str(path), framework="pt") as handle:
                tensors.update({name: handle.get_tensor(name) for name in wanted})
        return tensors


def _torch_dtype(name: str) -> torch.dtype:
    for dtype, known in _DTYPE_NAMES.items():
        if known == name:
            return dtype
    raise ArtifactError(f"safetensors dtype {name} is not one rotaq reads")


@dataclass(frozen=True)
class _Slot:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


class StreamedSafetensorsWriter:
    """A safetensors file whose layout is fixed up front and whose tensors arrive one at a time, in any order.

    Use as a context manager: the header is written on entry, each `write` puts one tensor's bytes at its
    offset, and leaving without error checks that every tensor was written (a missing one is a bug, not a
    file with zeros in it).
    """

    def __init__(self, path: Path, layout: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None = None) -> None:
        self.path = Path(path)
        order = sorted(layout, key=lambda name: (-_DTYPE_ORDER.index(_DTYPE_NAMES[layout[name][0]]), name))
        self._slots: dict[str, _Slot] = {}
        offset = 0
        for name in order:
            dtype, shape = layout[name]
            size = _element_count(shape) * torch.empty((), dtype=dtype).element_size()
            self._slots[name] = _Slot(dtype, tuple(shape), offset, offset + size)
            offset += size
        header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
        header.update({name: {"dtype": _DTYPE_NAMES[slot.dtype], "shape": list(slot.shape),
                              "data_offsets": [slot.start, slot.end]} for name, slot in self._slots.items()})
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self._prefix = struct.pack("<Q", len(encoded)) + encoded
        self._data_size = offset
        self._written: set[str] = set()
        self._handle = None

    def __enter__(self) -> StreamedSafetensorsWriter:
        self._handle = open(self.path, "wb")
        self._handle.write(self._prefix)
        self._handle.truncate(len(self._prefix) + self._data_size)
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        slot = self._slots.get(name)
        if slot is None:
            raise KeyError(f"{name} is not in the layout of {self.path.name}")
        if tensor.dtype != slot.dtype or tuple(tensor.shape) != slot.shape:
            raise ValueError(f"{name}: got {tensor.dtype} {tuple(tensor.shape)}, the layout says {slot.dtype} "
                             f"{slot.shape}")
        self.write_bytes(name, 0, _tensor_bytes(tensor))

    def write_bytes(self, name: str, offset: int, data: Any) -> None:
        """Raw bytes of tensor `name` from byte `offset` of it; the tensor counts as written at its last byte."""
        slot = self._slots[name]
        if slot.start + offset + len(memoryview(data).cast("B")) > slot.end:
            raise ValueError(f"{name}: {len(memoryview(data).cast('B'))} bytes at {offset} overrun its slot")
        self._handle.seek(len(self._prefix) + slot.start + offset)
        self._handle.write(memoryview(data))
        if slot.start + offset + len(memoryview(data).cast("B")) == slot.end:
            self._written.add(name)

    def missing(self) -> list[str]:
        return [name for name in self._slots if name not in self._written]

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._handle.close()
        if kind is None and (missing := self.missing()):
            raise RuntimeError(f"{self.path.name}: {len(missing)} tensors never written, e.g. {missing[0]}")


class AppendedSafetensorsWriter:
    """A safetensors file whose tensors are not known in advance (GPTQ's codes and scales, layer by layer).

    Tensors are appended to a side file as they come; on a clean exit the header is computed and the bytes are
    copied behind it in the library's order, a chunk at a time, and the side file is removed. Memory stays one
    chunk; the cost is writing the data twice.
    """

    CHUNK_BYTES = 64 << 20

    def __init__(self, path: Path, metadata: Mapping[str, str] | None = None) -> None:
        self.path = Path(path)
        self.parts_path = self.path.with_name(self.path.name + ".parts")
        self.metadata = metadata
        self._parts: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        self._handle = None

    def __enter__(self) -> AppendedSafetensorsWriter:
        self._handle = open(self.parts_path, "wb")
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._parts:
            raise KeyError(f"{name} was written to {self.path.name} already")
        data = _tensor_bytes(tensor)
        start = self._handle.tell()
        self._handle.write(memoryview(data))
        self._parts[name] = (tensor.dtype, tuple(tensor.shape), start, start + data.nbytes)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._handle.close()
        try:
            if kind is None:
                self._assemble()
        finally:
            self.parts_path.unlink(missing_ok=True)

    def _assemble(self) -> None:
        layout = {name: (dtype, shape) for name, (dtype, shape, _, _) in self._parts.items()}
        with StreamedSafetensorsWriter(self.path, layout, self.metadata) as writer, open(self.parts_path, "rb") as parts:
            for name, (_, _, start, end) in self._parts.items():
                parts.seek(start)
                for offset in range(start, max(end, start + 1), self.CHUNK_BYTES):  # an empty tensor: once
                    writer.write_bytes(name, offset - start, parts.read(min(self.CHUNK_BYTES, end - offset)))


def _tensor_bytes(tensor: torch.Tensor) -> Any:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def _element_count(shape: Iterable[int]) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count
