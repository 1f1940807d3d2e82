"""The `rotaq run` configuration: the model and its text, then one typed section per stage.

Each key is declared once, with its default, its help text and its constraints; `rotaq init`, `rotaq run
--help` and the validation in `rotaq.pipeline.config_loading` all read these declarations, so the documentation
of a key cannot drift from what is accepted. Allowed values that a stage module owns (rotation kinds,
weight quantizers, adapter types) are looked up in that module when the value is checked, not copied here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rotaq.pipeline.errors import RotaqError

ChoicesProvider = Callable[[], Sequence[str]]
ValueCheck = Callable[[Any], "str | None"]


@dataclass(frozen=True)
class KeyDoc:
    """What `rotaq init` writes above a key, and what validation enforces on its value."""

    help: str
    choices: ChoicesProvider | None = None
    minimum: float | None = None
    check: ValueCheck | None = None  # returns the problem with a value, or None


def setting(default: Any, help: str, *, choices: ChoicesProvider | None = None, minimum: float | None = None,
            check: ValueCheck | None = None) -> Any:
    """A config key: its default plus the documentation and constraints kept in the field's metadata."""
    return field(default=default, metadata={"doc": KeyDoc(help, choices, minimum, check)})


def key_doc(dataclass_field: Any) -> KeyDoc:
    return dataclass_field.metadata["doc"]


def _rotation_kinds() -> Sequence[str]:
    from rotaq.rotations.rotate import ROTATION_KINDS

    return ROTATION_KINDS


def _weight_methods() -> Sequence[str]:
    from rotaq.quantizers.quantize_model import WEIGHT_METHODS

    return WEIGHT_METHODS


def _adapter_types() -> Sequence[str]:
    from rotaq.adapters.config import ADAPTER_TYPES
    from rotaq.adapters.lor2c import LOR2C_TYPES

    return ADAPTER_TYPES + LOR2C_TYPES


def _lor2c_scores() -> Sequence[str]:
    from rotaq.adapters.lor2c import SCORE_METHODS

    return SCORE_METHODS


def _merge_methods() -> Sequence[str]:
    from rotaq.adapters.merge_stage import MERGE_METHODS

    return MERGE_METHODS


def _scheme_problem(name: Any) -> str | None:
    from rotaq.quantizers.schemes import parse_scheme

    if name is None:
        return None
    try:
        parse_scheme(name)
    except RotaqError as exc:
        return str(exc)
    return None


def _schemes_problem(names: tuple[str, ...]) -> str | None:
    if not names:
        return "give at least one scheme, or set quantize.enabled: false"
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        return f"{', '.join(duplicates)} listed more than once"
    return next((problem for problem in map(_scheme_problem, names) if problem), None)


def _clip_ratio_problem(ratio: float | None) -> str | None:
    return None if ratio is None or 0.0 < ratio <= 1.0 else f"must be in (0, 1], got {ratio}"


def _dropout_problem(dropout: float) -> str | None:
    return None if 0.0 <= dropout < 1.0 else f"must be in [0, 1), got {dropout}"


@dataclass(frozen=True)
class RotateConfig:
    """rotate: fold the norms and rotate the residual stream, so activations lose their outliers before quantization."""

    enabled: bool = setting(True, "run the rotate stage (false: later stages start from the source model)")
    kind: str = setting("hadamard", "hadamard, or random (a seeded orthogonal matrix, for widths with no "
                                    "Hadamard matrix)", choices=_rotation_kinds)
    seed: int = setting(0, "seed of the random signs (hadamard) or of the random orthogonal matrix")
    online: bool = setting(True, "online Hadamard rotations before o_proj and down_proj")


