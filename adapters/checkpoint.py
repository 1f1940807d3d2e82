"""Training checkpoints: adapter weights, optimizer, scheduler, step, RNG state and a configuration hash.

Each checkpoint is a folder `step-XXXXXXXX` assembled under a temporary name and renamed into place,
so a crash mid-write leaves the previous checkpoint as the last complete one. Only the newest is kept.
Every process writes its own RNG state; the main process writes the rest. A checkpoint records the
hash of every setting that shapes the training trajectory, and resuming under other settings is
refused before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rotaq.adapters.structure import adapter_state_dict, load_adapter_state
from rotaq.pipeline.errors import RotaqError

STEP_PREFIX = "step-"
STATE_NAME = "state.json"
ADAPTERS_NAME = "adapters.safetensors"


def settings_fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def describe_differences(saved: dict[str, Any], current: dict[str, Any]) -> str:
    """'training.lr: 0.001 → 0.002, …' for the settings that differ."""
    old, new = _flatten(saved), _flatten(current)
    changed = [f"{key}: {old.get(key)} → {new.get(key)}" for key in sorted(set(old) | set(new))
               if old.get(key) != new.get(key)]
    return ", ".join(changed) or "settings hash differs"


@dataclass
class TrainingState:
    """What a checkpoint holds besides tensors: the step reached, the log so far, the norm history."""

    step: int
    log: dict[str, Any]
    input_norms: dict[str, list[list[float]]]


class CheckpointFolder:
    """The checkpoints of one training run, all made under the same `settings`."""

    def __init__(self, folder: Path, settings: dict[str, Any], accelerator: Any) -> None:
        self.folder = Path(folder)
        self.settings = settings
        self.fingerprint = settings_fingerprint(settings)
        self.accelerator = accelerator

    def latest(self) -> Path | None:
        if not self.folder.is_dir():
            return None
        complete = [p for p in self.folder.glob(f"{STEP_PREFIX}*") if (p / STATE_NAME).is_file()]
        return max(complete, key=lambda p: p.name) if complete else None

    def checkpoint_to_resume(self, resume: bool) -> Path | None:
        """The checkpoint to continue from, or None to start fresh; refuses anything that would lose work."""
        latest = self.latest()
        if latest is None:
            return None
        if not resume:
            raise RotaqError(f"{self.folder} already holds a checkpoint ({latest.name}); pass --resume to continue "
                             "it, or remove the folder to start over")
        saved = json.loads((latest / STATE_NAME).read_text())
        if saved["fingerprint"] != self.fingerprint:
            raise RotaqError(f"cannot resume from {latest}: it was trained with different settings "
                             f"({describe_differences(saved['settings'], self.settings)}); nothing was changed")
        return latest

    def save(self, state: TrainingState, model: nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: Any, structure: dict[str, Any] | None = None) -> Path:
        """Write step `state.step` atomically (every process must call this), then drop older checkpoints."""
        accelerator = self.accelerator
        final = self.folder / f"{STEP_PREFIX}{state.step:08d}"
        staging = self.folder / f".{final.name}.tmp"
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        accelerator.wait_for_everyone()
        torch.save(_rng_state(), staging / f"rng-rank{accelerator.process_index}.pt")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            save_file({k: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()},
                      str(staging / ADAPTERS_NAME))
            torch.save(optimizer.state_dict(), staging / "optimizer.pt")
            torch.save(scheduler.state_dict(), staging / "scheduler.pt")
            payload = {"fingerprint": self.fingerprint, "settings": self.settings, "step": state.step,
                       "log": state.log, "input_norms": state.input_norms, "structure": structure}
            (staging / STATE_NAME).write_text(json.dumps(payload, indent=1, default=str) + "\n")
            shutil.rmtree(final, ignore_errors=True)
            staging.rename(final)
            for older in [*self.folder.glob(f"{STEP_PREFIX}*"), *self.folder.glob(f".{STEP_PREFIX}*.tmp")]:
                if older != final:  # older steps, and the staging folder of a save that was killed
                    shutil.rmtree(older, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

    def saved_structure(self, checkpoint: Path) -> dict[str, Any]:
        """The adapters' structure at the checkpoint (LoR2C spans and injected layers): rebuilt before its
        tensors are loaded."""
        structure = json.loads((checkpoint / STATE_NAME).read_text()).get("structure")
        if not structure:
            raise RotaqError(f"{checkpoint} records no LoR2C structure; remove the folder to start over")
        return structure

    def load(self, checkpoint: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: Any) -> TrainingState:
        """Restore tensors, optimizer, scheduler and this process's RNG; return the rest of the state."""
        device = next(model.parameters()).device
        load_adapter_state(model, load_file(str(checkpoint / ADAPTERS_NAME), device=str(device)))
        optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True, map_location=device))
        scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=True))
        rng_path = checkpoint / f"rng-rank{self.accelerator.process_index}.pt"
        _set_rng_state(torch.load(rng_path, weights_only=True))
        saved = json.loads((checkpoint / STATE_NAME).read_text())
        return TrainingState(step=int(saved["step"]), log=saved["log"], input_norms=saved["input_norms"])


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
