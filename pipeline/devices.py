"""Where a torch stage computes: `--device cpu|cuda[:N]` (and `<stage>.device` in `rotaq run`).

Weights are read from and written to disk on the CPU either way; a stage moves what it holds (a decoder layer,
or the whole model on the whole-model paths) to the device for the arithmetic and brings results back to be
written. The CPU is the default: it is what every measurement in docs/ was taken on, and what CI has.
"""

from __future__ import annotations

import re

import torch

from rotaq.pipeline.errors import RotaqError

CPU = "cpu"
# Fine-tuning's default: accelerate's own choice (the GPUs when there are any, one per `accelerate launch`
# process), as before the option existed.
AUTO = "auto"
_DEVICE_NAME = re.compile(r"^(cpu|cuda(:\d+)?)$")


def device_problem(name: str) -> str | None:
    """Why `name` is not a device rotaq computes on, or None (for the options' `check=`)."""
    if not isinstance(name, str) or not _DEVICE_NAME.match(name):
        return f"{name!r} is not a device; use cpu, cuda or cuda:N"
    return None


def training_device_problem(name: str) -> str | None:
    """`device_problem` for fine-tuning: auto, cpu or cuda (accelerate gives each process its own GPU)."""
    return None if name in (AUTO, CPU, "cuda") else f"{name!r} is not a training device; use auto, cpu or cuda"


def torch_device(name: str) -> torch.device:
    """The torch device `name` names, refused in one line when it is not there to compute on."""
    if problem := device_problem(name):
        raise RotaqError(problem)
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "without CUDA" if torch.version.cuda is None else f"with CUDA {torch.version.cuda}, but sees no GPU"
            raise RotaqError(f"--device {name}: this torch {torch.__version__} is built {build}; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RotaqError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
    return device
