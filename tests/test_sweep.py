"""`rotaq sweep` on a tiny model: variants from a grid, shared stages run once, tables and Pareto fronts."""

from __future__ import annotations

import contextlib
import io
import json
import sys
import types
import zlib
from pathlib import Path
from typing import Any

import pytest
import yaml

from rotaq.pipeline.cli import main
from rotaq.pipeline.run.config_loading import ConfigError
from rotaq.pipeline.errors import ArtifactError
from rotaq.pipeline.sweep.execute import plan_sweep, run_sweep
from rotaq.pipeline.sweep.spec import load_sweep
from rotaq.pipeline.sweep.table import mark_pareto
from rotaq.export.bench import BenchOptions
from tests.test_run import fake_export, tiny_settings


def write_sweep(folder: Path, sweep: dict[str, Any], base: dict[str, Any]) -> Path:
    (folder / "base.yaml").write_text(yaml.safe_dump(base))
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump({"config": "base.yaml", **sweep}))
    return path


def fake_bench_by_name(options: BenchOptions) -> None:
    """bench.json rows whose speed and size depend on the exported model, so the fronts have something to rank."""
    rows = []
    for model in options.models:
        name = Path(model).name
        quantized = "w4" in name
        speed = 101.0 + zlib.crc32(name.encode()) % 50 if quantized else 50.0
        row = {"model": name, "prefill_ms_128": 2.0, "decode_tokens_per_s": speed,
               "file_mb": (0.2 if "w4a4" in name else 0.3) if quantized else 1.0, "peak_rss_mb": 100.0}
        # as the real bench does, the float32 reference row has ratios of 1
        row.update(decode_speedup=speed / 50.0, size_ratio=row["file_mb"],
                   prefill_speedup_128=1.1 if quantized else 1.0)
        rows.append(row)
    Path(options.out).mkdir(parents=True)
    (Path(options.out) / "bench.json").write_text(json.dumps(rows))


@pytest.fixture
def fake_export_and_bench(monkeypatch: pytest.MonkeyPatch) -> None:
    import rotaq.export.stage

    monkeypatch.setattr(rotaq.export.stage, "run_export", fake_export)
    monkeypatch.setitem(sys.modules, "rotaq.export.bench",
                        types.SimpleNamespace(run_bench=fake_bench_by_name, BenchOptions=BenchOptions))


def test_grid_and_variants_expand_to_named_validated_configs(tmp_path: Path, tiny_hf_folder: Path,
                                                             tiny_text_file: Path) -> None:
    path = write_sweep(tmp_path, {"grid": {"quantize.schemes": ["w4a8", "w4a4"], "rotate.enabled": [True, False]},
                                  "variants": [{"finetune.enabled": False}, {"finetune.adapter": "reslora-bs"}]},
                       tiny_settings(tiny_hf_folder, tiny_text_file))
    variants = load_sweep(path).expand()
    assert len(variants) == 8
    first = variants[0]
    assert first.name == "schemes=w4a8_rotate=on_finetune=off"
    assert first.config.quantize.schemes == ("w4a8",)  # a scalar for a list key is a one-element list
    assert first.config.rotate.enabled and not first.config.finetune.enabled
    assert variants[-1].config.finetune.adapter == "reslora-bs" and not variants[-1].config.rotate.enabled
    assert len({variant.name for variant in variants}) == 8


@pytest.mark.parametrize(("sweep", "message"), [
    ({"grid": {"quantize.weights": ["rtn", "gptx"]}}, r"(?s)variant weights=gptx.*quantize\.weights: 'gptx' is not one"),
    ({"grid": {"quantize.wieghts": ["rtn"]}}, r"(?s)quantize\.wieghts.*quantize\.weights"),
    ({"grid": {"quantize.weights": "rtn"}}, r"grid\.quantize\.weights must be a non-empty list"),
    ({"grid": {}}, r"nothing to sweep"),
    ({"grid": {"quantize.weights": ["rtn"]}, "sets": {}}, r"unknown sweep key\(s\) sets"),
])
def test_bad_sweep_files_fail_before_anything_runs(tmp_path: Path, tiny_hf_folder: Path, tiny_text_file: Path,
                                                   sweep: dict[str, Any], message: str) -> None:
    path = write_sweep(tmp_path, sweep, tiny_settings(tiny_hf_folder, tiny_text_file))
    with pytest.raises(ConfigError, match=message):
        load_sweep(path).expand()
    assert not (tmp_path / "runs").exists()


