"""Evaluation metrics, outlier statistics, tables and plots on tiny CPU models."""

from __future__ import annotations

import copy
import csv
import json
import math
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from rotaq.eval.metrics import EvalResult, compare_logits, evaluate, evaluate_logits_fn
from rotaq.eval.outliers import collect_linear_input_stats, outlier_table, summarize
from rotaq.eval.plots import plot_outliers
from rotaq.eval.tables import markdown_table, write_table
from rotaq.pipeline.errors import DataError, RotaqError

VOCAB = 64


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    return torch.randint(0, VOCAB, (5, 12), generator=torch.Generator().manual_seed(1))


def _perturbed(model: nn.Module) -> nn.Module:
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.lm_head.weight.add_(0.5 * torch.randn(other.lm_head.weight.shape, generator=torch.Generator().manual_seed(2)))
    return other


# --- metrics -------------------------------------------------------------------------------------


def test_perplexity_is_exp_of_cross_entropy(llama, windows):
    result = evaluate(llama, windows, progress=False)
    with torch.no_grad():
        logits = llama(input_ids=windows).logits
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).double(), windows[:, 1:].reshape(-1))
    assert result.perplexity == pytest.approx(math.exp(ce.item()), rel=1e-6)
    assert result.nll == pytest.approx(ce.item(), rel=1e-6)
    assert (result.tokens, result.windows, result.seq_len) == (5 * 11, 5, 12)
    assert result.kl_divergence is None and result.top1_agreement is None
    assert EvalResult(**result.to_dict()) == result


def test_self_reference_has_zero_kl_and_full_agreement(llama, windows):
    result = evaluate(llama, windows, reference=llama, progress=False)
    assert result.kl_divergence == pytest.approx(0.0, abs=1e-12)
    assert result.top1_agreement == 1.0


def test_perturbed_model_has_positive_kl(llama, windows):
    result = evaluate(_perturbed(llama), windows, reference=llama, progress=False)
    assert result.kl_divergence > 1e-4
    assert 0.0 <= result.top1_agreement <= 1.0


def test_kl_matches_hand_computation(llama, windows):
    other = _perturbed(llama)
    result = evaluate(other, windows, reference=llama, progress=False)
    with torch.no_grad():
        p_log = llama(input_ids=windows).logits[:, :-1].double().log_softmax(-1)
        q_log = other(input_ids=windows).logits[:, :-1].double().log_softmax(-1)
    expected = (p_log.exp() * (p_log - q_log)).sum(-1).mean().item()
    agreement = (p_log.argmax(-1) == q_log.argmax(-1)).double().mean().item()
    assert result.kl_divergence == pytest.approx(expected, rel=1e-6)
    assert result.top1_agreement == pytest.approx(agreement)


def test_batch_size_does_not_change_result(llama, windows):
    other = _perturbed(llama)
    results = [evaluate(other, windows, reference=llama, batch_size=b, progress=False) for b in (1, 2, 5, 8)]
    for result in results[1:]:
        assert result.perplexity == pytest.approx(results[0].perplexity, rel=1e-9)
        assert result.kl_divergence == pytest.approx(results[0].kl_divergence, rel=1e-9)
        assert result.top1_agreement == results[0].top1_agreement


def test_position_chunking_does_not_change_result(llama, windows, monkeypatch):
    other = _perturbed(llama)
    whole = evaluate(other, windows, reference=llama, progress=False)
    monkeypatch.setattr("rotaq.eval.metrics._CHUNK_ELEMENTS", 3 * VOCAB)  # 3 positions per float64 slice
    sliced = evaluate(other, windows, reference=llama, progress=False)
    assert sliced.nll == pytest.approx(whole.nll, rel=1e-12)
    assert sliced.kl_divergence == pytest.approx(whole.kl_divergence, rel=1e-12)
    assert sliced.top1_agreement == whole.top1_agreement


def test_evaluate_logits_fn_accepts_numpy(llama, windows):
    def numpy_logits(ids: torch.Tensor) -> np.ndarray:
        return llama(input_ids=ids).logits.numpy()

    by_model = evaluate(llama, windows, reference=llama, batch_size=2, progress=False)
    by_fn = evaluate_logits_fn(numpy_logits, windows.numpy(), numpy_logits, batch_size=3, progress=False)
    assert by_fn.perplexity == pytest.approx(by_model.perplexity, rel=1e-9)
    assert by_fn.kl_divergence == pytest.approx(0.0, abs=1e-12)
    assert by_fn.top1_agreement == 1.0


def test_evaluate_restores_training_mode(llama, windows):
    llama.train()
    try:
        evaluate(llama, windows[:1], progress=False)
        assert llama.training
    finally:
        llama.eval()


