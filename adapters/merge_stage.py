"""The merge stage: a finetune folder in, a plain (rotated) model with the adapters folded in out.

lora and reslora-bs merge exactly. reslora-is/ms shortcuts read earlier layers' inputs, which no single
weight can reproduce; they are merged with the paper's norm-ratio approximation or a least-squares map
fitted on calibration inputs (adapters/merge.py), and the error this costs is measured against the
unmerged adapted model on held-out windows and recorded in the manifest's 'merge' section.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rotaq.adapters.config import AdapterConfig
from rotaq.adapters.kinds import LOR2C_PATHS, PER_LINEAR, adapter_kind, required_adapter
from rotaq.adapters.lor2c_paths import side_path_section
from rotaq.adapters.merge import lstsq_shortcut_maps, merged_weights, paper_shortcut_maps
from rotaq.adapters.structure import InstalledAdapters, per_linear_adapters, remove_adapters, set_fake_quantization
from rotaq.eval.metrics import evaluate
from rotaq.pipeline.artifacts import new_manifest, refuse_output_over_input, write_model_artifact
from rotaq.pipeline.data import DataSpec, load_split_windows, windows_fingerprint
from rotaq.pipeline.errors import ArtifactError, RotaqError
from rotaq.pipeline.loading import LoadedModel, load_model
from rotaq.pipeline.options import setting

MERGE_METHODS = ("lstsq", "paper")
# λ / mean(diag Σ x xᵀ) tried by the lstsq merge; a larger ridge makes the fitted map less sensitive to the
# input shift that merging earlier layers causes, a smaller one fits the shortcut more closely.
RIDGE_CANDIDATES = (1e-3, 1e-2, 1e-1, 1.0)
# The candidate is chosen on calibration windows held out of the fit: chosen on the fitted windows, the
# smallest ridge always won, and with few windows (1024 tokens against inputs 1536 wide) it had fitted
# noise: held-out KL 0.30 against the adapted model, measured on the embedded model.
RIDGE_SELECTION_TOKENS = 2048
PAPER_CANDIDATE = "paper"  # the paper's norm-ratio maps compete too, so lstsq is never worse on held-out windows


@dataclass(frozen=True)
class MergeOptions:
    model: str
    out: Path
    method: str = setting("lstsq", "lstsq or paper: how reslora-is/ms shortcuts are merged (others merge exactly)",
                          choices=lambda: MERGE_METHODS)
    data: str | None = None  # default: the data the adapters were trained on
    seq_len: int | None = None  # default: the training window length
    eval_tokens: int = setting(4096, "held-out tokens for the merge error", minimum=2)
    calibration_tokens: int = setting(8192, "calibration tokens for the lstsq merge", minimum=2)
    ridge: float | None = setting(None, "lstsq ridge relative to the mean input energy (null: the best of 1e-3…1 "
                                        "by KL on held-out calibration windows)", minimum=0)
    batch_size: int = setting(4, "windows per forward pass of the calibration and the merge error", minimum=1)
    memory_budget_mb: int = setting(512, "MiB of float32 input sums held at once by the lstsq merge (more layers: "
                                         "more calibration passes)", minimum=1)

    def __post_init__(self) -> None:
        if self.method not in MERGE_METHODS:
            raise RotaqError(f"unknown merge method '{self.method}'; choose one of {', '.join(MERGE_METHODS)}")
        if self.ridge is not None and self.ridge <= 0:
            raise RotaqError(f"--ridge must be positive, got {self.ridge}")


def run_merge(options: MergeOptions) -> tuple[Path, dict[str, Any]]:
    """Write the merged folder; returns it with the manifest's 'merge' section (method and measured error)."""
    refuse_output_over_input(options.out, options.model)
    adapted = load_model(options.model)
    section = _adapters_section(adapted, options.model)
    return MERGES[adapter_kind(section["type"]).name](options, adapted, section)


