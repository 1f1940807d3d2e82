"""The rotate stage's learned kind: its options turned into learning settings, start, data and checkpoint."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from rotaq.pipeline.data import DataSpec, load_split_windows, windows_fingerprint
from rotaq.pipeline.families import DecoderFamily, decoder_layers
from rotaq.rotations.rotate import (
    RotationConfig,
    RotationMatrices,
    head_rotation_matrix,
    online_rotation_specs,
    start_matrix,
)

if TYPE_CHECKING:
    from rotaq.pipeline.loading import LoadedModel
    from rotaq.rotations.learn_checkpoint import RotationCheckpoint
    from rotaq.rotations.learned import LearnSettings
    from rotaq.rotations.stage import RotateOptions

logger = logging.getLogger(__name__)
# 64 windows of 128 tokens: a step (one window) takes about 7 s on 2 cores for SmolLM2-135M.
LEARN_CALIBRATION = DataSpec(seq_len=128, max_tokens=64 * 128)


@dataclass
class StageLearning:
    matrices: RotationMatrices
    summary: dict[str, Any]
    checkpoint: RotationCheckpoint


def learn_settings(options: RotateOptions) -> LearnSettings:
    """The learning settings of `options`; a RotaqError for a scheme without activation quantization or no steps."""
    from rotaq.quantizers.stage import QuantizeOptions, resolve_scheme
    from rotaq.rotations.learned import LearnSettings

    scheme = resolve_scheme(QuantizeOptions(model=options.model, out=options.out, scheme=options.scheme,
                                            act_clip_ratio=options.act_clip_ratio))
    return LearnSettings(scheme=scheme, steps=options.steps, lr=options.lr, learn_heads=options.head_rotation,
                         weights=options.learn_weights, batch_size=options.batch_size, seed=options.seed,
                         progress=options.progress)


def start_rotations(model: nn.Module, family: DecoderFamily, config: RotationConfig,
                    learn_heads: bool) -> RotationMatrices:
    """The fixed rotation itself: the randomized Hadamard R1 (a random orthogonal one, with a warning, for a width
    without a Hadamard matrix) and, when the R2s are learned, the fixed R2 (`o_proj_rotation: head`) or R2 = I
    (online): an online Hadamard before o_proj spans every head already, and a Hadamard R2 in front of it would
    undo its mixing inside each head (H·H = n·I). Without learned R2s, `rotate_model` folds the fixed one."""
    residual = start_matrix(model.get_submodule(family.embed_tokens).weight.shape[1], config.seed)
    if not learn_heads:
        return RotationMatrices(residual)
    head_dim = family.head_dim(model.config)
    start = head_rotation_matrix(head_dim, config)
    start = torch.eye(head_dim, dtype=torch.float64) if start is None else start.double()
    return RotationMatrices(residual, [start.clone() for _ in decoder_layers(model, family)])


def checkpoint_path(options: RotateOptions) -> Path:
    return Path(options.checkpoint) if options.checkpoint else Path(f"{options.out}.rotation-checkpoint.pt")


def learn_for_stage(options: RotateOptions, loaded: LoadedModel, config: RotationConfig) -> StageLearning:
    """Learn the rotation of `loaded.model` in place of its norm folding (its weights are otherwise untouched)."""
    from rotaq.rotations.learn_checkpoint import RotationCheckpoint
    from rotaq.rotations.learned import learn_rotations

    settings = learn_settings(options)
    windows = load_split_windows(options.calibration, loaded.tokenizer, "calibration")
    model, family = loaded.model, loaded.family
    trajectory = {**settings.trajectory(), "model": str(options.model), "online": options.online,
                  "o_proj_rotation": config.o_proj_rotation, "online_block": config.online_block,
                  "calibration_sha256": windows_fingerprint(windows), "seq_len": int(windows.shape[1])}
    checkpoint = RotationCheckpoint(checkpoint_path(options), trajectory)
    start = start_rotations(model, family, config, settings.learn_heads)
    online = online_rotation_specs(model, family, config) if config.online else {}
    result = learn_rotations(model, family, windows, settings, start, online, checkpoint)
    log = result.log
    if log["stopped"]:
        logger.warning("learned rotation stopped early: %s", log["stopped"])
    losses = log["losses"]
    summary = {"steps": log["steps"], "requested_steps": settings.steps, "seconds": log["seconds"],
               "learn_heads": settings.learn_heads, "weights": settings.weights, "scheme": settings.scheme.name,
               "act_clip_ratio": settings.scheme.act_clip_ratio, "lr": settings.lr,
               "batch_size": settings.batch_size, "calibration_windows": int(windows.shape[0]),
               "seq_len": int(windows.shape[1]), "calibration_sha256": trajectory["calibration_sha256"],
               "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
               "losses": [round(v, 5) for v in losses], "resumed_at": log["resumed_at"], "stopped": log["stopped"]}
    return StageLearning(result.matrices, summary, checkpoint)
