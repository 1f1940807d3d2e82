"""GPTQ (Frantar et al., 2022): quantize weight columns one at a time, pushing each column's
rounding error onto the not-yet-quantized columns through the inverse Hessian of the layer input.

Implemented here rather than wrapped from ``gptqmodel``: gptqmodel 7.6.0 does install and run on
CPU with torch 2.13 (and matches this code exactly without clip search), but its per-layer ``GPTQ``
class is internal API (needs an undocumented ``quantizer.configure(perchannel=True)`` call),
importing it prints a banner to stdout and sets process environment variables, and it pulls 54
packages (~630 MB: pyarrow, pandas, datasets, torchao, maturin, sdists needing a C compiler) with
an exact ``numpy==2.2.6`` pin.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rotaq.pipeline.errors import NonFiniteError, RotaqError
from rotaq.quantizers.rtn import (
    QuantizedWeight,
    check_weight,
    compute_qparams,
    dequantize_codes,
    pack_quantized,
    pad_columns,
    quantize_to_codes,
)
from rotaq.quantizers.schemes import group_count


class HessianAccumulator:
    """Running ``H = 2/N Σ x xᵀ`` over calibration inputs of one linear layer.

    The raw sum is accumulated and normalised on read, so adding batches never rescales (and
    re-rounds) what is already there.
    """

    def __init__(self, in_features: int, layer_name: str = "layer", dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        self.layer_name = layer_name
        self.count = 0
        self._sum = torch.zeros(in_features, in_features, dtype=dtype, device=device)

    def add_batch(self, x: Tensor) -> None:
        """Add every row of ``x[..., in]`` (tokens of any batch shape) as one sample."""
        if x.shape[-1] != self._sum.shape[0]:
            raise RotaqError(
                f"{self.layer_name}: calibration input width {x.shape[-1]} does not match {self._sum.shape[0]}"
            )
        rows = x.detach().reshape(-1, x.shape[-1]).to(self._sum.device, self._sum.dtype)
        if not torch.isfinite(rows).all():
            raise NonFiniteError(f"{self.layer_name}: calibration input contains NaN or inf")
        self._sum.addmm_(rows.T, rows)
        self.count += rows.shape[0]

    @property
    def hessian(self) -> Tensor:
        if self.count == 0:
            raise RotaqError(f"{self.layer_name}: no calibration samples were collected for the Hessian")
        return self._sum * (2.0 / self.count)


def _inverse_hessian_factor(hessian: Tensor, damp_percent: float, layer_name: str) -> Tensor:
    """Upper Cholesky factor of ``(H + λI)⁻¹``, in float32 as in the reference GPTQ and gptqmodel
    (float64 would double the cost of the three O(in³) factorisations).

    λ starts at ``damp_percent`` of the mean diagonal and grows tenfold (up to the full mean) when
    the damped Hessian is still not positive definite, e.g. with few calibration samples.
    """
    mean_diag = torch.diagonal(hessian).mean()
    damp = damp_percent
    while True:
        damped = hessian.clone()
        damped.diagonal().add_(damp * mean_diag)
        chol, info = torch.linalg.cholesky_ex(damped)
        if info.item() == 0:
            factor, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if info.item() == 0:
                return factor
        if damp >= 1.0:
            raise RotaqError(
                f"{layer_name}: Hessian is not positive definite even with damp_percent=1.0; "
                "collect more calibration samples"
            )
        damp = min(damp * 10, 1.0)


def gptq_quantize(
    weight: Tensor,
    hessian: Tensor,
    bits: int,
    group_size: int | None = None,
    symmetric: bool = True,
    act_order: bool = True,
    damp_percent: float = 0.01,
    block_size: int = 128,
    clip_search: bool = True,
    layer_name: str = "layer",
    allow_ragged: bool = False,
) -> QuantizedWeight:
    """GPTQ-quantize ``weight[out, in]`` given ``hessian[in, in]`` of its inputs.

    ``act_order`` visits columns by decreasing Hessian diagonal (most salient first). Codes,
    scales and zero points always come back in the original column order.
    """
    check_weight(weight, group_size, layer_name, allow_ragged)
    out_features, in_features = weight.shape
    if hessian.shape != (in_features, in_features):
        raise RotaqError(
            f"{layer_name}: Hessian shape {tuple(hessian.shape)} does not match input width {in_features}"
        )
    if not torch.isfinite(hessian).all():
        raise NonFiniteError(f"{layer_name}: Hessian contains NaN or inf")
    if block_size <= 0:
        raise RotaqError(f"{layer_name}: block_size={block_size} must be positive")
    if not 0.0 < damp_percent <= 1.0:
        raise RotaqError(f"{layer_name}: damp_percent={damp_percent} must be in (0, 1]")

    w = weight.detach().float().clone()
    h = hessian.detach().float().to(w.device).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    group = group_size or in_features
    n_groups = group_count(in_features, group_size)
    # Static groups with act_order: scales from the clip-searched weight in original column order, so no g_idx.
    static_groups = act_order or group_size is None
    if static_groups:
        padded = pad_columns(w, n_groups * group).view(out_features, n_groups, group)
        scales, zeros = compute_qparams(padded, bits, symmetric, clip_search)
    else:
        # Groups are met in order and take their parameters from the error-updated weights (reference
        # GPTQ); whole groups per block, so those parameters see every update before the group's start.
        scales = torch.empty(out_features, n_groups, device=w.device)
        zeros = None if symmetric else torch.empty(out_features, n_groups, device=w.device)
        block_size = max(block_size // group, 1) * group

    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(in_features,
                                                                                             device=w.device)
    hinv = _inverse_hessian_factor(h[perm][:, perm], damp_percent, layer_name)
    group_of = (perm // group).tolist()

    # The loop runs on transposed copies so that each weight column is a contiguous row.
    w_t = w[:, perm].T.contiguous()
    scales_t = scales.T.contiguous()
    zeros_t = None if zeros is None else zeros.T.contiguous()
    codes_t = torch.empty(in_features, out_features, device=w.device)
    for start in range(0, in_features, block_size):
        end = min(start + block_size, in_features)
        block = w_t[start:end].clone()
        err_block = torch.empty_like(block)
        hinv_block = hinv[start:end, start:end]
        for i in range(end - start):
            col = start + i
            g = group_of[col]
            if not static_groups and col % group == 0:
                s, z = compute_qparams(block[i : i + group].T, bits, symmetric, clip_search)
                scales_t[g] = s
                if zeros_t is not None:
                    zeros_t[g] = z
            scale = scales_t[g]
            zero = None if zeros_t is None else zeros_t[g]
            code = quantize_to_codes(block[i], scale, zero, bits, symmetric)
            codes_t[col] = code
            err = (block[i] - dequantize_codes(code, scale, zero)) / hinv_block[i, i]
            block[i:] -= hinv_block[i, i:, None] * err
            err_block[i] = err
        w_t[end:] -= hinv[start:end, end:].T @ err_block

    codes = codes_t[torch.argsort(perm)].T
    scales = scales_t.T
    zeros = None if zeros_t is None else zeros_t.T
    return pack_quantized(codes, scales, zeros, group_size, bits, symmetric)
