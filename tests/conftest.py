"""Shared fixtures: a tiny model saved as a Hugging Face folder, and the real model rotated once."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_models import tiny_model


@pytest.fixture(scope="session")
def tiny_hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama saved as a Hugging Face folder, with a word-level tokenizer over words w1..w95."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-llama")
    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, 96)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="w2", pad_token="w1")
    model = tiny_model("llama-tied")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import random

    rng = random.Random(0)
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(" ".join(f"w{rng.randrange(3, 96)}" for _ in range(6000)))
    return path