@dataclass(frozen=True)
class FinetuneConfig:
    """finetune: train (Res)LoRA adapters on the frozen rotated weights; the merge stage then folds them in."""

    enabled: bool = setting(True, "run the finetune and merge stages")
    adapter: str = setting("lora", "lora, reslora-is/bs/ms, or a LoR2C type: lor2c, share-lor2c, merge-lor2c, "
                                   "inject-lor2c", choices=_adapter_types)
    targets: str | None = setting(None, "comma-separated projections, e.g. q_proj,v_proj (null: all seven)")
    rank: int = setting(8, "adapter rank", minimum=1)
    alpha: float = setting(16.0, "scaling s = alpha / rank")
    dropout: float = setting(0.0, "dropout on the adapter input, in [0, 1)", check=_dropout_problem)
    pre_num: int | None = setting(None, "earlier blocks a reslora-bs/ms shortcut reaches (null: the type's default)",
                                  minimum=1)
    qat: str | None = setting(None, "train for a quantized deployment, e.g. w4a4 (null: plain float training)",
                              check=_scheme_problem)
    lor2c_changes: int | None = setting(None, "merge-lor2c merges / inject-lor2c injections (null: 4 / 2)",
                                        minimum=0)
    lor2c_interval: int | None = setting(None, "steps between LoR2C merges / injections (null: spread evenly)",
                                         minimum=1)
    lor2c_score: str = setting("top-share", "LoR2C path score: top-share (share of the top singular value) or mean",
                               choices=_lor2c_scores)
    steps: int = setting(100, "optimizer steps", minimum=1)
    lr: float = setting(0.0002, "peak learning rate")
    batch_size: int = setting(4, "windows per micro-batch", minimum=1)
    grad_accum: int = setting(1, "micro-batches per optimizer step", minimum=1)
    warmup: int = setting(10, "linear warmup steps before the cosine decay", minimum=0)
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward pass to save memory")
    save_every: int = setting(50, "checkpoint interval in steps (an interrupted run resumes from the last one)",
                              minimum=0)
    eval_tokens: int = setting(4096, "held-out tokens scored before and after training", minimum=2)
    seed: int = setting(0, "seed of the adapter init and the data order")


@dataclass(frozen=True)
class MergeConfig:
    """merge: fold the trained adapters into plain weights and measure what that costs."""

    method: str = setting("lstsq", "lstsq or paper: how reslora-is/ms shortcuts are merged (others merge exactly)",
                          choices=_merge_methods)
    calibration_tokens: int = setting(8192, "calibration tokens for the lstsq merge", minimum=2)
    eval_tokens: int = setting(4096, "held-out tokens for the merge error", minimum=2)


@dataclass(frozen=True)
class QuantizeConfig:
    """quantize: each scheme is its own branch (quantize, then export and bench) from the same float model."""

    enabled: bool = setting(True, "run the quantize stage")
    schemes: tuple[str, ...] = setting(("w4a4",), "w8a8, w4a8, w4a4, w4a16, each with an optional group: w4a16-g128",
                                       check=_schemes_problem)
    weights: str = setting("gptq", "weight quantizer: rtn or gptq", choices=_weight_methods)
    group: int | None = setting(None, "weight group size along the input (null: the scheme's)", minimum=1)
    act_clip_ratio: float | None = setting(None, "clip per-token activation ranges to this fraction of max|x|, in "
                                                 "the schemes with per-token activations (w4a4; the A8 schemes keep "
                                                 "ONNX Runtime's per-block int8); null: no clipping",
                                           check=_clip_ratio_problem)
    act_order: bool = setting(True, "GPTQ: visit columns in order of decreasing Hessian diagonal")
    calibration_tokens: int = setting(16384, "GPTQ calibration tokens", minimum=2)


@dataclass(frozen=True)
class ExportConfig:
    """export: an ONNX graph with KV cache per branch, checked against PyTorch in ONNX Runtime."""

    enabled: bool = setting(True, "run the export stage")
    float_baseline: bool = setting(True, "also export the float model, so the bench has a baseline")
    check_tokens: int = setting(32, "tokens per sequence of the export's logit checks", minimum=2)


def _peer_names() -> tuple[str, ...]:
    from rotaq.export.bench import PEERS

    return PEERS


@dataclass(frozen=True)
class BenchConfig:
    """bench: latency, size and memory of every exported branch in ONNX Runtime, all in one interleaved run."""

    enabled: bool = setting(True, "run the bench stage")
    prompt_lengths: tuple[int, ...] = setting((128, 512), "prompt lengths whose prefill time is measured", minimum=1)
    decode_tokens: int = setting(64, "tokens generated to measure decode speed", minimum=1)
    threads: int | None = setting(None, "ONNX Runtime intra-op threads (null: all cores)", minimum=1)
    repeats: int = setting(5, "interleaved timing rounds per model (medians are reported)", minimum=1)
    eager: bool = setting(True, "also time PyTorch eager float32")
    peer: str | None = setting(None, "also build and time onnxruntime-genai's int4/int8 builder graphs of the source "
                               "model in the same bench: genai (needs the 'peer' extra), or null",
                               choices=_peer_names)


@dataclass(frozen=True)
class EvalConfig:
    """eval: perplexity of every model, and KL / top-1 agreement against the float source model."""

    max_tokens: int = setting(8192, "evaluation-split tokens scored per model", minimum=2)
    batch_size: int = setting(4, "windows per forward pass", minimum=1)


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