def test_evaluate_rejects_bad_windows(llama):
    with pytest.raises(DataError):
        evaluate(llama, torch.zeros((0, 8), dtype=torch.long), progress=False)
    with pytest.raises(DataError):
        evaluate(llama, torch.zeros((3, 1), dtype=torch.long), progress=False)
    with pytest.raises(DataError):
        evaluate(llama, torch.full((1, 4), VOCAB), progress=False)
    with pytest.raises(DataError):
        evaluate_logits_fn(lambda ids: torch.zeros(*ids.shape, 8), torch.full((1, 4), 8), progress=False)


def test_evaluate_logits_fn_rejects_wrong_logits_shape(windows):
    with pytest.raises(RotaqError):
        evaluate_logits_fn(lambda ids: torch.zeros(ids.shape[0], VOCAB), windows, progress=False)


def test_compare_logits():
    a = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 4.0]])
    same = compare_logits(a, a.clone())
    assert same["max_rel_error"] == 0.0 and same["mean_kl"] == pytest.approx(0.0, abs=1e-15)
    assert same["top1_agreement"] == 1.0

    b = a.clone()
    b[1] = torch.tensor([5.0, -1.0, 4.0])  # second row's argmax moves
    diff = compare_logits(a, b)
    assert diff["max_abs_error"] == 5.0
    assert diff["max_rel_error"] == pytest.approx(5.0 / 5.0)
    assert diff["top1_agreement"] == 0.5
    assert diff["mean_kl"] > 0
    assert compare_logits(a.numpy(), b.numpy()) == diff
    with pytest.raises(RotaqError):
        compare_logits(a, b[:1])


# --- outlier statistics --------------------------------------------------------------------------


class _Feed(nn.Module):
    """A 'model' whose token ids pick fixed activation rows that are fed to one linear layer."""

    def __init__(self, linear: nn.Linear, rows: torch.Tensor) -> None:
        super().__init__()
        self.rows = nn.Embedding.from_pretrained(rows)
        self.linear = linear

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.linear(self.rows(input_ids)))




def _rotated_linear(in_features: int, out_features: int) -> nn.Module:
    """An online-rotated linear (orthonormal Hadamard on its input before the matmul), as rotate installs it."""
    from rotaq.rotations.online import OnlineRotatedLinear, OnlineRotation, online_rotation_spec

    return OnlineRotatedLinear.wrap(nn.Linear(in_features, out_features),
                                    OnlineRotation(online_rotation_spec(in_features, "hadamard", 0)))


def _hand_stats(x: np.ndarray) -> tuple[float, float, float, float]:
    peak = np.abs(x).max(1) / np.sqrt((x**2).mean(1))
    centred = x - x.mean(1, keepdims=True)
    kurt = (centred**4).mean(1) / (centred**2).mean(1) ** 2
    return peak.max(), peak.mean(), kurt.mean(), np.abs(x).max()


def test_linear_input_stats_match_hand_computation():
    rows = torch.tensor([[1.0, -2.0, 3.0, 0.5], [0.0, 0.0, 0.0, 10.0], [4.0, 4.0, -4.0, 1.0]])
    model = _Feed(nn.Linear(4, 3), rows)
    (stats,) = collect_linear_input_stats(model, torch.tensor([[0, 1], [2, 0]]), progress=False, batch_size=1)
    seen = rows[[0, 1, 2, 0]].numpy().astype(np.float64)
    peak_max, peak_mean, kurt, max_abs = _hand_stats(seen)
    assert stats.name == "linear" and stats.in_features == 4 and stats.tokens == 4
    assert stats.max_abs_over_rms == pytest.approx(peak_max, rel=1e-12)
    assert stats.max_abs_over_rms == pytest.approx(2.0)  # one-hot row in 4 dims: 10 / (10 / 2)
    assert stats.mean_max_abs_over_rms == pytest.approx(peak_mean, rel=1e-12)
    assert stats.kurtosis == pytest.approx(kurt, rel=1e-12)
    assert stats.max_abs == pytest.approx(max_abs)


def test_gaussian_input_has_kurtosis_three():
    rows = torch.randn(64, 4096, generator=torch.Generator().manual_seed(3))
    model = _Feed(nn.Linear(4096, 1), rows)
    (stats,) = collect_linear_input_stats(model, torch.arange(64)[None], progress=False)
    assert stats.kurtosis == pytest.approx(3.0, abs=0.1)


def test_statistics_are_taken_on_the_matmul_input_of_a_rotated_linear():
    rows = torch.tensor([[0.0, 0.0, 0.0, 10.0]])
    plain = collect_linear_input_stats(_Feed(nn.Linear(4, 2), rows), torch.zeros((1, 3), dtype=torch.long), progress=False)
    rotated = collect_linear_input_stats(
        _Feed(_rotated_linear(4, 2), rows), torch.zeros((1, 3), dtype=torch.long), progress=False
    )
    assert plain[0].max_abs_over_rms == pytest.approx(2.0) and plain[0].max_abs == pytest.approx(10.0)
    # H4 / 2 spreads the one-hot row to [5, -5, -5, 5]: flat, so peak/RMS = 1 and |x|max = 5.
    assert rotated[0].max_abs_over_rms == pytest.approx(1.0) and rotated[0].max_abs == pytest.approx(5.0)


