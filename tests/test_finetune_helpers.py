"""Helpers shared by the adapter, finetune and merge tests (this module holds no tests)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from rotaq.adapters.finetune import FinetuneOptions
from rotaq.adapters.train import TrainConfig
from rotaq.rotations.stage import RotateOptions, run_rotate
from tests.tiny_models import tiny_model

SEQ_LEN = 32
FAST_TRAINING = TrainConfig(steps=6, lr=1e-2, batch_size=4, warmup=1, eval_every=0, save_every=2, seed=0)


def rotated_three_layer_folder(tiny_hf_folder: Path, workdir: Path) -> Path:
    """A rotated 3-layer tiny Llama (so pre_num=2 shortcuts reach two layers back) with the fixture's tokenizer."""
    plain = workdir / "plain"
    tiny_model("llama-untied", num_hidden_layers=3).save_pretrained(plain)
    AutoTokenizer.from_pretrained(tiny_hf_folder).save_pretrained(plain)
    return run_rotate(RotateOptions(model=str(plain), out=workdir / "rotated"))


def finetune_options(model: Path, out: Path, text: Path, adapter: str = "lora", **overrides) -> FinetuneOptions:
    """Small, fast settings: rank 4, 32-token windows, six steps at a high learning rate."""
    training = replace(FAST_TRAINING, **overrides.pop("training", {}))
    return FinetuneOptions(model=str(model), out=out, adapter=adapter, rank=4, data=str(text), seq_len=SEQ_LEN,
                           eval_tokens=SEQ_LEN * 8, training=training, progress=False, **overrides)


def randomize_adapters(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-zero B (and fresh A), so every adapter term shows up in the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".adapter.lora_" in name:
                parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).abs().max() / expected.abs().max())


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny tensors: handing work to a second thread costs more than the work, badly so on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
