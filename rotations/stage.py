"""The rotate stage: model reference in, rotated stage folder out, with its exactness measured."""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rotaq.pipeline.artifacts import new_manifest, refuse_output_over_input, write_model_artifact
from rotaq.pipeline.data import DataSpec
from rotaq.pipeline.errors import RotaqError
from rotaq.pipeline.loading import load_model
from rotaq.pipeline.options import setting
from rotaq.quantizers.schemes import clip_ratio_problem, scheme_problem
from rotaq.rotations.learn_stage import LEARN_CALIBRATION, learn_for_stage, learn_settings
from rotaq.rotations.learned import DEFAULT_LR, LEARN_WEIGHT_MODES
from rotaq.rotations.rotate import ROTATION_KINDS, RotationConfig, rotate_model

logger = logging.getLogger(__name__)

# Exactness is checked on a short fixed prompt: enough to catch any wrong transform.
CHECK_TOKENS = 64
MAX_RELATIVE_LOGIT_ERROR = 1e-4


@dataclass(frozen=True)
class RotateOptions:
    model: str | None
    out: Path
    rotation: str = setting("hadamard", "hadamard, random (a seeded orthogonal matrix, for widths with no "
                                        "Hadamard matrix), or learned (R1 and per-head R2 trained from the "
                                        "Hadamard for `scheme`)", choices=lambda: ROTATION_KINDS, old_names=("kind",))
    seed: int = setting(0, "seed of the random signs (hadamard) or of the random orthogonal matrix")
    online: bool = setting(True, "online Hadamard rotations before o_proj and down_proj")
    check: bool = setting(True, "check that the rotated model's logits match the original's (costs one model copy "
                                "in memory)")
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


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|a − b| / max|b|: the logit error relative to the logit scale."""
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max())


def _check_tokens(vocab_size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (1, CHECK_TOKENS), generator=generator)


def run_rotate(options: RotateOptions) -> Path:
    config = RotationConfig(kind=options.rotation, seed=options.seed, online=options.online)
    if config.kind == "learned":
        learn_settings(options)  # a bad scheme or step count fails before the model is loaded
    refuse_output_over_input(options.out, options.model)
    loaded = load_model(options.model)
    if loaded.manifest and loaded.manifest.get("rotation"):
        raise RotaqError(f"{options.model} is already rotated; rotate the original model instead")
    if loaded.manifest and (loaded.manifest.get("side_paths") or loaded.manifest.get("adapters")):
        raise RotaqError(f"{options.model} has adapters or LoR2C side paths, which a rotation would not carry; "
                         "rotate the model before fine-tuning it")
    model = loaded.model
    reference = copy.deepcopy(model) if options.check else None
    logger.info("rotating %s (%s, seed %d)", loaded.source.get("name") or options.model, config.kind, config.seed)
    learned = learn_for_stage(options, loaded, config) if config.kind == "learned" else None
    rotation_section = rotate_model(model, loaded.family, config, learned.matrices if learned else None)
    if learned is not None:
        rotation_section["learned"] = learned.summary
    if reference is not None:
        tokens = _check_tokens(model.config.vocab_size, options.seed)
        with torch.inference_mode():
            error = max_relative_error(model(input_ids=tokens).logits, reference(input_ids=tokens).logits)
        rotation_section["check"] = {"tokens": CHECK_TOKENS, "max_relative_logit_error": error}
        if error > MAX_RELATIVE_LOGIT_ERROR and next(model.parameters()).dtype == torch.float32:
            raise RotaqError(f"rotation changed the logits (relative error {error:.2e} > {MAX_RELATIVE_LOGIT_ERROR}); "
                             "nothing was written")
    manifest = new_manifest("rotate", {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()},
                            loaded.source, loaded.manifest)
    manifest["rotation"] = rotation_section
    written = write_model_artifact(options.out, model, loaded.tokenizer, manifest)
    if learned is not None:
        learned.checkpoint.remove()
    return written
