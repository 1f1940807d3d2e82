"""Activation-outlier statistics at the inputs of linear layers.

Rotation exists to flatten activation outliers before quantization; these statistics show whether it
did, layer by layer. Per token x (one row of a linear layer's input) we measure

- peak-to-RMS ratio  max_i |x_i| / sqrt(mean_i x_i^2): 1 for a flat vector, sqrt(d) for a one-hot one;
- Pearson kurtosis   E[(x - mu)^4] / sigma^4 over the entries of x: 3 for Gaussian entries, large when
  a few channels dominate.

Everything is accumulated on the fly, so no activation is kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from rotaq.eval._windows import as_windows, check_token_ids, eval_mode, input_vocab_size, iter_batches, model_device
from rotaq.pipeline.errors import DataError, RotaqError
from rotaq.rotations.online import matmul_input_of

ModuleFilter = Callable[[str, nn.Module], bool]

_STAT_KEYS = ("max_abs_over_rms", "mean_max_abs_over_rms", "kurtosis", "max_abs")


@dataclass
class LinearInputStats:
    """Outlier statistics of the tensor that reaches one linear layer's matmul; NaN if never called."""

    name: str
    in_features: int
    max_abs_over_rms: float  # max over tokens of the per-token peak-to-RMS ratio
    mean_max_abs_over_rms: float  # mean over tokens of the same ratio
    kurtosis: float  # mean over tokens of the per-token Pearson kurtosis
    max_abs: float  # max |x| over every entry seen
    tokens: int  # tokens (rows) measured

    def to_dict(self) -> dict[str, str | int | float]:
        """Plain dict for JSON reports and tables."""
        return asdict(self)


def collect_linear_input_stats(
    model: nn.Module,
    windows: torch.Tensor | np.ndarray,
    module_filter: ModuleFilter | None = None,
    progress: bool = True,
    batch_size: int = 4,
) -> list[LinearInputStats]:
    """Run the windows through the model and measure the input of every nn.Linear, in model order.

    `module_filter(name, module)` narrows the layers (default: every nn.Linear, lm_head included).

    For a layer with an online rotation before its matmul (a `RotatedInputLinear`), the statistics are
    taken on `matmul_input_of(module, x)`, the tensor its matmul consumes, rather than on the raw input,
    because that is the tensor a quantizer sees.
    """
    windows = as_windows(windows)
    check_token_ids(windows, input_vocab_size(model))
    layers = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and (module_filter is None or module_filter(name, module))
    ]
    if not layers:
        raise RotaqError("no nn.Linear layers to measure (none in the model, or none passed the filter)")
    accumulators = {name: _Accumulator() for name, _ in layers}
    handles = []
    try:
        for name, module in layers:
            handles.append(module.register_forward_pre_hook(_make_hook(accumulators[name]), with_kwargs=True))
        device = model_device(model)
        with eval_mode(model), torch.inference_mode():
            for batch in iter_batches(windows, batch_size, progress, "outliers"):
                model(input_ids=batch.to(device))
    finally:
        for handle in handles:
            handle.remove()
    return [accumulators[name].stats(name, module.in_features) for name, module in layers]


def outlier_table(before: list[LinearInputStats], after: list[LinearInputStats] | None = None) -> list[dict]:
    """One row per layer name (outer join, `before` order first), ready for `write_table`.

    Without `after` the columns are the plain statistics; with it each statistic gets `_before` and
    `_after` columns, None where a layer exists on one side only.
    """
    if after is None:
        return [_row(stats) for stats in before]
    before_by_name = {stats.name: stats for stats in before}
    after_by_name = {stats.name: stats for stats in after}
    names = list(before_by_name) + [name for name in after_by_name if name not in before_by_name]
    rows = []
    for name in names:
        old, new = before_by_name.get(name), after_by_name.get(name)
        row = {"layer": name, "in_features": (old or new).in_features}
        for key in _STAT_KEYS:
            row[f"{key}_before"] = getattr(old, key) if old else None
            row[f"{key}_after"] = getattr(new, key) if new else None
        rows.append(row)
    return rows


