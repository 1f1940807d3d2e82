"""The rotate stage: model reference in, rotated stage folder out, with its exactness measured."""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rotaq.pipeline.devices import CPU, device_problem, torch_device
from rotaq.pipeline.artifacts import (WEIGHTS_NAME, finish_model_folder, new_manifest, refuse_output_over_input,
                                     staged_folder, write_model_artifact)
from rotaq.pipeline.data import DataSpec
from rotaq.pipeline.errors import RotaqError
from rotaq.pipeline.families import family_for_model_type
from rotaq.pipeline.loading import WeightsFolder, load_model, model_files_explained, weights_folder
from rotaq.pipeline.options import setting
from rotaq.quantizers.schemes import clip_ratio_problem, scheme_problem
from rotaq.rotations.learn_stage import LEARN_CALIBRATION, learn_for_stage, learn_settings
from rotaq.rotations.learned import DEFAULT_LR, LEARN_WEIGHT_MODES
from rotaq.pipeline.tensor_files import TensorFiles
from rotaq.rotations.rotate import (O_PROJ_ROTATIONS, ROTATION_KINDS, RotationConfig, max_relative_error,
                                    rotate_model, untie_config)
from rotaq.rotations.streamed import rotate_streamed

logger = logging.getLogger(__name__)

# Exactness is checked on a short fixed prompt: enough to catch any wrong transform.
CHECK_TOKENS = 64
MAX_RELATIVE_LOGIT_ERROR = 1e-4
# A wrong transform moves logits by O(1); bf16 rounding of the rotated weights by up to 7.2e-3 (tiny models).
MAX_RELATIVE_LOGIT_ERROR_16BIT = 5e-2


@dataclass(frozen=True)
class RotateOptions:
    model: str | None
    out: Path
    rotation: str = setting("hadamard", "hadamard, random (a seeded orthogonal matrix, for widths with no "
                                        "Hadamard matrix), or learned (R1 and per-head R2 trained from the "
                                        "Hadamard for `scheme`)", choices=lambda: ROTATION_KINDS, old_names=("kind",))
    seed: int = setting(0, "seed of the random signs (hadamard) or of the random orthogonal matrix")
    online: bool = setting(True, "online Hadamard rotation before down_proj (and before o_proj with "
                                 "o_proj_rotation online)")
    o_proj_rotation: str | None = setting(
        None, "how o_proj's input is rotated: head (a Hadamard per value head folded into v_proj and o_proj, "
              "nothing at run time) or online (a Hadamard across all heads before o_proj); null: head, or online "
              "for a learned rotation, whose R2 is learned on top of it", choices=lambda: O_PROJ_ROTATIONS)
    online_block: int | None = setting(
        None, "online Hadamards block-diagonal in blocks of N channels where N divides the width (one MatMul in "
              "the graph); 0: over the whole width; null: 128, or 0 for a learned rotation", minimum=0)
    check: bool = setting(True, "check that the rotated model's logits match the original's on a 64-token prompt "
                                "(layer by layer: one more layer in memory; whole model: one model copy)")
    layer_by_layer: bool = setting(True, "rotate one decoder layer at a time from the memory-mapped safetensors "
                                         "(a hub id's: its snapshot in the Hugging Face cache), keeping their dtype "
                                         "(bf16 stays bf16); false, or .bin weights or a learned rotation: load the "
                                         "whole model in float32")
    device: str = setting(CPU, "where the rotation, its check and a learned rotation's training run: cpu, cuda "
                               "or cuda:N (weights are read and written on the CPU)", check=device_problem)
    # rotation: learned only (rotations/learned.py)
    steps: int = setting(100, "learned: Cayley SGD steps on the calibration split", minimum=1)
    scheme: str = setting("w4a4", "learned: the scheme whose fake quantization the rotation is learned for (one "
                                  "that quantizes activations)", check=scheme_problem)
    act_clip_ratio: float | None = setting(None, "learned: activation clip while learning, as quantize's "
                                                 "act_clip_ratio (null: the scheme's; in rotaq run, "
                                                 "quantize.act_clip_ratio)", check=clip_ratio_problem)
    head_rotation: bool = setting(True, "learned: also learn a per-head R2 on v_proj/o_proj (false: R1 only)")
    # float is the measured default: W4A4 GPTQ perplexity 44.94 against 57.90 learned with RTN weights
    # (SmolLM2-135M, R1+R2, docs/rotation.md); the Hadamard start scores 45.47.
    learn_weights: str = setting("float", "learned: decoder weights while learning: float (activations only, as "
                                          "SpinQuant learns when GPTQ follows) or rtn (fake-quantized per channel, "
                                          "straight-through, for RTN deployment)", choices=lambda: LEARN_WEIGHT_MODES)
    lr: float = setting(DEFAULT_LR, "learned: Riemannian SGD learning rate", minimum=0)
    batch_size: int = setting(1, "learned: calibration windows per step", minimum=1)
    calibration: DataSpec = LEARN_CALIBRATION
    checkpoint: Path | None = None  # learned: resumable state (default OUT.rotation-checkpoint.pt), then removed
    progress: bool = True


