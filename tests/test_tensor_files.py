"""The streamed safetensors writer writes the library's own file; the reader reads single files and shards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rotaq.pipeline.tensor_files import AppendedSafetensorsWriter, StreamedSafetensorsWriter, TensorFiles
from tests.tiny_models import save_hf_folder, tiny_model


def mixed_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"model.layers.10.w": torch.randn(3, 5, generator=generator),
            "model.layers.2.w": torch.randn(7, generator=generator).to(torch.bfloat16),
            "model.layers.2.b": torch.randn(2, 2, generator=generator).double(),
            "ids": torch.arange(6), "mask": torch.tensor([True, False, True]),
            "half": torch.randn(4, 1, generator=generator).half(), "scalar": torch.tensor(2.5)}


def test_streamed_file_is_byte_for_byte_the_librarys(tmp_path: Path) -> None:
    tensors = mixed_tensors()
    save_file(tensors, str(tmp_path / "library.safetensors"), metadata={"format": "pt"})
    layout = {name: (tensor.dtype, tuple(tensor.shape)) for name, tensor in tensors.items()}
    with StreamedSafetensorsWriter(tmp_path / "streamed.safetensors", layout, {"format": "pt"}) as writer:
        for name in reversed(list(tensors)):  # any order: each tensor goes to its own offset
            writer.write(name, tensors[name])
    assert (tmp_path / "streamed.safetensors").read_bytes() == (tmp_path / "library.safetensors").read_bytes()
    loaded = load_file(str(tmp_path / "streamed.safetensors"))
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())


def test_appended_file_is_byte_for_byte_the_librarys(tmp_path: Path) -> None:
    tensors = {**mixed_tensors(), "empty": torch.zeros(0, 3)}
    save_file(tensors, str(tmp_path / "library.safetensors"))
    with AppendedSafetensorsWriter(tmp_path / "appended.safetensors") as writer:
        writer.CHUNK_BYTES = 8  # several chunks per tensor
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    assert (tmp_path / "appended.safetensors").read_bytes() == (tmp_path / "library.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["appended.safetensors", "library.safetensors"]
    with pytest.raises(RuntimeError, match="stopped"), AppendedSafetensorsWriter(tmp_path / "failed.safetensors") as w:
        w.write("a", torch.ones(2))
        raise RuntimeError("stopped")
    assert not (tmp_path / "failed.safetensors").exists() and not (tmp_path / "failed.safetensors.parts").exists()


def test_a_tensor_never_written_or_of_another_shape_is_an_error(tmp_path: Path) -> None:
    layout = {"a": (torch.float32, (2,)), "b": (torch.float32, (3,))}
    with pytest.raises(RuntimeError, match="1 tensors never written, e.g. b"):
        with StreamedSafetensorsWriter(tmp_path / "w.safetensors", layout) as writer:
            writer.write("a", torch.ones(2))
    with StreamedSafetensorsWriter(tmp_path / "w.safetensors", layout) as writer:
        with pytest.raises(ValueError, match="the layout says"):
            writer.write("a", torch.ones(3))
        with pytest.raises(KeyError):
            writer.write("c", torch.ones(2))
        writer.write("a", torch.ones(2))
        writer.write("b", torch.ones(3))


def test_reader_reads_a_sharded_folder_like_a_single_file(tmp_path: Path) -> None:
    model = tiny_model("llama-untied")
    single = save_hf_folder(model, tmp_path / "single")
    sharded = save_hf_folder(model, tmp_path / "sharded", max_shard_size="20KB")
    assert len(list(sharded.glob("*.safetensors"))) > 1
    one, many = TensorFiles(single), TensorFiles(sharded)
    assert sorted(one.names()) == sorted(many.names())
    for name in one.names():
        assert one.layout(name) == many.layout(name)
        assert torch.equal(one.read([name])[name], many.read([name])[name])


def test_a_folder_without_safetensors_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="has no model.safetensors"):
        TensorFiles(tmp_path)
