"""The latency gate's decision on recorded sample sets: no wall clock anywhere in this module."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from rotaq.export.bench_gate import (FAIL, INCONCLUSIVE, PASS, GateOptions, GateResult, check_baseline_target, compare,
                               load_baseline, more_rounds_while_inconclusive, save_baseline)
from rotaq.export.gate_stats import log_shift_interval, lower_critical_value, verdict
from rotaq.pipeline.errors import ArtifactError, RotaqError

MACHINE = {"cpu": "x", "threads": 2, "onnxruntime": "1"}
FP32_HASH, W4A8_HASH, SHAPE = "a" * 64, "b" * 64, "2 layers, 2 kv heads x 8, vocab 96"


def _speedups(center: float, noise: float, count: int, seed: int) -> list[float]:
    """Per-round paired speed-ups: log-normal around `center` with relative spread `noise`."""
    return np.exp(np.log(center) + noise * np.random.default_rng(seed).standard_normal(count)).tolist()


def _run(speedups: list[float], tokens_per_s: float = 200.0, reference_tokens_per_s: float = 100.0,
         w4a8_hash: str = W4A8_HASH, fp32_hash: str = FP32_HASH, name: str = "w4a8", shape: str = SHAPE,
         reference_seconds: list[float] | None = None) -> tuple[list[dict], dict]:
    """Rows and metadata as `run_bench_with_meta` returns them, from recorded samples."""
    reference_seconds = reference_seconds or [0.64] * len(speedups)
    median = float(np.median(speedups))
    rows = [{"model": "fp32", "runtime": "onnxruntime-cpu", "decode_tokens_per_s": reference_tokens_per_s,
             "graph_sha256": fp32_hash, "shape": shape},
            {"model": name, "runtime": "onnxruntime-cpu", "decode_tokens_per_s": tokens_per_s,
             "decode_speedup": median, "decode_speedup_best": median, "graph_sha256": w4a8_hash, "shape": shape}]
    meta = {"machine": MACHINE, "reference_label": "fp32", "repeats": len(speedups),
            "samples_seconds": {"fp32 (onnxruntime-cpu)": {"decode": reference_seconds},
                                f"{name} (onnxruntime-cpu)": {"decode": [r / s for r, s in
                                                                          zip(reference_seconds, speedups)]}},
            "round_speedups": {f"{name} (onnxruntime-cpu)": {"decode": speedups}}}
    return rows, meta


def _baseline(tmp_path: Path, speedups: list[float], **run) -> dict:
    return load_baseline(save_baseline(*_run(speedups, **run), tmp_path / "base.json"))


def _options(tmp_path: Path, **overrides) -> GateOptions:
    return GateOptions(baseline=tmp_path / "base.json", metrics=("decode",), **overrides)


def test_moses_critical_values_match_the_mann_whitney_table() -> None:
    # Two-sided 5% critical values of U (reject at U <= c) from the standard tables, plus one.
    assert lower_critical_value(5, 5, 0.025) == 2 + 1
    assert lower_critical_value(10, 10, 0.025) == 23 + 1
    assert lower_critical_value(20, 15, 0.025) == 90 + 1
    assert lower_critical_value(8, 6, 0.025) == 8 + 1
    assert lower_critical_value(3, 3, 0.025) == 0  # too few rounds for a 95% interval: unbounded
    # Beyond the exact limit the normal approximation agrees with the exact value it continues.
    assert abs(lower_critical_value(40, 40, 0.025) - 596) <= 1


def test_shift_interval_covers_the_true_change_and_is_unbounded_for_too_few_rounds() -> None:
    new, old = _speedups(1.6, 0.02, 12, seed=1), _speedups(2.0, 0.02, 12, seed=2)
    estimate = log_shift_interval(new, old)
    assert estimate.low < -0.2 < estimate.high and estimate.high - estimate.low < 0.06
    assert abs(estimate.change + 0.2) < 0.02
    tiny = log_shift_interval([1.0, 1.1], [1.0, 1.05])
    assert not tiny.bounded and verdict(tiny, 0.1) == INCONCLUSIVE


def test_identical_distributions_pass(tmp_path: Path) -> None:
    baseline = _baseline(tmp_path, _speedups(2.0, 0.03, 10, seed=0))
    result = compare(*_run(_speedups(2.0, 0.03, 10, seed=1)), baseline, _options(tmp_path))
    row = next(r for r in result.rows if r["model"] == "w4a8")
    assert result.verdict == PASS and result.exit_code() == 0 and row["verdict"] == PASS
    assert row["low"] > -0.10 and row["high"] < 0.10 and row["rounds"] == "10/10"
    assert not result.warnings


def test_a_twenty_percent_shift_with_low_noise_fails(tmp_path: Path) -> None:
    baseline = _baseline(tmp_path, _speedups(2.0, 0.03, 10, seed=0))
    result = compare(*_run(_speedups(1.6, 0.03, 10, seed=1), tokens_per_s=160.0), baseline, _options(tmp_path))
    row = next(r for r in result.rows if r["model"] == "w4a8")
    assert result.verdict == FAIL and result.exit_code() == 1 and row["high"] < -0.10
    assert abs(row["change_vs_fp32"] + 0.2) < 0.05


def test_a_twenty_percent_shift_buried_in_forty_percent_noise_is_inconclusive(tmp_path: Path) -> None:
    baseline = _baseline(tmp_path, _speedups(2.0, 0.03, 10, seed=0))
    result = compare(*_run(_speedups(1.6, 0.40, 5, seed=3)), baseline, _options(tmp_path))
    row = next(r for r in result.rows if r["model"] == "w4a8")
    assert result.verdict == INCONCLUSIVE and row["low"] < -0.10 < row["high"]
    assert result.exit_code("exit") == 3 and result.exit_code("fail") == 1 and result.exit_code("pass") == 0


def test_adaptive_repeats_ask_for_rounds_only_while_inconclusive(tmp_path: Path) -> None:
    baseline = _baseline(tmp_path, _speedups(2.0, 0.03, 10, seed=0))
    more = more_rounds_while_inconclusive(baseline, _options(tmp_path, max_repeats=12), batch=5)
    assert more(*_run(_speedups(1.6, 0.40, 5, seed=3))) == 5  # inconclusive at 5 rounds: 5 more
    assert more(*_run(_speedups(1.6, 0.40, 10, seed=3))) == 2  # still inconclusive: up to max_repeats only
    assert more(*_run(_speedups(1.6, 0.40, 12, seed=3))) == 0
    assert more(*_run(_speedups(2.0, 0.03, 5, seed=1))) == 0  # already decided


def test_a_noisy_reference_is_named_in_the_verdict(tmp_path: Path) -> None:
    baseline = _baseline(tmp_path, _speedups(2.0, 0.03, 10, seed=0))
    noisy_reference = [0.64, 0.66, 0.9, 0.65, 0.64, 0.63, 0.64, 1.1, 0.65, 0.64]
    result = compare(*_run(_speedups(2.0, 0.03, 10, seed=1), reference_seconds=noisy_reference), baseline,
                     _options(tmp_path))
    row = next(r for r in result.rows if r["model"] == "w4a8")
    assert "reference spread" in row["note"] and row["verdict"] == PASS


def test_a_slower_machine_warns_and_fails_only_with_absolute(tmp_path: Path) -> None:
    baseline = _baseline(tmp_path, _speedups(2.0, 0.03, 10, seed=0))
    slower_machine = _run(_speedups(2.0, 0.03, 10, seed=1), tokens_per_s=140.0, reference_tokens_per_s=70.0,
                          reference_seconds=[0.64 / 0.7] * 10)
    relative = compare(*slower_machine, baseline, _options(tmp_path))
    assert relative.verdict == PASS and any("absolute terms" in w for w in relative.warnings)
    assert compare(*slower_machine, baseline, _options(tmp_path, absolute=True)).verdict == FAIL


def test_baseline_of_another_model_warns_and_a_missing_model_fails(tmp_path: Path) -> None:
    baseline = _baseline(tmp_path, _speedups(2.0, 0.03, 10, seed=0))
    other = _run(_speedups(2.0, 0.03, 10, seed=1), fp32_hash="c" * 64, shape="4 layers, 2 kv heads x 8, vocab 96")
    warnings = compare(*other, baseline, _options(tmp_path)).warnings
    assert any("reference 'fp32' is a different graph" in w for w in warnings)
    assert any("is a different model from the baseline's" in w for w in warnings)
    # A new build of the same model (new weights, same shape) is what a gate is for: no warning.
    rebuilt = _run(_speedups(2.0, 0.03, 10, seed=1), w4a8_hash="d" * 64)
    assert not compare(*rebuilt, baseline, _options(tmp_path)).warnings
    # Renamed: found by its hash. Gone: the gate fails.
    renamed = compare(*_run(_speedups(2.0, 0.03, 10, seed=1), name="w4a8-v2"), baseline, _options(tmp_path))
    assert renamed.verdict == PASS and any("matched by its hash" in w for w in renamed.warnings)
    rows, meta = _run(_speedups(2.0, 0.03, 10, seed=1))
    missing = compare(rows[:1], meta, baseline, _options(tmp_path))
    assert missing.verdict == FAIL and any("missing from this run" in r.get("note", "") for r in missing.rows)


def test_an_old_baseline_without_samples_is_judged_by_the_point_rule(tmp_path: Path) -> None:
    rows, meta = _run(_speedups(2.0, 0.03, 10, seed=0))
    path = tmp_path / "base.json"
    path.write_text(json.dumps({"format": "rotaq-bench-baseline/1", "machine": MACHINE, "reference": "fp32",
                                "rows": rows}))
    baseline = load_baseline(path)
    same = compare(rows, meta, baseline, _options(tmp_path))
    assert same.verdict == PASS and any("no raw samples" in w for w in same.warnings)
    slower = _run(_speedups(1.6, 0.03, 10, seed=0))
    assert compare(*slower, baseline, _options(tmp_path)).verdict == FAIL


@pytest.mark.parametrize("contents, message", [
    ('{"format": "rotaq-bench-baseline/1", "machine": {}}', "'rows' is missing"),
    ('{"format": "rotaq-bench-baseline/1", "rows": [{"model": "a", "runtime": "r", "decode_tokens_per_s": 0}]}',
     "is not a positive number"),
    ('{"format": "rotaq-bench-baseline/1", "rows": [{"model": "a", "runtime": "r", "prefill_ms_128": "1"}]}',
     "is not a positive number"),
    ('{"format": "rotaq-bench-baseline/1", "machine": [1], "rows": [{"model": "a", "runtime": "r"}]}',
     "'machine' is not a mapping"),
    ('{"format": "rotaq-bench-baseline/1", "rows": [{"model": "a"}]}', "no model and runtime"),
    ('{"format": "rotaq-bench-baseline/1", "rows": [{"model": "a", "runtime": "r", '
     '"round_speedups": {"decode": [1, -2]}}]}', "round_speedups is not lists of positive numbers"),
    ('{"format": "rotaq-bench-baseline/1", "rows": [', "not valid JSON"),
    ("[1, 2]", "not a rotaq bench baseline"),
])
def test_bad_baselines_get_one_line_errors(tmp_path: Path, contents: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(contents)
    with pytest.raises(ArtifactError, match=message):
        load_baseline(path)


def test_gate_options_are_checked(tmp_path: Path) -> None:
    for bad in ({"max_regression": 10}, {"metrics": ("memory",)}, {"inconclusive": "maybe"},
                {"max_repeats": 0}, {"confidence": 1.0}):
        with pytest.raises(RotaqError):
            GateOptions(baseline=tmp_path / "b.json", **bad)
    with pytest.raises(ArtifactError, match="does not exist"):
        load_baseline(tmp_path / "missing.json")


def test_gate_result_exit_codes() -> None:
    assert GateResult([], PASS, []).exit_code() == 0 and GateResult([], FAIL, []).exit_code("pass") == 1
    assert math.isinf(log_shift_interval([1.0], [1.0]).high)


def test_a_baseline_replaces_only_a_baseline(tmp_path: Path) -> None:
    path = save_baseline(*_run(_speedups(2.0, 0.03, 5, seed=0)), tmp_path / "base.json")
    check_baseline_target(path)  # an existing baseline may be refreshed
    check_baseline_target(tmp_path / "new.json")
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}')
    with pytest.raises(RotaqError, match="refusing to overwrite"):
        check_baseline_target(notes)
    check_baseline_target(notes, force=True)
    with pytest.raises(RotaqError, match="is a folder"):
        check_baseline_target(tmp_path)


def test_another_rotaq_or_onnxruntime_version_warns(tmp_path: Path) -> None:
    rows, meta = _run(_speedups(2.0, 0.03, 10, seed=0))
    baseline = load_baseline(save_baseline(rows, {**meta, "machine": {**MACHINE, "rotaq": "0.1.0"}},
                                           tmp_path / "base.json"))
    newer = {**meta, "machine": {**MACHINE, "rotaq": "0.2.0", "onnxruntime": "2"}}
    warnings = compare(rows, newer, baseline, _options(tmp_path)).warnings
    assert any("rotaq differs" in w for w in warnings) and any("onnxruntime differs" in w for w in warnings)
