"""Named quantization schemes (``w4a16-g128`` and friends) and their validation."""

from __future__ import annotations

import re
from dataclasses import dataclass

from rotaq.pipeline.errors import RotaqError

WEIGHT_BITS = (4, 8)
ACT_BITS = (4, 8, 16)
BASE_NAMES = ("w8a8", "w4a8", "w4a4", "w4a16")
ACT_BLOCK_SIZES = (16, 32, 64, 128)  # MatMulNBits block sizes
# The A8 schemes follow ONNX Runtime's fast kernel (MatMulNBits accuracy_level 4): int8 activations per
# block along K. W4A8 uses 128: measured on SmolLM2-135M (RTN, 16 held-out windows of 512) perplexity 58.24 /
# 58.22 / 58.11 with blocks of 32 / 64 / 128, and decode in onnxruntime-genai 136.9 / 148.2 / 154.6 tok/s
# (one bench run, AMD EPYC, 2 threads): fewer scales per weight, at no cost in accuracy. The builder's int4
# graph uses 32. W8A8 uses 64: measured on an AVX2 CPU without VNNI (one 576x1536 layer, 512 tokens), 8-bit
# MatMulNBits is 1.25x float32 with blocks of 64 but 0.85x with 32, and MatMulInteger (per-token int8) 0.22x.
# `--act-block-size 0` gives per-token activations instead.
DEFAULT_ACT_BLOCK = {"w4a8": 128, "w8a8": 64}

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
    # None: one activation scale per token. N: one per block of N along K, which is what ONNX Runtime's
    # MatMulNBits computes at accuracy_level 4 (int8 symmetric, absmax / 127), so the fake-quant model
    # and the deployed W4A8 kernel compute the same function.
    act_block_size: int | None = None
    weight_clip_search: bool = True
    kv_bits: int | None = None
    lm_head_bits: int | None = 8
    # Let the last weight group be shorter when the group size does not divide a width (the layout
    # MatMulNBits uses: K padded up to whole blocks). Off by default, so a typo'd group size fails.
    ragged_groups: bool = False

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
        if self.act_block_size is not None and (self.act_block_size not in ACT_BLOCK_SIZES or self.act_bits != 8
                                                or not self.act_symmetric or self.act_clip_ratio != 1.0):
            raise RotaqError(
                f"act_block_size={self.act_block_size}: per-block activations follow ONNX Runtime's kernel, which "
                f"quantizes int8, symmetric, unclipped, in blocks of {', '.join(map(str, ACT_BLOCK_SIZES))}; "
                "pass --act-block-size 0 for per-token activations with other settings")
        if self.kv_bits is not None and self.kv_bits not in (4, 8):
            raise RotaqError(f"kv_bits={self.kv_bits} is not supported; use 4 or 8, or None for a float cache")
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

    @property
    def clips_activations_by_default(self) -> bool:
        """Whether a pipeline-wide activation clip applies: only per-token activations are clipped; the
        per-block A8 schemes follow ONNX Runtime's kernel, which does not clip (a clip would make them per
        token and slow), and weight-only schemes have no activation grid."""
        return self.quantizes_activations and self.act_block_size is None


def parse_scheme(name: str) -> QuantScheme:
    """Parse ``w{4,8}a{4,8,16}[-gN]`` into a scheme with the project's defaults for the rest."""
    match = _NAME_RE.match(name.strip().lower())
    if match is None or f"w{match.group(1)}a{match.group(2)}" not in BASE_NAMES:
        raise RotaqError(f"unknown quantization scheme {name!r}; valid names: {_valid_names()}")
    group = int(match.group(3)) if match.group(3) is not None else None
    if group is not None and group <= 0:
        raise RotaqError(f"scheme {name!r}: group size must be positive; valid names: {_valid_names()}")
    base = f"w{match.group(1)}a{match.group(2)}"
    return QuantScheme(weight_bits=int(match.group(1)), act_bits=int(match.group(2)), weight_group_size=group,
                       act_block_size=DEFAULT_ACT_BLOCK.get(base))


def scheme_problem(name: str | None) -> str | None:
    """Why `name` is no scheme (the message `parse_scheme` would raise), or None: for option validation."""
    if name is None:
        return None
    try:
        parse_scheme(name)
    except RotaqError as exc:
        return str(exc)
    return None


def clip_ratio_problem(ratio: float | None) -> str | None:
    return None if ratio is None or 0.0 < ratio <= 1.0 else f"must be in (0, 1], got {ratio}"


def validate_group(group: int | None, width: int, layer_name: str, allow_ragged: bool = False) -> None:
    """Fail early, naming the layer, when a group size does not tile the layer's input width
    (unless a shorter last group is allowed)."""
    if group is None:
        return
    if group <= 0:
        raise RotaqError(f"{layer_name}: group size {group} must be positive")
    if width % group != 0 and not allow_ragged:
        divisors = [g for g in (32, 64, 96, 128, 192, 256) if width % g == 0]
        raise RotaqError(
            f"{layer_name}: group size {group} does not divide input width {width}; pick a divisor "
            f"({', '.join(map(str, divisors)) or 'none of 32-256'}) or pass --ragged-groups to let the last "
            f"group hold the remaining {width % group} columns")


def group_count(width: int, group: int | None) -> int:
    """Groups along a row of ``width``: the last one is shorter when ``group`` does not divide it."""
    return 1 if group is None else -(-width // group)
