"""--device: names are checked, a missing GPU is a one-line refusal, and (where CUDA is) results match the CPU's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rotaq.pipeline.cli import main
from rotaq.pipeline.devices import device_problem, torch_device
from rotaq.pipeline.errors import RotaqError
from rotaq.quantizers.stage import QuantizeOptions, run_quantize
from rotaq.rotations.stage import RotateOptions, run_rotate
from tests.tiny_models import save_hf_folder, tiny_model

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here (CI has none)")


@pytest.mark.parametrize("name", ["cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_names_rotaq_accepts(name: str) -> None:
    assert device_problem(name) is None


@pytest.mark.parametrize("name", ["gpu", "CUDA", "cuda:", "cuda:x", "mps", ""])
def test_other_device_names_are_refused_with_the_accepted_ones(name: str) -> None:
    assert "use cpu, cuda or cuda:N" in device_problem(name)
    with pytest.raises(RotaqError, match="not a device"):
        torch_device(name)


def test_the_cpu_is_always_there() -> None:
    assert torch_device("cpu") == torch.device("cpu")


def test_fine_tuning_also_takes_auto_and_leaves_gpu_numbers_to_accelerate() -> None:
    from rotaq.pipeline.devices import training_device_problem

    assert [training_device_problem(name) for name in ("auto", "cpu", "cuda")] == [None, None, None]
    assert "use auto, cpu or cuda" in training_device_problem("cuda:1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_refused_before_anything_is_read(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = save_hf_folder(tiny_model("llama-untied"), tmp_path / "source")
    capsys.readouterr()  # transformers' own progress lines while the source was written
    for stage in ("rotate", "quantize", "finetune"):
        assert main([stage, "--model", str(source), "--out", str(tmp_path / stage), "--device", "cuda"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--device cuda" in err[0] and "use --device cpu" in err[0]
        assert not (tmp_path / stage).exists()


@needs_cuda
@pytest.mark.parametrize("layer_by_layer", [True, False])
def test_rotation_on_cuda_matches_the_cpu(tmp_path: Path, layer_by_layer: bool) -> None:
    source = save_hf_folder(tiny_model("qwen3-qknorm", num_hidden_layers=3), tmp_path / "source")
    folders = {device: run_rotate(RotateOptions(model=str(source), out=tmp_path / device, device=device,
                                                layer_by_layer=layer_by_layer, progress=False))
               for device in ("cpu", "cuda")}
    cpu, cuda = (load_file(str(folders[device] / "model.safetensors")) for device in ("cpu", "cuda"))
    assert cpu.keys() == cuda.keys()
    for name, tensor in cpu.items():
        torch.testing.assert_close(cuda[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    check = json.loads((folders["cuda"] / "rotaq.json").read_text())["rotation"]["check"]
    assert check["max_relative_logit_error"] < 1e-4


@needs_cuda
@pytest.mark.parametrize("weights", ["rtn", "gptq"])
def test_quantization_on_cuda_matches_the_cpu(tmp_path: Path, weights: str, tiny_text_file: Path) -> None:
    from rotaq.pipeline.data import DataSpec

    source = save_hf_folder(tiny_model("llama-untied", num_hidden_layers=2), tmp_path / "source")
    rotated = run_rotate(RotateOptions(model=str(source), out=tmp_path / "rotated", progress=False))
    folders = {device: run_quantize(QuantizeOptions(model=str(rotated), out=tmp_path / device, scheme="w4a8",
                                                    weights=weights, device=device, progress=False,
                                                    calibration=DataSpec(str(tiny_text_file), 32, 128)))
               for device in ("cpu", "cuda")}
    cpu, cuda = (load_file(str(folders[device] / "quantized.safetensors")) for device in ("cpu", "cuda"))
    assert cpu.keys() == cuda.keys()
    for name in (name for name in cpu if name.endswith(".codes")):
        differing = (cpu[name] != cuda[name]).float().mean().item()
        # Rounding ties and GPTQ's float32 Cholesky round differently on the GPU: a few codes, not the grid.
        assert differing < (1e-3 if weights == "rtn" else 5e-2), name