def test_dry_run_counts_the_stages_variants_share(tmp_path: Path, tiny_hf_folder: Path, tiny_text_file: Path) -> None:
    path = write_sweep(tmp_path, {"grid": {"quantize.schemes": ["w4a8", "w4a4"],
                                           "finetune.adapter": ["lora", "reslora-bs"]}},
                       tiny_settings(tiny_hf_folder, tiny_text_file))
    sharing = plan_sweep(load_sweep(path), tmp_path / "sweep")
    assert sharing.instances["rotate"] == 4 and sharing.distinct["rotate"] == 1  # one rotation
    assert sharing.instances["finetune"] == 4 and sharing.distinct["finetune"] == 2  # one per adapter setting
    assert sharing.distinct["quantize"] == 4 and sharing.distinct["report"] == 4
    assert not (tmp_path / "sweep").exists()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["sweep", str(path), "--out", str(tmp_path / "sweep"), "--dry-run"]) == 0
    assert "rotate: 4 → 1" in printed.getvalue() and "finetune: 4 → 2" in printed.getvalue()


def test_sweep_runs_shared_stages_once_and_writes_tables_and_pareto_plot(
        tmp_path: Path, tiny_hf_folder: Path, tiny_text_file: Path, fake_export_and_bench: None) -> None:
    base = tiny_settings(tiny_hf_folder, tiny_text_file, finetune__enabled=False, export__enabled=True,
                         outliers__enabled=False)
    path = write_sweep(tmp_path, {"grid": {"quantize.schemes": ["w4a8", "w4a4"], "quantize.weights": ["rtn"],
                                           "rotate.enabled": [True, False]}}, base)
    out = tmp_path / "sweep"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["sweep", str(path), "--out", str(out)]) == 0
    record = json.loads((out / "sweep.json").read_text())
    assert [variant["status"] for variant in record["variants"]] == ["done"] * 4
    store = sorted(entry.name for entry in (out / "store").iterdir() if entry.is_dir())
    assert len([name for name in store if name.startswith("rotate-")]) == 1
    assert len([name for name in store if name.startswith("export-float-")]) == 2  # rotated and not
    assert len([name for name in store if name.startswith("quantize-")]) == 4
    # the second variant with rotation reuses the rotation, the float export and their evaluations; its bench
    # times another set of exports, so it runs again (one bench per run: every ratio from one run)
    second = record["variants"][2]
    assert second["values"] == {"quantize.schemes": "w4a4", "quantize.weights": "rtn", "rotate.enabled": True}
    assert second["stages_reused"] >= 4

    rows = record["rows"]
    assert len(rows) == 6  # a scheme per variant, and the two float models (rotated or not) once each
    assert len([row for row in rows if row["branch"] == "float"]) == 2
    assert {row["branch"] for row in rows} == {"float", "w4a8", "w4a4"}
    results = json.loads((out / "variants" / second["name"] / "results.json").read_text())["rows"]
    quantized = next(row for row in rows if row["variant"] == second["name"] and row["branch"] == "w4a4")
    assert quantized["perplexity"] == next(r["perplexity"] for r in results if r["model"] == "quantize-w4a4")
    assert quantized["decode_speedup"] > 2.0 and quantized["file_mb"] == 0.2
    assert any(row["pareto"] for row in rows)
    for name in ("sweep.csv", "sweep.md", "pareto.png"):
        assert (out / name).is_file()
    assert "![Pareto fronts](pareto.png)" in (out / "sweep.md").read_text()
    assert (out / "variants" / second["name"] / "report.md").is_file()

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["sweep", str(path), "--out", str(out)]) == 0
    rerun = json.loads((out / "sweep.json").read_text())
    assert [variant["stages_run"] for variant in rerun["variants"]] == [0] * 4


