"""Shared fixtures: a tiny model saved as a Hugging Face folder, and the real model rotated once."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_models import save_hf_folder, tiny_model


@pytest.fixture(scope="session")
def tiny_hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama saved as a Hugging Face folder, with a word-level tokenizer over words w1..w95."""
    return save_hf_folder(tiny_model("llama-tied"), tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import random

    rng = random.Random(0)
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(" ".join(f"w{rng.randrange(3, 96)}" for _ in range(6000)))
    return path