def summarize(stats: list[LinearInputStats]) -> dict[str, float | int | str]:
    """Headline numbers over all measured layers: the worst layers and the typical one."""
    measured = [s for s in stats if s.tokens > 0]
    if not measured:
        raise DataError("no linear layer saw any tokens; nothing to summarize")
    worst_peak = max(measured, key=lambda s: s.max_abs_over_rms)
    worst_kurtosis = max(measured, key=lambda s: _nan_low(s.kurtosis))
    worst_abs = max(measured, key=lambda s: s.max_abs)
    kurtoses = [s.kurtosis for s in measured if math.isfinite(s.kurtosis)]
    return {
        "layers": len(measured),
        "max_abs_over_rms": worst_peak.max_abs_over_rms,
        "max_abs_over_rms_layer": worst_peak.name,
        "mean_max_abs_over_rms": float(np.mean([s.max_abs_over_rms for s in measured])),
        "max_kurtosis": worst_kurtosis.kurtosis,
        "max_kurtosis_layer": worst_kurtosis.name,
        "mean_kurtosis": float(np.mean(kurtoses)) if kurtoses else math.nan,
        "max_abs": worst_abs.max_abs,
        "max_abs_layer": worst_abs.name,
    }


class _Accumulator:
    """Running sums for one layer. Tokens that are all zero (no RMS) or constant (no spread) are
    left out of the ratio or the kurtosis respectively, since those are undefined for them."""

    def __init__(self) -> None:
        self.tokens = 0
        self.peak_sum = 0.0
        self.peak_max = -math.inf
        self.kurtosis_tokens = 0
        self.kurtosis_sum = 0.0
        self.max_abs = -math.inf

    def add(self, x: torch.Tensor) -> None:
        """Fold in a batch of activations [..., features], one row per token."""
        rows = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        if rows.shape[0] == 0:
            return
        abs_max = rows.abs().amax(-1)
        rms = rows.square().mean(-1).sqrt()
        self.max_abs = max(self.max_abs, float(abs_max.max()))
        peak = abs_max[rms > 0] / rms[rms > 0]
        if peak.numel():
            self.peak_sum += float(peak.sum())
            self.peak_max = max(self.peak_max, float(peak.max()))
            self.tokens += peak.numel()
        centred = rows - rows.mean(-1, keepdim=True)
        variance = centred.square().mean(-1)
        spread = variance > 0
        kurtosis = centred[spread].pow(4).mean(-1) / variance[spread].square()
        self.kurtosis_sum += float(kurtosis.sum())
        self.kurtosis_tokens += kurtosis.numel()

    def stats(self, name: str, in_features: int) -> LinearInputStats:
        """Means and maxima so far; NaN where no token qualified."""
        return LinearInputStats(
            name=name,
            in_features=in_features,
            max_abs_over_rms=self.peak_max if self.tokens else math.nan,
            mean_max_abs_over_rms=self.peak_sum / self.tokens if self.tokens else math.nan,
            kurtosis=self.kurtosis_sum / self.kurtosis_tokens if self.kurtosis_tokens else math.nan,
            max_abs=self.max_abs if self.max_abs > -math.inf else math.nan,
            tokens=self.tokens,
        )


def _make_hook(accumulator: _Accumulator) -> Callable:
    """A forward pre-hook that measures what the module's matmul will consume (see module docstring)."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else next(iter(kwargs.values()))
        accumulator.add(matmul_input_of(module, x))

    return hook


def _row(stats: LinearInputStats) -> dict:
    """Table row of one layer's statistics."""
    return {"layer": stats.name, "in_features": stats.in_features} | {key: getattr(stats, key) for key in _STAT_KEYS}


def _nan_low(value: float) -> float:
    """Sort key that never picks NaN as the maximum."""
    return value if math.isfinite(value) else -math.inf
