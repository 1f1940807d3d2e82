"""The report's charts: each fits a 1280-px page, draws nothing for nothing, and survives missing numbers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from rotaq.pipeline.report.charts import (MAX_WIDTH_PX, pareto_front, plot_accuracy_tradeoff, plot_bench, plot_training,
                                    rolling_mean)


def _size(path: Path) -> tuple[int, int]:
    """(width, height) in pixels, read back from the PNG."""
    from PIL import Image

    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.size


@pytest.mark.parametrize("count", [1, 2, 3, 4, 6, 7])
def test_bench_chart_fits_the_page_for_any_number_of_metrics(tmp_path: Path, count: int) -> None:
    metrics = [f"metric_{i}" for i in range(count)]
    rows = [{metric: 10.0 * (j + 1) + i for i, metric in enumerate(metrics)} for j in range(3)]
    rows[1]["metric_0"] = None  # a model without this number: no bar, no crash
    labels = ["float32 reference", "rotaq w4a16 g128 merged", "peer int4"]
    path = plot_bench(rows, metrics, labels, tmp_path / "bench.png", titles={"metric_0": "Decode tok/s"})
    width, _ = _size(path)
    assert width <= MAX_WIDTH_PX


def test_bench_chart_titles_default_to_metric_keys(tmp_path: Path) -> None:
    rows = [{"decode_tokens_per_s": 12.0}, {"decode_tokens_per_s": 30.0}]
    assert plot_bench(rows, ["decode_tokens_per_s"], ["a", "b"], tmp_path / "b.png") == tmp_path / "b.png"
    assert (tmp_path / "b.png").stat().st_size > 0


def test_training_chart_draws_loss_and_perplexity(tmp_path: Path) -> None:
    steps = [{"step": i + 1, "loss": 4.0 * math.exp(-i / 40) + 0.1 * (i % 3), "lr": 1e-4} for i in range(200)]
    steps[50]["loss"] = None  # a gap, not a crash
    log = {"steps": steps,
           "evaluations": [{"step": 0, "perplexity": 80.0, "nll": 4.38, "tokens": 1024},
                           {"step": 100, "perplexity": 14.0, "nll": 2.64, "tokens": 1024},
                           {"step": 200, "perplexity": 12.0, "nll": 2.48, "tokens": 1024}],
           "structure_changes": [{"step": 120, "kind": "merge-lor2c"}]}
    path = plot_training(log, tmp_path / "charts" / "training.png")
    assert path == tmp_path / "charts" / "training.png"
    assert _size(path)[0] <= MAX_WIDTH_PX


def test_training_chart_without_evaluations_or_step_keys(tmp_path: Path) -> None:
    """The step index is implicit (record i is step i + 1) when a record lacks it."""
    log = {"steps": [{"loss": 3.0}, {"loss": 2.5}, {"loss": 2.4}], "evaluations": []}
    assert plot_training(log, tmp_path / "t.png") == tmp_path / "t.png"


def test_training_chart_writes_nothing_without_steps(tmp_path: Path) -> None:
    assert plot_training({"steps": [], "evaluations": [{"step": 0, "perplexity": 9.0}]}, tmp_path / "t.png") is None
    assert plot_training({}, tmp_path / "t.png") is None
    assert not (tmp_path / "t.png").exists()


def _points() -> list[dict]:
    return [
        {"label": "float32", "kind": "float", "perplexity": 10.0, "decode_speedup": 1.0, "file_mb": 400.0},
        {"label": "w8a8", "kind": "rotaq", "perplexity": 10.2, "decode_speedup": 1.8, "file_mb": 110.0},
        {"label": "w4a16", "kind": "rotaq", "perplexity": 11.0, "decode_speedup": 2.6, "file_mb": 60.0},
        {"label": "w4a16 near", "kind": "rotaq", "perplexity": 11.05, "decode_speedup": 2.61, "file_mb": 61.0},
        {"label": "peer int4", "kind": "peer", "perplexity": 13.0, "decode_speedup": 2.4, "file_mb": 58.0},
        {"label": "no bench", "kind": "rotaq", "perplexity": 10.5, "decode_speedup": None, "file_mb": None},
        {"label": "no eval", "kind": "peer", "perplexity": None, "decode_speedup": 3.0, "file_mb": 50.0},
    ]


def test_tradeoff_chart_fits_the_page(tmp_path: Path) -> None:
    path = plot_accuracy_tradeoff(_points(), tmp_path / "tradeoff.png")
    assert path == tmp_path / "tradeoff.png"
    assert _size(path)[0] <= MAX_WIDTH_PX


def test_tradeoff_chart_with_one_panel_and_log_scale(tmp_path: Path) -> None:
    points = [{"label": "float32", "kind": "float", "perplexity": 10.0, "decode_speedup": None, "file_mb": 400.0},
              {"label": "w2", "kind": "rotaq", "perplexity": 90.0, "decode_speedup": None, "file_mb": 40.0}]
    path = plot_accuracy_tradeoff(points, tmp_path / "one.png")
    assert path is not None and _size(path)[0] <= MAX_WIDTH_PX


def test_tradeoff_chart_writes_nothing_without_points(tmp_path: Path) -> None:
    assert plot_accuracy_tradeoff([], tmp_path / "t.png") is None
    missing = [{"label": "x", "kind": "rotaq", "perplexity": None, "decode_speedup": 2.0, "file_mb": 5.0},
               {"label": "y", "kind": "peer", "perplexity": 9.0, "decode_speedup": None, "file_mb": None}]
    assert plot_accuracy_tradeoff(missing, tmp_path / "t.png") is None
    assert not (tmp_path / "t.png").exists()


def test_pareto_front_on_a_known_set() -> None:
    points = _points()
    by_speed = [point["label"] for point in pareto_front(points, "decode_speedup", higher_is_better=True)]
    # "peer int4" is slower and worse than w4a16; "w4a16 near" is faster than w4a16 for a little perplexity;
    # "no bench" / "no eval" miss a number and are on no front.
    assert by_speed == ["float32", "w8a8", "w4a16", "w4a16 near"]
    by_size = [point["label"] for point in pareto_front(points, "file_mb", higher_is_better=False)]
    assert by_size == ["peer int4", "w4a16", "w8a8", "float32"]  # "w4a16 near" is bigger and worse than w4a16


def test_pareto_front_ties() -> None:
    """A point matched on one axis and beaten on the other is dominated; exact duplicates both stay."""
    points = [{"perplexity": 5.0, "x": 2.0, "n": "a"}, {"perplexity": 5.0, "x": 1.0, "n": "b"},
              {"perplexity": 4.0, "x": 1.0, "n": "c"}, {"perplexity": 4.0, "x": 1.0, "n": "d"}]
    assert [point["n"] for point in pareto_front(points, "x", higher_is_better=True)] == ["c", "d", "a"]
    assert [point["n"] for point in pareto_front(points, "x", higher_is_better=False)] == ["c", "d"]
    assert pareto_front([], "x", higher_is_better=True) == []


def test_rolling_mean_starts_at_the_first_step_and_skips_gaps() -> None:
    assert rolling_mean([1.0, 3.0, math.nan, 5.0], 2) == [1.0, 2.0, 3.0, 5.0]
    assert rolling_mean([2.0], 5) == [2.0]
