"""The stages `rotaq run` can call: where each one's code lives and how the run config becomes its options.

Wiring a stage is one `StageDefinition` in `STAGES`: the module and the names it must define, the options
it takes from the run config (exactly what its cache key hashes: `invoke` sees nothing else), a call that
builds the stage's own options object, and the file that proves its output complete. A stage whose module
does not import, or lacks one of those names, is reported as "skipped (not available)" and nothing is put
in its place. Where each stage sits in the pipeline is decided in `rotaq.pipeline.run.plan`.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from rotaq.pipeline.artifacts import MANIFEST_NAME, verify_files
from rotaq.pipeline.atomic import write_json_atomic
from rotaq.pipeline.data import DataSpec
from rotaq.pipeline.errors import ArtifactError
from rotaq.pipeline.options import build_options
from rotaq.pipeline.run.config import RunConfig
from rotaq.pipeline.run.files import REPORT_HTML
from rotaq.pipeline.run.results import RESULTS_FILE, model_labels
from rotaq.quantizers.schemes import parse_scheme

BENCH_FILE = "bench.json"
"""The bench stage's result: a JSON list of rows (model, scheme, prefill_ms_128, prefill_ms_512,
decode_tokens_per_s, file_mb, peak_rss_mb, perplexity, ...), read by `rotaq.pipeline.report.write`."""


@dataclass(frozen=True)
class StageCall:
    """What the runner hands a stage: its keyed options, its inputs on disk, and where to write."""

    options: Mapping[str, Any]
    inputs: Mapping[str, str]  # role -> the source model reference, or the path of an upstream output
    output: Path
    run_folder: Path
    scratch: Path  # resumable state (checkpoints), named by the stage key so other options never resume it
    show_progress: bool


OptionsFromConfig = Callable[[RunConfig, "str | None"], dict[str, Any]]
"""(config, branch) -> the stage's keyed options; `branch` is the scheme (or "float") of a per-branch stage."""


def _same_name(instance: str) -> str:
    return instance


