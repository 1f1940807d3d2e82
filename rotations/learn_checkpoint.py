"""The resumable state of a rotation being learned: one file, replaced atomically after every step.

It holds R1/R2, the optimizer's momentum, the step reached and the loss log, plus a hash of every setting
that shapes the trajectory; a checkpoint made under other settings is refused rather than silently mixed.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import torch

from rotaq.adapters.checkpoint import describe_differences, settings_fingerprint
from rotaq.pipeline.atomic import atomic_write
from rotaq.pipeline.errors import RotaqError

logger = logging.getLogger(__name__)


class RotationCheckpoint:
    """Checkpoint file `path` of a learning run under `settings` (JSON-serialisable values)."""

    def __init__(self, path: Path, settings: dict[str, Any]) -> None:
        self.path = Path(path)
        self.settings = settings
        self.fingerprint = settings_fingerprint(settings)

    def load(self) -> dict[str, Any] | None:
        """The saved state to resume from, None when there is none; refuses one made under other settings."""
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, weights_only=True, map_location="cpu")  # resumable on another device
        except Exception as exc:  # a truncated or foreign file: torch raises several unrelated types
            raise RotaqError(f"cannot read the rotation checkpoint {self.path} ({type(exc).__name__}); "
                             "remove it to start over") from exc
        if state.get("fingerprint") != self.fingerprint:
            raise RotaqError(f"cannot resume from {self.path}: it was learned with other settings "
                             f"({describe_differences(state.get('settings', {}), self.settings)}); "
                             "remove it to start over")
        logger.info("resuming the learned rotation from %s (step %d)", self.path, state["step"])
        return state

    def save(self, step: int, rotations: dict[str, torch.Tensor], optimizer: dict[str, Any],
             log: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        torch.save({"fingerprint": self.fingerprint, "settings": self.settings, "step": step,
                    "rotations": rotations, "optimizer": optimizer, "log": log}, buffer)
        atomic_write(self.path, buffer.getvalue())

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
