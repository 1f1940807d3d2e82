"""Text generation on an exported folder with ONNX Runtime and a KV cache, without PyTorch.

One prefill pass over the prompt, then one single-token decode step per new token, each reusing
the cache the previous step returned. Greedy by default; temperature / top-p sampling on request.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rotaq.export.runtime import OnnxDecoder
from rotaq.pipeline.errors import ArtifactError, RotaqError

TOKENIZER_NAME = "tokenizer.json"


@dataclass(frozen=True)
class SamplingOptions:
    """temperature 0 means greedy (argmax); top_p < 1 keeps the smallest set of tokens with that mass."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise RotaqError(f"max_new_tokens={self.max_new_tokens} must be at least 1")
        if self.temperature < 0:
            raise RotaqError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise RotaqError(f"top_p={self.top_p} must be in (0, 1]")


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    seconds: float
    runtime: str = "onnxruntime"


def choose_next_token(logits: np.ndarray, options: SamplingOptions, rng: np.random.Generator) -> int:
    """Pick one token from a logits vector [V]."""
    if options.temperature == 0.0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / options.temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if options.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        # Keep every token whose preceding mass is below top_p: the most likely token always survives.
        keep = order[cumulative - probs[order] < options.top_p]
        kept = np.zeros_like(probs)
        kept[keep] = probs[keep]
        probs = kept / kept.sum()
    return int(rng.choice(probs.shape[0], p=probs))


def generate_ids(decoder: OnnxDecoder, prompt_ids: Sequence[int], options: SamplingOptions) -> Iterator[int]:
    """Yield new token ids as they are produced; stops after an end-of-sequence token."""
    if not prompt_ids:
        raise RotaqError("the prompt is empty after tokenization")
    rng = np.random.default_rng(options.seed)
    input_ids = np.asarray([list(prompt_ids)], dtype=np.int64)
    attention_mask = np.ones_like(input_ids)
    past = decoder.empty_past(1)
    for _ in range(options.max_new_tokens):
        logits, past = decoder.step(input_ids, attention_mask, past)
        token = choose_next_token(logits[0, -1], options, rng)
        yield token
        if token in decoder.layout.eos_token_ids:
            return
        input_ids = np.asarray([[token]], dtype=np.int64)
        attention_mask = np.ones((1, attention_mask.shape[1] + 1), dtype=np.int64)


def load_tokenizer(folder: Path):  # -> tokenizers.Tokenizer
    """The fast tokenizer saved with the export (tokenizer.json; no transformers, no torch)."""
    from tokenizers import Tokenizer

    path = Path(folder) / TOKENIZER_NAME
    if not path.is_file():
        raise ArtifactError(f"{folder} has no {TOKENIZER_NAME}; re-export from a model with a fast tokenizer")
    return Tokenizer.from_file(str(path))


RUNTIMES = ("auto", "genai", "onnxruntime")


def generation_runtime(folder: Path, runtime: str) -> str:
    """genai when asked, or (auto) when onnxruntime-genai is installed and the folder has its config; else
    the plain ONNX Runtime loop."""
    from rotaq.export.genai_folder import GENAI_CONFIG, genai_available

    if runtime not in RUNTIMES:
        raise RotaqError(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
    usable = genai_available() and (Path(folder) / GENAI_CONFIG).is_file()
    if runtime == "genai" and not usable:
        raise RotaqError(f"--runtime genai needs onnxruntime-genai (pip install 'rotaq[peer]') and "
                         f"{Path(folder) / GENAI_CONFIG} (export again to write it)")
    return "genai" if runtime == "genai" or (runtime == "auto" and usable) else "onnxruntime"


def generate_text(folder: Path, prompt: str, options: SamplingOptions,
                  on_text: Callable[[str], None] | None = None, threads: int | None = None,
                  verify: bool = False, runtime: str = "auto") -> GenerationResult:
    """Generate from `prompt`, passing each newly decoded piece of text to `on_text` as it appears, through
    onnxruntime-genai's Generator or the plain ONNX Runtime loop (`generation_runtime`). The graph files
    are checked against export.json first (sizes; SHA-256 with `verify`)."""
    from rotaq.export.layout import read_layout

    layout = read_layout(folder)  # first: a folder that is not an export says so
    chosen = generation_runtime(folder, runtime)
    tokenizer = load_tokenizer(folder)
    prompt_ids = tokenizer.encode(prompt).ids
    if chosen == "genai":
        layout.verify_graph(full=verify)
        from rotaq.export.genai_folder import genai_generate_ids

        tokens = genai_generate_ids(folder, prompt_ids, options.max_new_tokens, options.temperature, options.top_p,
                                    options.seed, layout.vocab_size, threads)
    else:
        tokens = generate_ids(OnnxDecoder(folder, threads=threads, verify=verify), prompt_ids, options)
    return _stream_text(tokenizer, prompt_ids, tokens, on_text, chosen)


def _stream_text(tokenizer: object, prompt_ids: list[int], tokens: Iterator[int],
                 on_text: Callable[[str], None] | None, runtime: str) -> GenerationResult:
    """Decode `tokens` as they arrive, passing each new piece of text to `on_text`."""
    # Decoding prompt + new tokens (not the new ones alone) keeps word boundaries and leading spaces.
    prompt_text = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    start = time.perf_counter()
    new_ids: list[int] = []
    shown = 0
    for token in tokens:
        new_ids.append(token)
        text = tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=True)[len(prompt_text):]
        # A multi-byte character split across tokens decodes as U+FFFD until its last byte arrives.
        if on_text is not None and not text.endswith("\ufffd") and len(text) > shown:
            on_text(text[shown:])
            shown = len(text)
    text = tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=True)[len(prompt_text):]
    if on_text is not None and len(text) > shown:
        on_text(text[shown:])
    return GenerationResult(text=text, token_ids=new_ids, prompt_tokens=len(prompt_ids),
                            seconds=time.perf_counter() - start, runtime=runtime)
