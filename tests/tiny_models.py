"""Tiny random models of every supported family, with non-power-of-two widths and non-trivial norms.

Widths are chosen so that the residual, MLP and attention widths need Paley factors (12, 20, 28,
36, 60) and head counts have no Hadamard matrix of their own (3, 5), like real models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB_SIZE = 96

TINY_CONFIGS: dict[str, dict] = {
    "llama-tied": dict(model_type="llama", hidden_size=48, intermediate_size=80, num_attention_heads=3,
                       num_key_value_heads=1, head_dim=16, tie_word_embeddings=True),
    "llama-untied": dict(model_type="llama", hidden_size=48, intermediate_size=112, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=12, tie_word_embeddings=False),
    "mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=96, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, sliding_window=None),
    "qwen2-bias": dict(model_type="qwen2", hidden_size=40, intermediate_size=72, num_attention_heads=5,
                       num_key_value_heads=1, tie_word_embeddings=True),
    "qwen3-qknorm": dict(model_type="qwen3", hidden_size=48, intermediate_size=112, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=12, tie_word_embeddings=False),
    "smollm3": dict(model_type="smollm3", hidden_size=36, intermediate_size=60, num_attention_heads=3,
                    num_key_value_heads=1, tie_word_embeddings=True),
}


# What the fused graph layout needs on top (GroupQueryAttention's rotary kernel takes head_dim % 16 == 0),
# and a sliding window shorter than the test prompts; widths stay non-power-of-two.
FUSED_OVERRIDES: dict[str, dict] = {
    name: {**({} if values.get("head_dim", values["hidden_size"] // values["num_attention_heads"]) % 16 == 0
              else {"head_dim": 16}), **({"sliding_window": 6} if name == "mistral" else {})}
    for name, values in TINY_CONFIGS.items()}


def tiny_config(name: str, num_hidden_layers: int = 2, overrides: dict | None = None):
    values = {**TINY_CONFIGS[name], **(overrides or {})}
    model_type = values.pop("model_type")
    return AutoConfig.for_model(model_type, vocab_size=VOCAB_SIZE, num_hidden_layers=num_hidden_layers,
                                max_position_embeddings=256, pad_token_id=0,
                                bos_token_id=1, eos_token_id=2, **values)


def tiny_model(name: str, seed: int = 0, num_hidden_layers: int = 2, overrides: dict | None = None) -> torch.nn.Module:
    """A float32 random model whose norm weights and biases are far from their trivial init."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(name, num_hidden_layers, overrides), dtype=torch.float32)
    with torch.no_grad():
        for module_name, parameter in model.named_parameters():
            if "norm" in module_name:
                parameter.copy_(1.0 + 0.5 * torch.randn_like(parameter).abs())
            elif module_name.endswith("bias"):
                parameter.copy_(0.1 * torch.randn_like(parameter))
    return model.eval()


def random_tokens(count: int = 2, length: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB_SIZE, (count, length), generator=torch.Generator().manual_seed(seed))


def word_tokenizer() -> Any:
    """A word-level tokenizer over the words w1..w95 of the tiny vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, VOCAB_SIZE)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="w2", pad_token="w1")


def save_hf_folder(model: torch.nn.Module, folder: Path, **save_options: Any) -> Path:
    """`model` and the word tokenizer as a Hugging Face model folder."""
    model.save_pretrained(folder, **save_options)
    word_tokenizer().save_pretrained(folder)
    return folder
