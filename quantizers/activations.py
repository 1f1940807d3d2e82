"""Dynamic (runtime) activation quantization, per token or per block of the last dim.

Everything here is written with plain tensor ops (amax, abs, round, clamp, where, division) and no
Python branching on tensor values, so the fake-quant model exports with ``torch.onnx.export``.
Codes follow the weight convention of ``rotaq.quantizers.rtn``: symmetric codes are signed ``int8``,
asymmetric codes and zero points are unsigned ``uint8``; scales are ``float32`` of shape ``[..., 1]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rotaq.pipeline.errors import RotaqError
from rotaq.quantizers.rtn import dequantize_codes, qrange, quantize_to_codes


def _per_token_params(
    x: Tensor, bits: int, symmetric: bool, clip_ratio: float
) -> tuple[Tensor, Tensor | None]:
    """Scale and (float) zero point of each token, computed in float32 from ``x``'s range."""
    qmin, qmax = qrange(bits, symmetric)
    if symmetric:
        scale = x.abs().amax(dim=-1, keepdim=True) * (clip_ratio / qmax)
    else:
        xmin = x.amin(dim=-1, keepdim=True).clamp(max=0) * clip_ratio
        xmax = x.amax(dim=-1, keepdim=True).clamp(min=0) * clip_ratio
        scale = (xmax - xmin) / (qmax - qmin)
    # An all-zero token has range 0: scale 1 quantizes it to exact zeros instead of dividing by 0.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = None if symmetric else torch.round(-xmin / scale).clamp(qmin, qmax)
    return scale, zero


def _check_clip(clip_ratio: float) -> None:
    if not 0.0 < clip_ratio <= 1.0:
        raise RotaqError(f"activation clip_ratio={clip_ratio} must be in (0, 1]")


def fake_quantize_per_token(x: Tensor, bits: int, symmetric: bool = True, clip_ratio: float = 1.0) -> Tensor:
    """Quantize-dequantize each token (last dim) with its own dynamic scale.

    The straight-through estimator ``x + (q - x).detach()`` lets gradients through as identity, so
    fine-tuning sees the quantization error in the forward pass but still trains every weight.
    ``bits >= 16`` means no activation quantization and returns ``x`` itself.
    """
    if bits >= 16:
        return x
    _check_clip(clip_ratio)
    xf = x.float()
    scale, zero = _per_token_params(xf, bits, symmetric, clip_ratio)
    q = dequantize_codes(quantize_to_codes(xf, scale, zero, bits, symmetric), scale, zero).to(x.dtype)
    return x + (q - x).detach()


def quantize_per_token(
    x: Tensor, bits: int, symmetric: bool = True, clip_ratio: float = 1.0
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Integer codes ``[..., d]``, scales ``[..., 1]`` and zero points ``[..., 1]`` (or ``None``).

    ``(codes - zero_points) * scales`` equals ``fake_quantize_per_token`` on the same input.
    """
    _check_clip(clip_ratio)
    xf = x.detach().float()
    scale, zero = _per_token_params(xf, bits, symmetric, clip_ratio)
    codes = quantize_to_codes(xf, scale, zero, bits, symmetric)
    code_dtype = torch.int8 if symmetric else torch.uint8
    return codes.to(code_dtype), scale, None if zero is None else zero.to(torch.uint8)


def fake_quantize_activations(
    x: Tensor, bits: int, symmetric: bool = True, clip_ratio: float = 1.0, block_size: int | None = None
) -> Tensor:
    """Per-token fake quantization, or per block of ``block_size`` along the last dim when given."""
    if block_size:
        return fake_quantize_per_block(x, bits, block_size, symmetric, clip_ratio)
    return fake_quantize_per_token(x, bits, symmetric, clip_ratio)


def fake_quantize_per_block(
    x: Tensor, bits: int, block_size: int, symmetric: bool = True, clip_ratio: float = 1.0
) -> Tensor:
    """Like ``fake_quantize_per_token`` but with one scale per contiguous block of the last dim.

    Mirrors runtimes that quantize activations blockwise along K (ONNX Runtime's MatMulNBits with
    ``accuracy_level=4`` uses int8 blocks), so the fake-quant model sees the error they introduce.
    """
    if bits >= 16:
        return x
    width = x.shape[-1]
    if block_size <= 0:
        raise RotaqError(f"activation block_size={block_size} must be positive")
    _check_clip(clip_ratio)
    # A last partial block is its own (shorter) block, as in MLAS, which pads K with zeros.
    n_blocks = -(-width // block_size)
    blocks = torch.nn.functional.pad(x.float(), (0, n_blocks * block_size - width)).unflatten(-1, (n_blocks, block_size))
    qmin, qmax = qrange(bits, symmetric)
    if symmetric:
        # MLAS's arithmetic, operation for operation (QuantizeARow_CompInt8): scale = amax / 127 and
        # codes = round_half_even(x * (127 / amax)). Dividing x by the scale, or torch's `127 / t`
        # (a reciprocal times 127), round differently at ties, which are frequent on inputs that are
        # themselves dequantized codes (the first layer's embeddings).
        amax = blocks.abs().amax(dim=-1, keepdim=True) * clip_ratio
        scale = amax / qmax
        inverse = torch.where(amax > 0, torch.full_like(amax, float(qmax)) / amax, torch.zeros_like(amax))
        q = torch.round(blocks * inverse).clamp(qmin, qmax) * scale
    else:
        scale, zero = _per_token_params(blocks, bits, symmetric, clip_ratio)
        q = dequantize_codes(quantize_to_codes(blocks, scale, zero, bits, symmetric), scale, zero)
    q = q.flatten(-2)[..., :width].to(x.dtype)
    return x + (q - x).detach()