@dataclass(frozen=True)
class StageDefinition:
    name: str
    module: str
    requires: tuple[str, ...]  # names the module must define: the stage function first, then its options class
    options: OptionsFromConfig
    invoke: Callable[[ModuleType, StageCall], None]
    done_file: str | None = MANIFEST_NAME  # inside the output folder; None: the output is itself one file
    output_name: Callable[[str], str] = _same_name  # instance name -> output path relative to the run folder

    def unavailable_reason(self) -> str | None:
        """Why this stage cannot run in this codebase, or None when it can."""
        try:
            module = importlib.import_module(self.module)
        except ImportError as exc:
            return f"{self.module} does not import: {exc}"
        missing = [name for name in self.requires if not hasattr(module, name)]
        return f"{self.module} has no {', '.join(missing)}" if missing else None

    def run(self, call: StageCall) -> None:
        self.invoke(importlib.import_module(self.module), call)

    def done_path(self, output: Path) -> Path:
        return output / self.done_file if self.done_file else output

    def is_complete(self, output: Path) -> bool:
        return self.done_path(output).is_file()

    def output_problem(self, output: Path, full: bool) -> str | None:
        """Why a finished output may not be reused (a listed file missing, truncated or changed; an unreadable
        manifest), or None. Sizes and small files always; every file's SHA-256 when `full` (`--verify`)."""
        done = self.done_path(output)
        if done.suffix != ".json":
            return None
        try:
            manifest = json.loads(done.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            return f"{done} is unreadable ({type(exc).__name__})"
        if not isinstance(manifest, dict) or "files" not in manifest:
            return None  # a result file (bench rows, an evaluation), not a folder manifest
        try:
            verify_files(output, manifest, full)
        except ArtifactError as exc:
            return str(exc)
        return None


def _section_options(section: Any) -> dict[str, Any]:
    return {name: value for name, value in dataclasses.asdict(section).items() if name != "enabled"}


def _rotate_options(config: RunConfig, branch: str | None) -> dict[str, Any]:
    options = _section_options(config.rotate)
    if config.rotate.rotation == "learned":  # it learns on the run's text; a fixed rotation reads none
        options["data"] = config.data
        # Learned for the activations the quantize stage deploys, clip included (as QAT trains with it).
        if options["act_clip_ratio"] is None and parse_scheme(config.rotate.scheme).clips_activations_by_default:
            options["act_clip_ratio"] = config.quantize.act_clip_ratio
    return options


def _rotate(api: ModuleType, call: StageCall) -> None:
    options = dict(call.options)
    wiring = {}
    if "data" in options:
        wiring["calibration"] = dataclasses.replace(api.LEARN_CALIBRATION, source=options.pop("data"))
    api.run_rotate(build_options(api.RotateOptions, options, model=call.inputs["model"], out=call.output,
                                 progress=call.show_progress, **wiring))


def _finetune_options(config: RunConfig, branch: str | None) -> dict[str, Any]:
    # QAT clips activations as the quantize stage will, so what is trained is what is deployed.
    clip = config.quantize.act_clip_ratio if config.finetune.qat else None
    return {**_section_options(config.finetune), "qat_act_clip_ratio": clip, "data": config.data,
            "seq_len": config.seq_len}


def _finetune(api: ModuleType, call: StageCall) -> None:
    options = dict(call.options)
    wiring = {name: options.pop(name) for name in ("data", "seq_len")}
    api.run_finetune(build_options(api.FinetuneOptions, options, model=call.inputs["model"], out=call.output,
                                   resume=True, checkpoint_dir=call.scratch, progress=call.show_progress, **wiring))


def _merge_options(config: RunConfig, branch: str | None) -> dict[str, Any]:
    return {**_section_options(config.merge), "data": config.data, "seq_len": config.seq_len}


def _merge(api: ModuleType, call: StageCall) -> None:
    options = dict(call.options)
    wiring = {name: options.pop(name) for name in ("data", "seq_len")}
    api.run_merge(build_options(api.MergeOptions, options, model=call.inputs["model"], out=call.output, **wiring))


GPTQ_ONLY = ("act_order",)
"""Quantize settings only GPTQ reads: with RTN they stay out of the key, so changing them reruns nothing."""


def _quantize_options(config: RunConfig, branch: str | None) -> dict[str, Any]:
    quantize = _section_options(config.quantize)
    del quantize["schemes"]
    gptq = {**{name: quantize.pop(name) for name in GPTQ_ONLY}, "calibration_tokens": quantize.pop("calibration_tokens"),
            "data": config.data, "seq_len": config.seq_len}
    if not parse_scheme(branch).clips_activations_by_default:
        quantize["act_clip_ratio"] = None
    # RTN reads no data: calibration settings must not invalidate it
    return {"scheme": branch, **quantize, "gptq": gptq if config.quantize.weights == "gptq" else None}


def _quantize(api: ModuleType, call: StageCall) -> None:
    options = dict(call.options)
    gptq = options.pop("gptq")
    wiring = {}
    if gptq is not None:
        options.update({name: gptq[name] for name in GPTQ_ONLY})
        wiring["calibration"] = DataSpec(gptq["data"], gptq["seq_len"], gptq["calibration_tokens"])
    api.run_quantize(build_options(api.QuantizeOptions, options, model=call.inputs["model"], out=call.output,
                                   progress=call.show_progress, **wiring))


def _export_options(config: RunConfig, branch: str | None) -> dict[str, Any]:
    options = _section_options(config.export)
    del options["float_baseline"]  # which branches are exported, not how
    return options


def _export(api: ModuleType, call: StageCall) -> None:
    api.run_export(build_options(api.ExportOptions, call.options, model=call.inputs["model"], out=call.output,
                                 progress=call.show_progress))


def _bench_options(config: RunConfig, branch: str | None) -> dict[str, Any]:
    # The graphs' perplexity is measured on the run's own held-out text.
    return {**_section_options(config.bench), "data": config.data, "seq_len": config.seq_len,
            "eval_tokens": config.eval.max_tokens}


def _bench(api: ModuleType, call: StageCall) -> None:
    options = dict(call.options)
    evaluation = DataSpec(options.pop("data"), options.pop("seq_len"), options.pop("eval_tokens"))
    api.run_bench(build_options(api.BenchOptions, options, models=tuple(call.inputs.values()), out=call.output,
                                reference=call.inputs.get("model-float"), evaluation=evaluation, progress=False))


def _outliers_options(config: RunConfig, branch: str | None) -> dict[str, Any]:
    return {"data": config.data, "seq_len": config.seq_len, "max_tokens": config.outliers.max_tokens}


def _outliers(api: ModuleType, call: StageCall) -> None:
    options = call.options
    api.run_outliers(api.OutlierOptions(model=call.inputs["model"], out=call.output, before=call.inputs["before"],
                                        data=DataSpec(options["data"], options["seq_len"], options["max_tokens"]),
                                        progress=call.show_progress))


def _evaluate_options(config: RunConfig, branch: str | None) -> dict[str, Any]:
    return {"data": config.data, "seq_len": config.seq_len, **dataclasses.asdict(config.eval)}


def _evaluate(api: ModuleType, call: StageCall) -> None:
    options = dict(call.options)
    data = DataSpec(options.pop("data"), options.pop("seq_len"), options.pop("max_tokens"))
    result = api.run_eval(build_options(api.EvalOptions, options, model=call.inputs["model"], data=data,
                                        reference=call.inputs.get("reference"), progress=call.show_progress))
    write_json_atomic(call.output, {**result, **model_labels(call.inputs["model"])})


def _evaluation_file(instance: str) -> str:
    return f"evaluate/{instance.removeprefix('evaluate-')}.json"


def _no_options(config: RunConfig, branch: str | None) -> dict[str, Any]:
    return {}


def _results(api: ModuleType, call: StageCall) -> None:
    api.write_results(call.inputs, call.output)


def _report_options(config: RunConfig, branch: str | None) -> dict[str, Any]:
    """The whole configuration: the report prints it, so any change to it rewrites the report."""
    return {name: value for name, value in dataclasses.asdict(config).items() if name != "out"}


def _report(api: ModuleType, call: StageCall) -> None:
    api.write_report(call.run_folder)


def _fixed_name(name: str) -> Callable[[str], str]:
    return lambda instance: name


STAGES: dict[str, StageDefinition] = {definition.name: definition for definition in (
    StageDefinition("rotate", "rotaq.rotations.stage", ("run_rotate", "RotateOptions", "LEARN_CALIBRATION"),
                    _rotate_options, _rotate),
    StageDefinition("finetune", "rotaq.adapters.finetune", ("run_finetune", "FinetuneOptions", "TrainConfig"),
                    _finetune_options, _finetune),
    StageDefinition("merge", "rotaq.adapters.merge_stage", ("run_merge", "MergeOptions"), _merge_options, _merge),
    StageDefinition("quantize", "rotaq.quantizers.stage", ("run_quantize", "QuantizeOptions"), _quantize_options,
                    _quantize),
    StageDefinition("export", "rotaq.export.stage", ("run_export", "ExportOptions"), _export_options, _export,
                    done_file="export.json"),  # rotaq.export.layout.MANIFEST_NAME
    StageDefinition("bench", "rotaq.export.bench", ("run_bench", "BenchOptions"), _bench_options, _bench,
                    done_file=BENCH_FILE),
    StageDefinition("outliers", "rotaq.eval.commands", ("run_outliers", "OutlierOptions"), _outliers_options, _outliers,
                    done_file="outliers_summary.json"),
    StageDefinition("evaluate", "rotaq.eval.commands", ("run_eval", "EvalOptions"), _evaluate_options, _evaluate,
                    done_file=None, output_name=_evaluation_file),
    StageDefinition("results", "rotaq.pipeline.run.results", ("write_results",), _no_options, _results,
                    done_file=None, output_name=_fixed_name(RESULTS_FILE)),
    StageDefinition("report", "rotaq.pipeline.report.write", ("write_report",), _report_options, _report,
                    done_file=None, output_name=_fixed_name(REPORT_HTML)),
)}
