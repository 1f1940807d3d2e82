"""Named quantization schemes (``w4a16-g128`` and friends) and their validation."""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.errors import RotaqError

WEIGHT_BITS = (4, 8)
ACT_BITS = (4, 8, 16)
BASE_NAMES = ("w8a8", "w4a8", "w4a4", "w4a16")

_NAME_RE = re.compile(r"^w(\d+)a(\d+)(?:-g(\d+))?$")


def _valid_names() -> str:
    return ", ".join(BASE_NAMES) + " (optionally with a group suffix such as -g128)"


@dataclass(frozen=True)
class QuantScheme:
    """How weights, activations and the KV cache of the decoder layers are quantized.

    ``act_bits == 16`` means activations stay in floating point (weight-only quantization).
    ``weight_group_size is None`` means one scale per output channel.
    ``lm_head_bits`` keeps the LM head and embeddings at 8 bits by default because they are
    the layers most sensitive to low-bit error; ``None`` leaves them unquantized.
    """

    weight_bits: int
    act_bits: int
    weight_group_size: int | None = None
    weight_symmetric: bool = True
    act_symmetric: bool = True
    act_clip_ratio: float = 1.0
    weight_clip_search: bool = True
    kv_bits: int | None = None
    lm_head_bits: int | None = 8

    def __post_init__(self) -> None:
        if self.weight_bits not in WEIGHT_BITS:
            raise RotaqError(
                f"weight_bits={self.weight_bits} is not supported; use one of {WEIGHT_BITS} "
                f"(valid scheme names: {_valid_names()})"
            )
        if self.act_bits not in ACT_BITS:
            raise RotaqError(
                f"act_bits={self.act_bits} is not supported; use one of {ACT_BITS} "
                f"(valid scheme names: {_valid_names()})"
            )
        if self.weight_group_size is not None and self.weight_group_size <= 0:
            raise RotaqError(f"weight_group_size={self.weight_group_size} must be a positive integer or None")
        if not 0.0 < self.act_clip_ratio <= 1.0:
            raise RotaqError(f"act_clip_ratio={self.act_clip_ratio} must be in (0, 1]")
        if self.kv_bits is not None and self.kv_bits not in ACT_BITS:
            raise RotaqError(f"kv_bits={self.kv_bits} is not supported; use one of {ACT_BITS} or None")
        if self.lm_head_bits is not None and self.lm_head_bits not in WEIGHT_BITS:
            raise RotaqError(f"lm_head_bits={self.lm_head_bits} is not supported; use one of {WEIGHT_BITS} or None")

    @property
    def name(self) -> str:
        """The scheme's canonical name; ``parse_scheme(s.name)`` gives back the same bit/group layout."""
        suffix = f"-g{self.weight_group_size}" if self.weight_group_size is not None else ""
        return f"w{self.weight_bits}a{self.act_bits}{suffix}"

    @property
    def quantizes_activations(self) -> bool:
        return self.act_bits < 16


def parse_scheme(name: str) -> QuantScheme:
    """Parse ``w{4,8}a{4,8,16}[-gN]`` into a scheme with the project's defaults for the rest."""
    match = _NAME_RE.match(name.strip().lower())
    if match is None or f"w{match.group(1)}a{match.group(2)}" not in BASE_NAMES:
        raise RotaqError(f"unknown quantization scheme {name!r}; valid names: {_valid_names()}")
    group = int(match.group(3)) if match.group(3) is not None else None
    if group is not None and group <= 0:
        raise RotaqError(f"scheme {name!r}: group size must be positive; valid names: {_valid_names()}")
    return QuantScheme(weight_bits=int(match.group(1)), act_bits=int(match.group(2)), weight_group_size=group)


def validate_group(group: int | None, width: int, layer_name: str) -> None:
    """Fail early, naming the layer, when a group size does not tile the layer's input width."""
    if group is None:
        return
    if group <= 0:
        raise RotaqError(f"{layer_name}: group size {group} must be positive")
    if width % group != 0:
        raise RotaqError(f"{layer_name}: group size {group} does not divide input width {width}")