def _check_tokens(vocab_size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (1, CHECK_TOKENS), generator=generator)


def rotation_config(options: RotateOptions) -> RotationConfig:
    return RotationConfig(kind=options.rotation, seed=options.seed, online=options.online,
                          o_proj_rotation=options.o_proj_rotation, online_block=options.online_block)


def run_rotate(options: RotateOptions) -> Path:
    config = rotation_config(options)
    if config.kind == "learned":
        learn_settings(options)  # a bad scheme or step count fails before the model is loaded
    refuse_output_over_input(options.out, options.model)
    device = torch_device(options.device)
    if options.layer_by_layer and config.kind != "learned":
        weights = weights_folder(options.model)
        if weights is not None and not (weights.manifest or {}).get("quantization"):
            return _rotate_layer_by_layer(options, config, weights, device)
    loaded = load_model(options.model)
    _refuse_parent(options.model, loaded.manifest)
    model = loaded.model.to(device)
    reference = copy.deepcopy(model) if options.check else None
    logger.info("rotating %s (%s, seed %d)", loaded.source.get("name") or options.model, config.kind, config.seed)
    learned = learn_for_stage(options, loaded, config) if config.kind == "learned" else None
    rotation_section = rotate_model(model, loaded.family, config, learned.matrices if learned else None)
    if learned is not None:
        rotation_section["learned"] = learned.summary
    if reference is not None:
        tokens = _check_tokens(model.config.vocab_size, options.seed).to(device)
        with torch.inference_mode():
            error = max_relative_error(model(input_ids=tokens).logits, reference(input_ids=tokens).logits)
        rotation_section["check"] = {"tokens": CHECK_TOKENS, "max_relative_logit_error": error}
        _refuse_changed_logits(error, next(model.parameters()).dtype)
    written = write_model_artifact(options.out, model.cpu(), loaded.tokenizer,
                                   _rotate_manifest(options, loaded.source, loaded.manifest, rotation_section))
    if learned is not None:
        learned.checkpoint.remove()
    return written


def _rotate_layer_by_layer(options: RotateOptions, config: RotationConfig, weights: WeightsFolder,
                           device: torch.device) -> Path:
    """The rotation read from and written to safetensors one decoder layer at a time (rotations/streamed.py)."""
    _refuse_parent(options.model, weights.manifest)
    family = family_for_model_type(weights.config.model_type)
    tokenizer = weights.tokenizer()
    with model_files_explained(weights.folder):
        files = TensorFiles(weights.folder)
    logger.info("rotating %s layer by layer (%s, seed %d)", weights.source.get("name") or options.model, config.kind,
                config.seed)
    tokens = _check_tokens(weights.config.vocab_size, options.seed) if options.check else None
    with staged_folder(options.out) as tmp:
        with model_files_explained(weights.folder):
            section = rotate_streamed(files, weights.config, family, config, tmp / WEIGHTS_NAME, tokens,
                                      progress=options.progress, device=device)
        if "check" in section:
            _refuse_changed_logits(section["check"]["max_relative_logit_error"],
                                   files.layout(f"{family.embed_tokens}.weight")[0])
        untie_config(weights.config)
        finish_model_folder(tmp, weights.config.to_dict(), tokenizer,
                            _rotate_manifest(options, weights.source, weights.manifest, section))
    return Path(options.out)


def _refuse_parent(model: str | None, manifest: dict | None) -> None:
    if manifest and manifest.get("rotation"):
        raise RotaqError(f"{model} is already rotated; rotate the original model instead")
    if manifest and (manifest.get("side_paths") or manifest.get("adapters")):
        raise RotaqError(f"{model} has adapters or LoR2C side paths, which a rotation would not carry; "
                         "rotate the model before fine-tuning it")


def _refuse_changed_logits(error: float, dtype: torch.dtype) -> None:
    """A float32 model must keep its logits to 1e-4; a 16-bit one, whose rotated weights are rounded to 16 bits
    again, to MAX_RELATIVE_LOGIT_ERROR_16BIT (measured at most 7.2e-3 on the tiny bf16 models)."""
    limit = MAX_RELATIVE_LOGIT_ERROR if dtype == torch.float32 else MAX_RELATIVE_LOGIT_ERROR_16BIT
    if error > limit:
        raise RotaqError(f"rotation changed the logits (relative error {error:.2e} > {limit}); nothing was written")


def _rotate_manifest(options: RotateOptions, source: dict, parent: dict | None, section: dict) -> dict:
    manifest = new_manifest("rotate", {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()},
                            source, parent)
    manifest["rotation"] = section
    return manifest