def _merge_per_linear(options: MergeOptions, adapted: LoadedModel, section: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """Fold every adapter into its linear's weight: exactly (LoRA, ResLoRA-bs) or by the chosen method for
    shortcut types."""
    config = AdapterConfig.from_section(section)
    set_fake_quantization(adapted.model, None)  # the merge error is measured in float; QAT is recorded below
    installed = per_linear_adapters(adapted.model)
    data = _merge_data(options, adapted)
    method = options.method if config.has_shortcuts else "exact"

    merged = load_model(options.model)
    if method == "lstsq":
        calibration = _merge_lstsq(merged.model, adapted, installed, data, options, section)
    else:
        maps = paper_shortcut_maps(installed, _norm_ratios(section)) if method == "paper" else {}
        remove_adapters(merged.model, merged_weights(installed, maps))
        calibration = None
    merge_section = {"adapter_type": config.kind, "method": method, "exact": not config.has_shortcuts,
                     "qat": config.qat, "adapters": {k: section[k] for k in ("targets", "rank", "alpha", "pre_num")},
                     **_measured_error(merged.model, adapted, data, options)}
    if calibration:
        merge_section["calibration"] = calibration
    return _write_merged(options, adapted, merged, merge_section, {}), merge_section


def _merge_data(options: MergeOptions, adapted: LoadedModel) -> DataSpec:
    """The text and window length of the training run unless the caller names others."""
    training_options = adapted.manifest.get("options") or {}
    return DataSpec(options.data or training_options.get("data"),
                    options.seq_len or training_options.get("seq_len") or 256)


def _measured_error(merged: nn.Module, adapted: LoadedModel, data: DataSpec, options: MergeOptions) -> dict[str, Any]:
    """The merge section's 'error' (merged against adapted on held-out windows) and where it was measured."""
    eval_windows = load_split_windows(DataSpec(data.source, data.seq_len, options.eval_tokens), adapted.tokenizer,
                                      "evaluation")
    return {"error": merge_error(merged, adapted.model, eval_windows, options.batch_size),
            "evaluation": {"data": data.source or "default", "seq_len": data.seq_len,
                           "windows": int(eval_windows.shape[0]), "windows_sha256": windows_fingerprint(eval_windows)}}


def _write_merged(options: MergeOptions, adapted: LoadedModel, merged: LoadedModel, merge_section: dict[str, Any],
                  sections: dict[str, Any]) -> Path:
    manifest = new_manifest("merge", {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()},
                            adapted.source, adapted.manifest)
    if "rotation" in adapted.manifest:
        manifest["rotation"] = adapted.manifest["rotation"]
    manifest.update(sections)
    manifest["merge"] = merge_section
    return write_model_artifact(options.out, merged.model, merged.tokenizer, manifest)


def _merge_lor2c(options: MergeOptions, adapted: LoadedModel, section: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """Fold injected LoRA into q_proj / v_proj (exact); keep the paths, which span nonlinear layers and so fold
    into no weight, as low-rank side paths that the quantize and export stages carry."""
    merged = load_model(options.model)
    paths = required_adapter(merged.model)
    folded = sorted(paths.fold_injected(merged.model))
    side_paths = side_path_section(paths)
    merge_section = {"adapter_type": section["type"], "method": "exact", "exact": True, "qat": None,
                     "folded_lora": folded, "side_paths": len(paths.paths),
                     "side_path_parameters": side_paths["parameters"],
                     **_measured_error(merged.model, adapted, _merge_data(options, adapted), options)}
    return _write_merged(options, adapted, merged, merge_section, {"side_paths": side_paths}), merge_section


# How each adapter kind merges (adapters/kinds.py).
MERGES = {PER_LINEAR.name: _merge_per_linear, LOR2C_PATHS.name: _merge_lor2c}


def _adapters_section(loaded: LoadedModel, reference: str) -> dict[str, Any]:
    section = (loaded.manifest or {}).get("adapters")
    if not section:
        stage = (loaded.manifest or {}).get("stage", "not a rotaq stage folder")
        raise ArtifactError(f"nothing to merge: {reference} has no adapters ({stage}); pass a folder written by "
                            "rotaq finetune")
    return section


def _norm_ratios(section: dict[str, Any]) -> dict[str, list[list[float]]]:
    if not section.get("input_norm_ratios"):
        raise ArtifactError("the finetune folder has no input-norm statistics for the paper merge; use --method lstsq")
    return section["input_norm_ratios"]


def _merge_lstsq(merged_model: nn.Module, adapted: LoadedModel, installed: InstalledAdapters, data: DataSpec,
                 options: MergeOptions, section: dict[str, Any]) -> dict[str, Any]:
    """Fit the shortcut maps on part of the calibration windows; keep the ridge (or the paper's maps) whose
    merge has the lowest KL on the calibration windows held out of the fit."""
    windows = load_split_windows(DataSpec(data.source, data.seq_len, options.calibration_tokens), adapted.tokenizer,
                                 "calibration")
    if windows.shape[0] < 2:
        raise RotaqError(f"the lstsq merge needs at least 2 calibration windows of {data.seq_len} tokens (one to fit, "
                         f"one to choose the ridge); got {windows.shape[0]}: raise --calibration-tokens")
    held_out = min(windows.shape[0] // 2, max(1, RIDGE_SELECTION_TOKENS // data.seq_len))
    fit, selection = windows[:-held_out], windows[-held_out:]
    ridges = (options.ridge,) if options.ridge is not None else RIDGE_CANDIDATES
    candidates: dict[Any, Any] = dict(lstsq_shortcut_maps(adapted.model, installed, fit, options.batch_size, ridges,
                                                          options.memory_budget_mb << 20))
    if options.ridge is None and section.get("input_norm_ratios"):
        candidates[PAPER_CANDIDATE] = paper_shortcut_maps(installed, section["input_norm_ratios"])
    remove_adapters(merged_model, merged_weights(installed, candidates[ridges[0]]))
    kl_by_candidate = {}
    for candidate in candidates if len(candidates) > 1 else ():
        set_weights(merged_model, merged_weights(installed, candidates[candidate]))
        kl_by_candidate[candidate] = evaluate(merged_model, selection, reference=adapted.model,
                                              batch_size=options.batch_size, progress=False).kl_divergence
    chosen = min(kl_by_candidate, key=kl_by_candidate.get) if kl_by_candidate else ridges[0]
    set_weights(merged_model, merged_weights(installed, candidates[chosen]))
    return {"split": "calibration", "tokens": int(windows.numel()), "windows_sha256": windows_fingerprint(windows),
            "fit_tokens": int(fit.numel()), "selection_tokens": int(selection.numel()),
            "ridge": chosen, "selection_kl": {str(c): kl for c, kl in kl_by_candidate.items()}}


@torch.no_grad()
def set_weights(model: nn.Module, weights: dict[str, Tensor]) -> None:
    for path, weight in weights.items():
        model.get_submodule(path).weight.copy_(weight)


def merge_error(merged: nn.Module, adapted: nn.Module, windows: Tensor, batch_size: int) -> dict[str, float]:
    """Perplexity of both, KL(adapted ‖ merged), top-1 agreement, and max|Δlogit| / max|logit| over all windows."""
    adapted_result = evaluate(adapted, windows, batch_size=batch_size, progress=False)
    merged_result = evaluate(merged, windows, reference=adapted, batch_size=batch_size, progress=False)
    return {"perplexity_adapted": adapted_result.perplexity, "perplexity_merged": merged_result.perplexity,
            "kl_divergence": merged_result.kl_divergence, "top1_agreement": merged_result.top1_agreement,
            "max_relative_logit_error": max_relative_logit_error(merged, adapted, windows, batch_size),
            "tokens": merged_result.tokens}


@torch.inference_mode()
def max_relative_logit_error(model: nn.Module, reference: nn.Module, windows: Tensor, batch_size: int) -> float:
    """max|a − b| / max|b| over every logit of every window (a: model, b: reference)."""
    device = next(model.parameters()).device
    largest_gap = largest_logit = 0.0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start:start + batch_size].to(device)
        logits, reference_logits = model(input_ids=batch).logits, reference(input_ids=batch).logits
        largest_gap = max(largest_gap, float((logits - reference_logits).abs().max()))
        largest_logit = max(largest_logit, float(reference_logits.abs().max()))
    return largest_gap / largest_logit if largest_logit else 0.0
