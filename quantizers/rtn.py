"""Round-to-nearest weight quantization and the integer format every weight quantizer returns.

Code layout (shared by RTN and GPTQ, and what the ONNX export reads):

* symmetric: ``codes`` is ``int8`` holding signed values in ``[-2^(b-1), 2^(b-1)-1]``,
  ``zero_points`` is ``None`` and ``w ≈ codes * scale``;
* asymmetric: ``codes`` is ``uint8`` holding unsigned values in ``[0, 2^b-1]``, ``zero_points``
  is ``uint8`` in the same range and ``w ≈ (codes - zero_point) * scale`` (ONNX
  DequantizeLinear / MatMulNBits convention);
* ``codes`` is ``[out, in]`` in the layer's original column order; ``scales`` (``float32``) and
  ``zero_points`` are ``[out, n_groups]``, group ``g`` covering columns ``[g*G, min((g+1)*G, in))``
  (a ragged last group is shorter, as MatMulNBits pads K up to whole blocks);
  per-channel quantization is the special case of one group spanning the whole row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rotaq.pipeline.errors import NonFiniteError, RotaqError
from rotaq.quantizers.schemes import group_count, validate_group

# Clip ratios tried by the clipping search (1.0 first, so ties keep the unclipped range).
CLIP_RATIOS: tuple[float, ...] = tuple(torch.linspace(1.0, 0.5, 21).tolist())


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer code range: signed for symmetric, unsigned for asymmetric."""
    if not 2 <= bits <= 8:
        raise RotaqError(f"bits={bits} is not supported by integer quantization; use 2 to 8")
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _params_for_range(
    absmax: Tensor, xmin: Tensor, xmax: Tensor, ratio: float, bits: int, symmetric: bool
) -> tuple[Tensor, Tensor | None]:
    """Scale (and zero point) for a range shrunk by ``ratio``; a zero range gets scale 1 so codes are 0."""
    qmin, qmax = qrange(bits, symmetric)
    scale = absmax * ratio / qmax if symmetric else (xmax - xmin) * ratio / (qmax - qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = None if symmetric else torch.round(-xmin * ratio / scale).clamp(qmin, qmax)
    return scale, zero


def quantize_to_codes(w: Tensor, scale: Tensor, zero: Tensor | None, bits: int, symmetric: bool) -> Tensor:
    """Integer-valued float codes of ``w`` for broadcastable ``scale``/``zero``."""
    qmin, qmax = qrange(bits, symmetric)
    codes = torch.round(w / scale)
    if zero is not None:
        codes = codes + zero
    return codes.clamp(qmin, qmax)


def dequantize_codes(codes: Tensor, scale: Tensor, zero: Tensor | None) -> Tensor:
    """``(codes - zero) * scale``: the single dequantization formula, so every path agrees bit-for-bit."""
    if zero is not None:
        codes = codes - zero
    return codes * scale


# Rows per clip-search pass are sized so the temporaries stay cache-resident (about 3x faster
# than one pass over a large weight, which is memory-bound).
_CHUNK_ELEMENTS = 1 << 17
# Rows per rounding / dequantization pass: the float temporaries of a vocabulary-sized matrix (a 152k x 1536
# embedding is 0.93 GB in float32, and rounding it whole held three such copies) stay at 64 MiB.
_ROUNDING_CHUNK_ELEMENTS = 1 << 24


def row_chunks(rows: int, width: int, elements: int = _ROUNDING_CHUNK_ELEMENTS) -> list[slice]:
    """Row slices of about `elements` elements each, covering `rows` rows of `width` columns."""
    step = max(1, elements // max(1, width))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def compute_qparams(
    w: Tensor, bits: int, symmetric: bool, clip_search: bool
) -> tuple[Tensor, Tensor | None]:
    """Per-row scales (and zero points, as floats) over the last dim of ``w``.

    With ``clip_search`` each row keeps the clip ratio from ``CLIP_RATIOS`` that minimises its
    squared reconstruction error (the ``mse`` option of GPTQ/QuaRot): outliers are clipped when
    that buys finer steps for everything else.
    """
    rows = w.float().reshape(-1, w.shape[-1])
    step = max(1, _CHUNK_ELEMENTS // rows.shape[1])
    parts = [_row_qparams(chunk, bits, symmetric, clip_search) for chunk in rows.split(step)]
    scale = torch.cat([s for s, _ in parts]).reshape(w.shape[:-1])
    zero = None if symmetric else torch.cat([z for _, z in parts]).reshape(w.shape[:-1])
    return scale, zero


def _row_qparams(w: Tensor, bits: int, symmetric: bool, clip_search: bool) -> tuple[Tensor, Tensor | None]:
    """``compute_qparams`` for a float32 ``[rows, n]`` chunk: the ratio loop, vectorised over rows."""
    absmax = w.abs().amax(dim=-1)
    xmin = w.amin(dim=-1).clamp(max=0)
    xmax = w.amax(dim=-1).clamp(min=0)
    best_scale, best_zero = _params_for_range(absmax, xmin, xmax, 1.0, bits, symmetric)
    if not clip_search:
        return best_scale, best_zero

    def error(scale: Tensor, zero: Tensor | None) -> Tensor:
        s, z = scale.unsqueeze(-1), None if zero is None else zero.unsqueeze(-1)
        deq = dequantize_codes(quantize_to_codes(w, s, z, bits, symmetric), s, z)
        return (deq - w).square().sum(dim=-1)

    best_err = error(best_scale, best_zero)
    for ratio in CLIP_RATIOS[1:]:
        scale, zero = _params_for_range(absmax, xmin, xmax, ratio, bits, symmetric)
        err = error(scale, zero)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        if zero is not None:
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


@dataclass(frozen=True)
class QuantizedWeight:
    """Integer weight codes plus per-group scales; see the module docstring for the layout."""

    codes: Tensor
    scales: Tensor
    zero_points: Tensor | None
    group_size: int | None
    bits: int
    symmetric: bool

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def n_groups(self) -> int:
        return self.scales.shape[1]

    @property
    def effective_group_size(self) -> int:
        """Columns per scale: ``group_size``, or the row width for per-channel quantization."""
        return self.group_size if self.n_groups > 1 else self.codes.shape[1]

    @property
    def ragged(self) -> bool:
        """Whether the last group is shorter than the others."""
        return self.n_groups * self.effective_group_size != self.codes.shape[1]

    def dequantize(self, out: Tensor | None = None) -> Tensor:
        """The float32 ``[out, in]`` weight these codes stand for, written into ``out`` when given (the
        layer's own float32 weight: no second copy of a vocabulary-sized matrix). Rows are dequantized a
        chunk at a time; the arithmetic is elementwise, so the floats are those of one whole pass."""
        out_features, in_features = self.codes.shape
        if out is None:
            out = torch.empty(out_features, in_features, device=self.codes.device)  # own storage: safetensors saves it
        elif out.shape != self.codes.shape or out.dtype != torch.float32 or not out.is_contiguous():
            raise RotaqError(f"cannot dequantize {tuple(self.codes.shape)} codes into a {out.dtype} "
                             f"{tuple(out.shape)} tensor")
        width = self.n_groups * self.effective_group_size
        for rows in row_chunks(out_features, width):
            codes = pad_columns(self.codes[rows].float(), width).view(-1, self.n_groups, self.effective_group_size)
            zero = None if self.zero_points is None else self.zero_points[rows].float().unsqueeze(-1)
            deq = dequantize_codes(codes, self.scales[rows].unsqueeze(-1), zero)
            out[rows] = deq.reshape(codes.shape[0], -1)[:, :in_features]
        return out


def pad_columns(w: Tensor, width: int) -> Tensor:
    """``w`` with zero columns appended up to ``width``. A zero column quantizes to an exact zero
    under every grid here, so padding a ragged group changes neither its range nor its clip search."""
    return w if w.shape[-1] == width else torch.nn.functional.pad(w, (0, width - w.shape[-1]))


def pack_quantized(
    codes: Tensor, scales: Tensor, zero: Tensor | None, group_size: int | None, bits: int, symmetric: bool
) -> QuantizedWeight:
    """Cast integer-valued float codes/zeros to the storage dtypes of ``QuantizedWeight``."""
    code_dtype = torch.int8 if symmetric else torch.uint8
    return QuantizedWeight(
        codes=codes.to(code_dtype).contiguous(),
        scales=scales.float().contiguous(),
        zero_points=None if zero is None else zero.to(torch.uint8).contiguous(),
        group_size=group_size,
        bits=bits,
        symmetric=symmetric,
    )


def check_weight(weight: Tensor, group_size: int | None, layer_name: str, allow_ragged: bool = False) -> None:
    """Shape, group and finiteness checks shared by every weight quantizer."""
    if weight.dim() != 2:
        raise RotaqError(f"{layer_name}: expected a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    validate_group(group_size, weight.shape[1], layer_name, allow_ragged)
    if not torch.isfinite(weight).all():
        raise NonFiniteError(f"{layer_name}: weight contains NaN or inf")


def quantize_weight_rtn(
    weight: Tensor,
    bits: int,
    group_size: int | None = None,
    symmetric: bool = True,
    clip_search: bool = True,
    layer_name: str = "weight",
    allow_ragged: bool = False,
) -> QuantizedWeight:
    """Round each weight to the nearest code of its row's (or group's) grid."""
    check_weight(weight, group_size, layer_name, allow_ragged)
    out_features, in_features = weight.shape
    n_groups = group_count(in_features, group_size)
    group = group_size or in_features
    w = pad_columns(weight.float(), n_groups * group).reshape(out_features, n_groups, group)
    scale, zero = compute_qparams(w, bits, symmetric, clip_search)
    codes = torch.empty(out_features, in_features, dtype=torch.int8 if symmetric else torch.uint8, device=w.device)
    for rows in row_chunks(out_features, n_groups * group):
        chunk = quantize_to_codes(w[rows], scale[rows].unsqueeze(-1),
                                  None if zero is None else zero[rows].unsqueeze(-1), bits, symmetric)
        codes[rows] = chunk.reshape(chunk.shape[0], -1)[:, :in_features]
    return pack_quantized(codes, scale, zero, group_size, bits, symmetric)


def fake_quantize_weight(
    weight: Tensor,
    bits: int,
    group_size: int | None = None,
    symmetric: bool = True,
    clip_search: bool = True,
    layer_name: str = "weight",
    allow_ragged: bool = False,
) -> Tensor:
    """RTN quantize-dequantize, returned in the weight's dtype (for evaluating a scheme in float)."""
    qw = quantize_weight_rtn(weight, bits, group_size, symmetric, clip_search, layer_name, allow_ragged)
    return qw.dequantize().to(weight.dtype)
