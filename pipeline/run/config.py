"""The `rotaq run` configuration: the model and its text, then one typed section per stage.

A stage's section is generated from the stage's own Options dataclass (`rotaq.pipeline.options`): its keys
are that class's settings, with their defaults, help and constraints, so `rotaq init`, `rotaq run --help`,
the validation in `rotaq.pipeline.run.config_loading`, the stage's own command-line flags and the options the
stage is called with cannot drift apart. Only what belongs to the run itself is declared here: whether a
stage runs (`enabled`), the list of schemes, token budgets the run turns into the stage's data, and the
top-level model, data and window length.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rotaq.adapters.finetune import FinetuneOptions
from rotaq.adapters.merge_stage import MergeOptions
from rotaq.eval.commands import EvalOptions
from rotaq.export.bench import BenchOptions
from rotaq.export.stage import ExportOptions
from rotaq.pipeline.options import KeyDoc, config_section, key_doc, setting
from rotaq.quantizers.schemes import scheme_problem
from rotaq.quantizers.stage import QuantizeOptions
from rotaq.rotations.stage import RotateOptions

__all__ = ["KeyDoc", "RunConfig", "key_doc", "setting"]


def _schemes_problem(names: tuple[str, ...]) -> str | None:
    if not names:
        return "give at least one scheme, or set quantize.enabled: false"
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        return f"{', '.join(duplicates)} listed more than once"
    return next((problem for problem in map(scheme_problem, names) if problem), None)


def _enabled(what: str) -> tuple[str, type, Any]:
    return ("enabled", bool, setting(True, what))


RotateConfig = config_section(
    "RotateConfig", "rotate: fold the norms and rotate the residual stream, so activations lose their outliers "
                    "before quantization.", RotateOptions, module=__name__,
    before=[_enabled("run the rotate stage (false: later stages start from the source model)")])

FINETUNE_FROM_RUN = ("qat_act_clip_ratio",)
"""Finetune settings a run takes from elsewhere: QAT clips as quantize.act_clip_ratio deploys."""

FinetuneConfig = config_section(
    "FinetuneConfig", "finetune: train (Res)LoRA or LoR2C adapters on the frozen rotated weights; the merge stage "
                      "then folds them in.", FinetuneOptions, module=__name__,
    before=[_enabled("run the finetune and merge stages")], exclude=FINETUNE_FROM_RUN)

MergeConfig = config_section(
    "MergeConfig", "merge: fold the trained adapters into plain weights and measure what that costs.",
    MergeOptions, module=__name__)

QuantizeConfig = config_section(
    "QuantizeConfig", "quantize: each scheme is its own branch (quantize, then export and bench) from the same "
                      "float model.", QuantizeOptions, module=__name__,
    before=[_enabled("run the quantize stage"),
            ("schemes", tuple[str, ...], setting(("w4a4",), "w8a8, w4a8, w4a4, w4a16, each with an optional group: "
                                                            "w4a16-g128", check=_schemes_problem))],
    after=[("calibration_tokens", int, setting(16384, "GPTQ calibration tokens", minimum=2))],
    exclude=("scheme",))

ExportConfig = config_section(
    "ExportConfig", "export: an ONNX graph with KV cache per branch, checked against PyTorch in ONNX Runtime.",
    ExportOptions, module=__name__,
    before=[_enabled("run the export stage"),
            ("float_baseline", bool, setting(True, "also export the float model, so the bench has a baseline"))])

BenchConfig = config_section(
    "BenchConfig", "bench: latency, size and memory of every exported branch in ONNX Runtime, all in one "
                   "interleaved run.", BenchOptions, module=__name__, before=[_enabled("run the bench stage")])

EvalConfig = config_section(
    "EvalConfig", "eval: perplexity of every model, and KL / top-1 agreement against the float source model.",
    EvalOptions, module=__name__,
    before=[("max_tokens", int, setting(8192, "evaluation-split tokens scored per model (also the bench's "
                                              "perplexity text)", minimum=2))])


@dataclass(frozen=True)
class OutliersConfig:
    """outliers: activation outlier statistics of every linear input, before and after rotation."""

    enabled: bool = setting(True, "measure outliers (needs the rotate stage)")
    max_tokens: int = setting(4096, "calibration-split tokens measured", minimum=2)


def section(section_class: type) -> Any:
    return field(default_factory=section_class)


@dataclass(frozen=True)
class RunConfig:
    """A whole `rotaq run`: which model, on which text, and the options of every stage."""

    model: str = setting("default", "a Hugging Face folder or id, a .gguf file, or default "
                                    "(the embedded SmolLM2-135M-Instruct)")
    data: str = setting("default", "a text file, a folder of .txt/.md, a JSONL file (field text), or default "
                                   "(Shakespeare); split per document 80/10/10 into train/calibration/evaluation")
    seq_len: int = setting(512, "tokens per window, for training, calibration and evaluation", minimum=2)
    out: str = setting("runs/rotaq", "run folder, one subfolder per stage (rotaq run --out overrides it)")
    rotate: RotateConfig = section(RotateConfig)
    finetune: FinetuneConfig = section(FinetuneConfig)
    merge: MergeConfig = section(MergeConfig)
    quantize: QuantizeConfig = section(QuantizeConfig)
    export: ExportConfig = section(ExportConfig)
    bench: BenchConfig = section(BenchConfig)
    eval: EvalConfig = section(EvalConfig)
    outliers: OutliersConfig = section(OutliersConfig)

    def window_problems(self) -> list[str]:
        """Token budgets that cannot hold one window of `seq_len` tokens, as 'key: problem' lines."""
        budgets = {"eval.max_tokens": self.eval.max_tokens}
        if self.outliers.enabled and self.rotate.enabled:
            budgets["outliers.max_tokens"] = self.outliers.max_tokens
        if self.quantize.enabled and self.quantize.weights == "gptq":
            budgets["quantize.calibration_tokens"] = self.quantize.calibration_tokens
        if self.finetune.enabled:
            budgets.update({"finetune.eval_tokens": self.finetune.eval_tokens,
                            "merge.eval_tokens": self.merge.eval_tokens,
                            "merge.calibration_tokens": self.merge.calibration_tokens})
        return [f"{key}: {tokens} tokens do not fill one window of seq_len = {self.seq_len}"
                for key, tokens in budgets.items() if tokens < self.seq_len]
