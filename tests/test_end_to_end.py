"""The real embedded model (SmolLM2-135M-Instruct GGUF) through the rotate stage, on Shakespeare."""

from __future__ import annotations

import pytest

from rotaq.eval.metrics import evaluate
from rotaq.eval.outliers import collect_linear_input_stats, summarize
from rotaq.pipeline.data import DataSpec, load_split_windows
from rotaq.pipeline.loading import LoadedModel, load_model
from rotaq.rotations.stage import RotateOptions, run_rotate

pytestmark = pytest.mark.slow
EVAL = DataSpec(seq_len=512, max_tokens=2048)


@pytest.fixture(scope="module")
def original_and_rotated(tmp_path_factory: pytest.TempPathFactory) -> tuple[LoadedModel, LoadedModel]:
    folder = run_rotate(RotateOptions(model=None, out=tmp_path_factory.mktemp("e2e") / "rotated"))
    return load_model(None), load_model(str(folder))


def test_rotation_keeps_real_model_perplexity(original_and_rotated: tuple[LoadedModel, LoadedModel]) -> None:
    original, rotated = original_and_rotated
    windows = load_split_windows(EVAL, original.tokenizer, "evaluation")
    before = evaluate(original.model, windows, progress=False)
    after = evaluate(rotated.model, windows, reference=original.model, progress=False)
    assert f"{before.perplexity:.4g}" == f"{after.perplexity:.4g}"
    assert after.top1_agreement > 0.999 and after.kl_divergence < 1e-6
    assert rotated.manifest["rotation"]["check"]["max_relative_logit_error"] < 1e-4


def test_rotation_reduces_real_model_outliers(original_and_rotated: tuple[LoadedModel, LoadedModel]) -> None:
    original, rotated = original_and_rotated
    windows = load_split_windows(DataSpec(seq_len=256, max_tokens=256), original.tokenizer, "calibration")
    before = summarize(collect_linear_input_stats(original.model, windows, progress=False))
    after = summarize(collect_linear_input_stats(rotated.model, windows, progress=False))
    assert after["max_abs_over_rms"] < 0.5 * before["max_abs_over_rms"]
    assert after["mean_kurtosis"] < before["mean_kurtosis"]