def test_llama_stats_cover_every_linear_and_remove_hooks(llama, windows):
    stats = collect_linear_input_stats(llama, windows, progress=False)
    linears = [name for name, module in llama.named_modules() if isinstance(module, nn.Linear)]
    assert [s.name for s in stats] == linears and linears[-1] == "lm_head"
    assert all(s.tokens == windows.numel() and s.max_abs_over_rms >= 1.0 for s in stats)
    assert all(not module._forward_pre_hooks for module in llama.modules())

    only_mlp = collect_linear_input_stats(llama, windows, module_filter=lambda name, _: ".mlp." in name, progress=False)
    assert len(only_mlp) == 6


def test_hooks_removed_after_error():
    class Broken(_Feed):
        def forward(self, input_ids):
            super().forward(input_ids)
            raise RuntimeError("boom")

    model = Broken(nn.Linear(4, 2), torch.ones(1, 4))
    with pytest.raises(RuntimeError, match="boom"):
        collect_linear_input_stats(model, torch.zeros((1, 2), dtype=torch.long), progress=False)
    assert not model.linear._forward_pre_hooks


def test_outlier_table_and_summary(llama, windows):
    before = collect_linear_input_stats(llama, windows, progress=False)
    after = [replace(s, max_abs_over_rms=1.5) for s in before[1:]]
    rows = outlier_table(before, after)
    assert [r["layer"] for r in rows] == [s.name for s in before]
    assert rows[0]["max_abs_over_rms_after"] is None
    assert rows[1]["max_abs_over_rms_before"] == before[1].max_abs_over_rms
    assert rows[1]["max_abs_over_rms_after"] == 1.5
    assert set(outlier_table(before, None)[0]) == {
        "layer", "in_features", "max_abs_over_rms", "mean_max_abs_over_rms", "kurtosis", "max_abs"
    }

    summary = summarize(before)
    worst = max(before, key=lambda s: s.max_abs_over_rms)
    assert summary["max_abs_over_rms"] == worst.max_abs_over_rms
    assert summary["max_abs_over_rms_layer"] == worst.name
    assert summary["mean_kurtosis"] == pytest.approx(np.mean([s.kurtosis for s in before]))
    assert summary["layers"] == len(before)


# --- tables and plots ----------------------------------------------------------------------------


def test_write_table(tmp_path):
    rows = [
        {"model": "base", "ppl": 12.345678, "tokens": 1000, "kl": None},
        {"model": "w4|rot", "ppl": 13.0, "tokens": 1000, "kl": float("nan")},
    ]
    paths = write_table(rows, tmp_path / "sub" / "eval.w4", formats={"tokens": ",d"})
    assert {p.name for p in paths.values()} == {"eval.w4.md", "eval.w4.csv", "eval.w4.json"}
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["eval.w4.csv", "eval.w4.json", "eval.w4.md"]

    md = paths["md"].read_text().splitlines()
    assert md[0] == "| Model | ppl | tokens | kl |"  # the label of a known key (rotaq.eval.labels); CSV keeps the key
    assert md[1] == "| --- | ---: | ---: | ---: |"
    assert md[2] == "| base | 12.35 | 1,000 |  |"
    assert md[3] == "| w4\\|rot | 13 | 1,000 | nan |"

    with paths["csv"].open() as handle:
        csv_rows = list(csv.DictReader(handle))
    assert csv_rows[0] == {"model": "base", "ppl": "12.345678", "tokens": "1000", "kl": ""}

    data = json.loads(paths["json"].read_text())
    assert data == [
        {"model": "base", "ppl": 12.345678, "tokens": 1000, "kl": None},
        {"model": "w4|rot", "ppl": 13.0, "tokens": 1000, "kl": None},
    ]


def test_markdown_table_column_selection():
    text = markdown_table([{"a": 1, "b": 0.000123456}], columns=["b"])
    assert text == "| b |\n| ---: |\n| 0.0001235 |\n"


def test_plot_outliers_writes_png(tmp_path, llama, windows):
    before = collect_linear_input_stats(llama, windows, progress=False)
    path = plot_outliers(before, before, tmp_path / "outliers.png", "tiny llama")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 1000
    assert [p.name for p in tmp_path.iterdir()] == ["outliers.png"]
    assert plot_outliers(before, None, tmp_path / "before.png", "before only").stat().st_size > 0
