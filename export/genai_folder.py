"""The onnxruntime-genai side of an export folder: `genai_config.json`, and a load check before the folder
is moved into place.

onnxruntime-genai (C, C#, Java, Python; desktop and mobile) opens a folder by its genai_config.json:
the decoder's file and I/O names, head counts, the special token ids and the search defaults. The
fields are the ones its model builder writes (`make_genai_config` in onnxruntime_genai/models/builders),
filled from the model config, the generation config and the tokenizer. The fused layout's
GroupQueryAttention updates the cache in place, so genai may share one past/present buffer; the
traced layout concatenates, so it may not. genai cannot pass session config entries, so the graphs
must not depend on `rotaq.export.layout.SESSION_CONFIG`: every kernel states its accuracy level itself.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rotaq.export.layout import ATTENTION_MASK, GRAPH_NAME, INPUT_IDS, LOGITS
from rotaq.pipeline.errors import RotaqError, first_line

GENAI_CONFIG = "genai_config.json"
# Model types onnxruntime-genai knows by name; any other decoder runs as "llama", whose handling
# (input_ids + attention_mask + past/present, no position_ids input) is exactly this graph's contract.
_GENAI_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma")
_SEARCH_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0}


def genai_config(model_config: Any, generation_config: Any, tokenizer: Any, manifest: dict[str, Any],
                 share_buffer: bool, graph_slots: int | None = None) -> dict[str, Any]:
    """genai_config.json for an export whose export.json manifest is `manifest`. `context_length` is what the
    graph runs (`graph_slots`, the fused graph's RoPE cache), the default `max_length` the model's own context."""
    model_context = int(getattr(model_config, "max_position_embeddings", 0) or 4096)
    context_length = max(graph_slots or 0, model_context)
    eos = manifest["eos_token_ids"]
    model_type = str(manifest.get("model_type", "llama"))
    search = {key: _generation_value(generation_config, key, default) for key, default in _SEARCH_DEFAULTS.items()}
    return {
        "model": {
            "bos_token_id": _token_id(model_config, generation_config, tokenizer, "bos_token_id"),
            "context_length": context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": manifest.get("graph", GRAPH_NAME),
                "head_size": manifest["head_dim"],
                "hidden_size": manifest["hidden_size"],
                "inputs": {"input_ids": INPUT_IDS, "attention_mask": ATTENTION_MASK,
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": LOGITS, "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": manifest["num_attention_heads"],
                "num_hidden_layers": manifest["num_layers"],
                "num_key_value_heads": manifest["num_kv_heads"],
            },
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": _token_id(model_config, generation_config, tokenizer, "pad_token_id") or eos[0],
            "type": model_type if model_type in _GENAI_TYPES else "llama",
            "vocab_size": manifest["vocab_size"],
        },
        "search": {"diversity_penalty": 0.0, "early_stopping": True, "length_penalty": 1.0,
                   "max_length": model_context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": share_buffer, **search},
    }


def write_genai_config(folder: Path, config: dict[str, Any]) -> Path:
    path = Path(folder) / GENAI_CONFIG
    path.write_text(json.dumps(config, indent=4) + "\n")
    return path


def genai_available() -> bool:
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class GenaiCheck:
    """What onnxruntime-genai did with the folder: its greedy tokens, and why it cannot read the tokenizer
    (`tokenizer_problem`), if it cannot; the graph runs either way."""

    greedy_tokens: list[int]
    tokenizer_problem: str | None


def check_genai_loads(folder: Path, prompt_ids: list[int], new_tokens: int = 4) -> GenaiCheck:
    """Open the folder with onnxruntime-genai and greedy-generate `new_tokens` after `prompt_ids`: a folder
    genai cannot open or run is refused before it is moved into place."""
    import onnxruntime_genai as og

    try:
        model = open_genai_model(folder)
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt_ids) + new_tokens, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(np.asarray([prompt_ids], dtype=np.int32))
        generated: list[int] = []
        while not generator.is_done() and len(generated) < new_tokens:
            generator.generate_next_token()
            generated.append(int(generator.get_next_tokens()[0]))
    except Exception as exc:  # genai raises its own pybind exception types for every failure
        raise RotaqError(f"onnxruntime-genai cannot run the export: {first_line(exc)}; nothing was written") from exc
    return GenaiCheck(generated, tokenizer_problem(Path(folder)))


# Tokenizer models onnxruntime-genai's tokenizer (onnxruntime-extensions) reads from tokenizer.json.
_GENAI_TOKENIZER_MODELS = ("BPE", "Unigram")


def tokenizer_problem(folder: Path) -> str | None:
    """Why onnxruntime-genai cannot read the folder's tokenizer, or None. Decided from tokenizer.json's
    model type, not by opening it: og.Tokenizer on a model type it does not know can crash the process
    (a segmentation fault, measured with a WordLevel tokenizer), not raise."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        return "the export has no tokenizer.json"
    kind = json.loads(path.read_text(encoding="utf-8")).get("model", {}).get("type")
    if kind not in _GENAI_TOKENIZER_MODELS:
        return f"its {kind} tokenizer is not one onnxruntime-genai reads ({', '.join(_GENAI_TOKENIZER_MODELS)})"
    return None


def open_genai_model(folder: Path, threads: int | None = None) -> Any:
    """onnxruntime-genai's Model for an export or builder folder; `threads` as an overlay on its config, so
    the folder's files (which export.json hashes) are not edited."""
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    if threads:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    return og.Model(config)


def genai_generate_ids(folder: Path, prompt_ids: list[int], max_new_tokens: int, temperature: float, top_p: float,
                       seed: int, vocab_size: int, threads: int | None = None) -> Iterator[int]:
    """New token ids from onnxruntime-genai's Generator, as they are produced (it stops at end of sequence).
    Sampling keeps rotaq's meaning: temperature 0 is greedy, top_p the nucleus mass, no top-k cut."""
    import onnxruntime_genai as og

    if not prompt_ids:
        raise RotaqError("the prompt is empty after tokenization")
    model = open_genai_model(folder, threads)
    params = og.GeneratorParams(model)
    search: dict[str, Any] = {"max_length": len(prompt_ids) + max_new_tokens, "do_sample": temperature > 0}
    if temperature > 0:
        search.update(temperature=temperature, top_p=top_p, top_k=vocab_size, random_seed=seed)
    params.set_search_options(**search)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray([prompt_ids], dtype=np.int32))  # the prefill runs here, before timing

    def new_tokens() -> Iterator[int]:
        while not generator.is_done():
            generator.generate_next_token()
            yield int(generator.get_next_tokens()[0])

    return new_tokens()


def _generation_value(generation_config: Any, key: str, default: Any) -> Any:
    value = getattr(generation_config, key, None) if generation_config is not None else None
    return default if value is None else value


def _token_id(model_config: Any, generation_config: Any, tokenizer: Any, key: str) -> int | None:
    for owner in (generation_config, model_config, tokenizer):
        value = getattr(owner, key, None) if owner is not None else None
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return None
