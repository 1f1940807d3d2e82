"""Generation on ONNX Runtime without PyTorch: sampling rules, stopping, and the torch-free import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from rotaq.export.generate import SamplingOptions, choose_next_token, generate_ids
from rotaq.pipeline.errors import RotaqError

REPO = Path(__file__).resolve().parents[1]


def test_generate_module_does_not_import_torch() -> None:
    code = ("import sys, rotaq.export.generate, rotaq.export.runtime; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "assert 'transformers' not in sys.modules, 'transformers imported'")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_greedy_takes_the_argmax_and_sampling_is_seeded() -> None:
    logits = np.array([0.1, 3.0, 2.9, -1.0], dtype=np.float32)
    rng = np.random.default_rng(0)
    assert choose_next_token(logits, SamplingOptions(), rng) == 1
    # top_p below the best token's probability keeps only that token.
    assert {choose_next_token(logits, SamplingOptions(temperature=1.0, top_p=0.3), rng) for _ in range(20)} == {1}
    def draws() -> list[int]:
        return [choose_next_token(logits, SamplingOptions(temperature=2.0), np.random.default_rng(seed))
                for seed in range(30)]

    assert draws() == draws() and len(set(draws())) > 1


def test_top_p_never_samples_outside_the_nucleus() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    rng = np.random.default_rng(1)
    picks = {choose_next_token(logits, SamplingOptions(temperature=1.0, top_p=0.7), rng) for _ in range(200)}
    assert picks == {0, 1}


class _ScriptedDecoder:
    """Stands in for OnnxDecoder: its next token is always (last input token + 1) mod vocab."""

    def __init__(self, vocab: int = 8, eos: int = 5) -> None:
        self.vocab = vocab
        self.layout = SimpleNamespace(eos_token_ids=(eos,))
        self.calls: list[tuple[int, int]] = []

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, 1, 0, 2), np.float32)]

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: list[np.ndarray]):
        self.calls.append((input_ids.shape[1], attention_mask.shape[1]))
        logits = np.zeros((1, input_ids.shape[1], self.vocab), np.float32)
        logits[0, -1, (input_ids[0, -1] + 1) % self.vocab] = 1.0
        return logits, past


def test_generation_prefills_once_then_decodes_one_token_and_stops_at_eos() -> None:
    decoder = _ScriptedDecoder()
    assert list(generate_ids(decoder, [1, 2], SamplingOptions(max_new_tokens=10))) == [3, 4, 5]
    assert decoder.calls == [(2, 2), (1, 3), (1, 4)]
    assert list(generate_ids(_ScriptedDecoder(), [1], SamplingOptions(max_new_tokens=2))) == [2, 3]


@pytest.mark.parametrize("options", [dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_p=0.0)])
def test_bad_sampling_options_are_refused(options: dict) -> None:
    with pytest.raises(RotaqError):
        SamplingOptions(**options)