def test_interrupted_sweep_keeps_its_tables_and_resumes(tmp_path: Path, tiny_hf_folder: Path, tiny_text_file: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import rotaq.quantizers.stage

    base = tiny_settings(tiny_hf_folder, tiny_text_file, finetune__enabled=False, outliers__enabled=False)
    spec = load_sweep(write_sweep(tmp_path, {"grid": {"quantize.schemes": ["w4a8", "w4a4"]}}, base))
    real_quantize, calls = rotaq.quantizers.stage.run_quantize, []

    def interrupt_second(options: Any) -> Path:
        calls.append(options.scheme)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_quantize(options)

    monkeypatch.setattr(rotaq.quantizers.stage, "run_quantize", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, tmp_path / "sweep", show_stage_progress=False)
    record = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [variant["status"] for variant in record["variants"]] == ["done", "interrupted"]
    assert {row["branch"] for row in record["rows"]} == {"float", "w4a8"}

    outcome = run_sweep(spec, tmp_path / "sweep", show_stage_progress=False)
    record = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert not outcome.failed and calls == ["w4a8", "w4a4", "w4a4"]
    assert record["variants"][0]["stages_run"] == 0  # everything of the finished variant was reused
    assert record["variants"][1]["stages_reused"] >= 2  # its rotation and the source evaluation


def test_a_failed_variant_is_recorded_and_the_others_run(tmp_path: Path, tiny_hf_folder: Path, tiny_text_file: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import rotaq.quantizers.stage
    from rotaq.pipeline.errors import RotaqError

    base = tiny_settings(tiny_hf_folder, tiny_text_file, finetune__enabled=False, outliers__enabled=False,
                         rotate__enabled=False)
    path = write_sweep(tmp_path, {"grid": {"quantize.schemes": ["w4a8", "w4a4"]}}, base)
    real_quantize = rotaq.quantizers.stage.run_quantize

    def refuse_w4a8(options: Any) -> Path:
        if options.scheme == "w4a8":
            raise RotaqError("simulated: no room left on device")
        return real_quantize(options)

    monkeypatch.setattr(rotaq.quantizers.stage, "run_quantize", refuse_w4a8)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["sweep", str(path), "--out", str(tmp_path / "sweep")]) == 1
    record = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [variant["status"] for variant in record["variants"]] == ["failed", "done"]
    assert "no room left" in (tmp_path / "sweep" / "sweep.md").read_text()
    assert "1 variant(s) failed" in printed.getvalue()


def test_sweep_refuses_a_folder_that_is_not_a_sweep(tmp_path: Path, tiny_hf_folder: Path, tiny_text_file: Path) -> None:
    path = write_sweep(tmp_path, {"grid": {"quantize.schemes": ["w4a8"]}}, tiny_settings(tiny_hf_folder, tiny_text_file))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="refusing to sweep into"):
        run_sweep(load_sweep(path), tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"


def test_pareto_front_keeps_only_undominated_rows() -> None:
    rows = [{"variant": "a", "perplexity": 10.0, "decode_speedup": 1.0, "file_mb": 100.0},
            {"variant": "b", "perplexity": 12.0, "decode_speedup": 2.0, "file_mb": 30.0},
            {"variant": "c", "perplexity": 13.0, "decode_speedup": 1.5, "file_mb": 25.0},  # dominated on latency
            {"variant": "d", "perplexity": 20.0, "decode_speedup": 1.9, "file_mb": 40.0},  # dominated on both
            {"variant": "e", "perplexity": 11.0}]  # no bench numbers: on no front
    mark_pareto(rows)
    assert [row["pareto"] for row in rows] == ["latency+size", "latency+size", "size", None, None]
