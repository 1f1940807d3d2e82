"""`rotaq run` on a tiny model: one folder with every stage, reused stage by stage on the next run."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import shutil
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import yaml

from rotaq.pipeline.cli import main
from rotaq.pipeline.run.config_loading import apply_override, config_from_mapping
from rotaq.pipeline.run.execute import run_pipeline
from rotaq.pipeline.run.config import RunConfig
from rotaq.pipeline.run.plan import plan_run
from rotaq.pipeline.run.stage_registry import STAGES

# Tiny everywhere: windows of 32 tokens, a few windows per evaluation, RTN (no calibration pass), no ONNX export.
TINY_RUN: dict[str, Any] = {
    "seq_len": 32,
    "finetune": {"steps": 2, "batch_size": 2, "warmup": 0, "eval_tokens": 64},
    "merge": {"eval_tokens": 64, "calibration_tokens": 64},
    "quantize": {"schemes": ["w4a8"], "weights": "rtn"},
    "export": {"enabled": False},
    "eval": {"max_tokens": 128},
    "outliers": {"max_tokens": 128},
}


def tiny_settings(model: Path, data: Path, **overrides: Any) -> dict[str, Any]:
    raw = {"model": str(model), "data": str(data), **copy.deepcopy(TINY_RUN)}
    for dotted, value in overrides.items():
        apply_override(raw, dotted.replace("__", "."), value)
    return raw


def tiny_config(model: Path, data: Path, **overrides: Any) -> RunConfig:
    """The tiny run with overrides given as section__key=value."""
    return config_from_mapping(tiny_settings(model, data, **overrides))


def statuses(folder: Path) -> dict[str, str]:
    record = json.loads((folder / "run.json").read_text())
    return {name: outcome["status"] for name, outcome in record["statuses"].items()}


def output_mtimes(folder: Path) -> dict[str, int]:
    """Modification times of every stage output, its completion file and its marker."""
    record = json.loads((folder / "run.json").read_text())
    paths = [entry[kind] for entry in record["stages"] for kind in ("output", "done_file")]
    paths += [f"stages/{entry['name']}.json" for entry in record["stages"]]
    return {path: (folder / path).stat().st_mtime_ns for path in paths}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, tiny_hf_folder: Path, tiny_text_file: Path
                 ) -> tuple[Path, str]:
    """One run through the CLI: rotate, finetune, merge, quantize, outliers, evaluations, report."""
    folder = tmp_path_factory.mktemp("tiny-run")
    config_file = folder / "rotaq.yaml"
    config_file.write_text(yaml.safe_dump(tiny_settings(tiny_hf_folder, tiny_text_file)))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["run", "--config", str(config_file), "--out", str(folder / "run")]) == 0
    return folder / "run", printed.getvalue()


@pytest.fixture
def run_copy(finished_run: tuple[Path, str], tmp_path: Path) -> Path:
    """A copy of the finished run (modification times kept), so each test may change it."""
    return Path(shutil.copytree(finished_run[0], tmp_path / "run"))


def test_run_writes_every_stage_results_and_report(finished_run: tuple[Path, str]) -> None:
    folder, printed = finished_run
    assert set(statuses(folder).values()) == {"done"}
    assert list(statuses(folder)) == ["rotate", "finetune", "merge", "quantize-w4a8", "outliers", "evaluate-source",
                                      "evaluate-rotate", "evaluate-merge", "evaluate-quantize-w4a8", "results",
                                      "report"]
    assert "[1/11] rotate: running" in printed and "[11/11] report: done in" in printed
    rows = {row["model"]: row for row in json.loads((folder / "results.json").read_text())["rows"]}
    assert list(rows) == ["source", "rotate", "merge", "quantize-w4a8"]
    assert rows["rotate"]["kl_divergence"] < 1e-9 and rows["rotate"]["top1_agreement"] == 1.0
    assert rows["quantize-w4a8"]["scheme"] == "w4a8" and rows["quantize-w4a8"]["kl_divergence"] > 0
    markdown, page = (folder / "report.md").read_text(), (folder / "report.html").read_text()
    for section in ("Accuracy", "Activation outliers before and after rotation", "Fine-tuning and merge", "Stages",
                    "Configuration", "Software"):
        assert f"## {section}" in markdown and f"<h2>{section}</h2>" in page
    assert "Latency" not in markdown  # no bench JSON in this run
    perplexity = f"{rows['quantize-w4a8']['perplexity']:.4g}"
    assert perplexity in markdown and perplexity in page
    assert "data:image/png;base64," in page and "http" not in page.replace("http-equiv", "")


def test_rerun_with_the_same_config_runs_no_stage(run_copy: Path, tiny_hf_folder: Path,
                                                  tiny_text_file: Path) -> None:
    before = output_mtimes(run_copy)
    outcome = run_pipeline(tiny_config(tiny_hf_folder, tiny_text_file), run_copy, show_stage_progress=False)
    assert {outcome.status for outcome in outcome.stages.values()} == {"cached"}
    assert output_mtimes(run_copy) == before


def test_changed_quantize_option_reruns_quantize_and_what_reads_it(run_copy: Path, tiny_hf_folder: Path,
                                                                   tiny_text_file: Path) -> None:
    rotate_mtime = output_mtimes(run_copy)["rotate"]
    config = tiny_config(tiny_hf_folder, tiny_text_file, quantize__group=16)
    outcome = run_pipeline(config, run_copy, show_stage_progress=False)
    reran = {name for name, stage in outcome.stages.items() if stage.status == "done"}
    assert reran == {"quantize-w4a8", "evaluate-quantize-w4a8", "results", "report"}
    assert output_mtimes(run_copy)["rotate"] == rotate_mtime


def test_activation_clipping_leaves_per_block_a8_schemes_alone(run_copy: Path, tiny_hf_folder: Path,
                                                               tiny_text_file: Path) -> None:
    """W4A8 quantizes activations per block, as ONNX Runtime's kernel does: a clip would make it per token
    (and slow), so quantize.act_clip_ratio does not reach it and nothing but the report reruns."""
    config = tiny_config(tiny_hf_folder, tiny_text_file, quantize__act_clip_ratio=0.9)
    outcome = run_pipeline(config, run_copy, show_stage_progress=False)
    assert {name for name, stage in outcome.stages.items() if stage.status == "done"} == {"report"}
    assert plan_run(tiny_config(tiny_hf_folder, tiny_text_file, quantize__act_clip_ratio=0.9,
                                quantize__schemes=["w4a4"]), run_copy).stage("quantize-w4a4").options[
        "act_clip_ratio"] == 0.9


def test_interrupted_run_resumes_at_quantize(tmp_path: Path, tiny_hf_folder: Path, tiny_text_file: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import rotaq.quantizers.stage

    real_quantize, calls = rotaq.quantizers.stage.run_quantize, []

    def crash_once(options: Any) -> Path:
        calls.append(options)
        if len(calls) == 1:
            raise RuntimeError("simulated crash in quantize")
        return real_quantize(options)

    monkeypatch.setattr(rotaq.quantizers.stage, "run_quantize", crash_once)
    config = tiny_config(tiny_hf_folder, tiny_text_file, finetune__enabled=False, outliers__enabled=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_pipeline(config, tmp_path / "run", show_stage_progress=False)
    assert statuses(tmp_path / "run") == {"rotate": "done", "quantize-w4a8": "failed"}
    assert not (tmp_path / "run" / "stages" / "quantize-w4a8.json").exists()

    outcome = run_pipeline(config, tmp_path / "run", show_stage_progress=False)
    assert outcome.stages["rotate"].status == "cached"
    assert outcome.stages["quantize-w4a8"].status == "done" and len(calls) == 2
    assert (tmp_path / "run" / "report.html").is_file()


def test_stage_missing_from_the_codebase_is_skipped_and_the_lineage_goes_on(
        tmp_path: Path, tiny_hf_folder: Path, tiny_text_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(STAGES, "finetune", dataclasses.replace(STAGES["finetune"], module="adapters.not_written"))
    monkeypatch.setitem(STAGES, "bench", dataclasses.replace(STAGES["bench"], module="export.not_written"))
    config = tiny_config(tiny_hf_folder, tiny_text_file, export__enabled=True)
    plan = plan_run(config, tmp_path)
    skipped = {stage.name: stage.reason for stage in plan.skipped}
    assert skipped["finetune"].startswith("not available: adapters.not_written does not import")
    assert skipped["merge"] == "needs finetune"
    assert skipped["bench"].startswith("not available")
    assert plan.stage("quantize-w4a8").inputs == {"model": "rotate"}
    assert plan.stage("export-float").inputs == {"model": "rotate"}
    assert "evaluate-merge" not in [stage.name for stage in plan.stages]


def fake_bench(options: Any) -> None:
    """Stands in for the bench stage: rows in the agreed bench.json format, one per model timed."""
    rows = [{"model": Path(model).name, "runtime": "onnxruntime", "scheme": "float", "prefill_ms_128": 1.25,
             "prefill_ms_512": 4.5, "decode_tokens_per_s": 321.0, "file_mb": 0.75, "peak_rss_mb": 512.0}
            for model in options.models]
    Path(options.out).mkdir(parents=True)
    (Path(options.out) / "bench.json").write_text(json.dumps(rows))


def fake_export(options: Any) -> None:
    Path(options.out).mkdir(parents=True)
    (Path(options.out) / "export.json").write_text(json.dumps({"versions": {"onnxruntime": "fake-1.0"}}))


def test_export_and_bench_results_reach_the_report(tmp_path: Path, tiny_hf_folder: Path, tiny_text_file: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import rotaq.export.stage
    from rotaq.export.bench import BenchOptions

    monkeypatch.setattr(rotaq.export.stage, "run_export", fake_export)
    monkeypatch.setitem(sys.modules, "rotaq.export.bench",
                        types.SimpleNamespace(run_bench=fake_bench, BenchOptions=BenchOptions))
    config = tiny_config(tiny_hf_folder, tiny_text_file, rotate__enabled=False, finetune__enabled=False,
                         quantize__enabled=False, export__enabled=True)
    outcome = run_pipeline(config, tmp_path / "run", show_stage_progress=False)
    assert [name for name, stage in outcome.stages.items() if stage.status == "done"] == [
        "export-float", "bench", "evaluate-source", "results", "report"]
    markdown = (tmp_path / "run" / "report.md").read_text()
    source = json.loads((tmp_path / "run" / "results.json").read_text())["rows"][0]
    bench_table = markdown.split("## Latency, size and memory")[1].split("##")[0]
    assert "| 321.0 |" in bench_table and f"| {source['perplexity']:.2f} |" in bench_table
    assert "fake-1.0" in markdown and (tmp_path / "run" / "report_files" / "bench.png").is_file()


def test_a_stage_whose_output_went_missing_reruns_with_everything_computed_from_it(
        run_copy: Path, tiny_hf_folder: Path, tiny_text_file: Path) -> None:
    shutil.rmtree(run_copy / "merge")  # its marker stays: the key alone must not vouch for what was built on it
    outcome = run_pipeline(tiny_config(tiny_hf_folder, tiny_text_file), run_copy, show_stage_progress=False)
    reran = {name for name, stage in outcome.stages.items() if stage.status == "done"}
    assert reran == {"merge", "quantize-w4a8", "evaluate-merge", "evaluate-quantize-w4a8", "results", "report"}
    assert outcome.stages["finetune"].status == "cached" and outcome.stages["rotate"].status == "cached"


def test_a_learned_rotation_learns_on_the_runs_text(tiny_hf_folder: Path, tiny_text_file: Path,
                                                    tmp_path: Path) -> None:
    """rotate.rotation: learned calibrates on the run's `data` and clips as the quantize stage does; a fixed
    rotation reads no text, so its stage key does not change with the data."""
    import rotaq.rotations.stage as rotate_stage

    definition = STAGES["rotate"]
    learned = tiny_config(tiny_hf_folder, tiny_text_file, rotate__rotation="learned", rotate__steps=2,
                          quantize__act_clip_ratio=0.85)
    call_options = definition.options(learned, None)
    assert call_options["data"] == str(tiny_text_file)
    assert call_options["act_clip_ratio"] == 0.85  # learned for the deployed clip
    per_block = tiny_config(tiny_hf_folder, tiny_text_file, rotate__rotation="learned", rotate__scheme="w4a8",
                            quantize__act_clip_ratio=0.85)
    assert definition.options(per_block, None)["act_clip_ratio"] is None  # W4A8's kernel blocks do not clip
    fixed = definition.options(tiny_config(tiny_hf_folder, tiny_text_file), None)
    assert "data" not in fixed
    received = []
    fake = types.SimpleNamespace(**{name: getattr(rotate_stage, name) for name in definition.requires})
    fake.run_rotate = received.append
    definition.invoke(fake, types.SimpleNamespace(options=call_options, inputs={"model": str(tiny_hf_folder)},
                                                  output=tmp_path / "rotate", show_progress=False))
    (options,) = received
    assert options.calibration.source == str(tiny_text_file) and options.steps == 2
    assert options.calibration.seq_len == rotate_stage.LEARN_CALIBRATION.seq_len
