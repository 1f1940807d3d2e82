"""Merged weights: fold the adapters (and, approximately, the ResLoRA shortcuts) into plain weights.

For layer n (s = alpha/r, sources(n) = the (k, j) pairs of AdapterConfig.shortcut_sources):

    W_n' = W_n + s·(Σ_j B_j A_j + B_n Σ_(k,j) Y_{n,k})

where Y_{n,k} stands in for A_j·x_{n-k} as a linear function of x_n:
- lora, bs: no shortcut, the merge is exact;
- paper:    x_{n-k} ≈ α_{n,k}·x_n with α the ratio of mean input norms seen in training: Y = α·A_j;
- lstsq:    x_{n-k} ≈ M·x_n with M minimising E‖x_{n-k} − M x_n‖² on calibration inputs (ridge λ):
            Y = A_j·M = P (G + λI)⁻¹, with G = Σ x_n x_nᵀ (d × d) and P = Σ (A_j x_{n-k}) x_nᵀ (r × d).
            Only G is d × d; P is rank-sized because M is only ever used through A_j. The sums are
            accumulated in float32 (a d × d GEMM per layer and batch is the cost of this merge) and
            solved in float64.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from rotaq.adapters.layers import AdaptedLinear
from rotaq.adapters.structure import InstalledAdapters
from rotaq.pipeline.errors import NonFiniteError, RotaqError

ShortcutMaps = dict[str, list[Tensor]]
"""Model path of an adapted linear → its Y_{n,k} (rank × in, float64), in shortcut_sources(n) order."""


def merged_weight(linear: AdaptedLinear, shortcut_maps: list[Tensor]) -> Tensor:
    """W_n + s·(Σ_j B_j A_j + B_n Σ_k Y_{n,k}), computed in float64 and returned in W's dtype."""
    chain, layer = linear.chain, linear.layer_index
    delta = chain.mergeable_delta(layer).detach().double()
    if shortcut_maps:
        delta = delta + linear.adapter.lora_B.detach().double() @ torch.stack(shortcut_maps).sum(0)
    return (linear.weight.detach().double() + linear.scaling * delta).to(linear.weight.dtype)


def merged_weights(installed: InstalledAdapters, shortcut_maps: ShortcutMaps) -> dict[str, Tensor]:
    """Every adapted linear's merged weight, checked finite before any module is touched (PEFT's safe_merge)."""
    weights = {path: merged_weight(linear, shortcut_maps.get(path, [])) for path, linear in installed.adapted_linears()}
    for path, weight in weights.items():
        if not torch.isfinite(weight).all():
            raise NonFiniteError(f"merging the adapter of {path} gives NaN or inf; the model was not changed")
    return weights


def paper_shortcut_maps(installed: InstalledAdapters, ratios: dict[str, list[list[float]]]) -> ShortcutMaps:
    """Y_{n,k} = α_{n,k}·A_j, with α from the training statistics in the manifest."""
    config = installed.config
    maps: ShortcutMaps = {}
    for path, linear in installed.adapted_linears():
        projection, layer = linear.chain.projection, linear.layer_index
        sources = config.shortcut_sources(layer)
        layer_ratios = ratios[projection][layer]
        if len(layer_ratios) != len(sources):
            raise RotaqError(f"{path}: the manifest has {len(layer_ratios)} input-norm ratios, expected {len(sources)}")
        maps[path] = [alpha * installed.chains[projection].adapters[source].lora_A.detach().double()
                      for alpha, (_, source) in zip(layer_ratios, sources)]
    return maps


class ShortcutRegression:
    """Running float32 sums G_n and P_{n,k} for the adapted linears of some layers (see module docstring)."""

    def __init__(self, installed: InstalledAdapters, layers: list[int]) -> None:
        self.installed = installed
        self.layers = layers
        self.gram: dict[tuple[str, int], Tensor] = {}
        self.cross: dict[tuple[str, int], list[Tensor]] = {}

    def add_forward_pass(self) -> None:
        """Accumulate the inputs the chains hold after one forward pass of the whole model."""
        config = self.installed.config
        for projection, chain in self.installed.chains.items():
            inputs = {layer: rows.reshape(-1, rows.shape[-1]).float() for layer, rows in chain.current_inputs().items()}
            for layer in self.layers:
                x_n = inputs[layer]
                key = (projection, layer)
                self.gram[key] = self.gram.get(key, 0) + x_n.T @ x_n
                sums = self.cross.setdefault(key, [0] * len(config.shortcut_sources(layer)))
                for index, (k, source) in enumerate(config.shortcut_sources(layer)):
                    projected = inputs[layer - k] @ chain.adapters[source].lora_A.detach().float().T
                    sums[index] = sums[index] + projected.T @ x_n

    def shortcut_maps(self, ridge: float) -> ShortcutMaps:
        """Y = P (G + λI)⁻¹ per shortcut, λ = ridge · mean diagonal of G, solved with a Cholesky factor."""
        maps: ShortcutMaps = {}
        for (projection, layer), gram_sum in self.gram.items():
            gram = gram_sum.double()
            damping = ridge * torch.diagonal(gram).mean().clamp_min(1e-12)
            identity = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
            factor, info = torch.linalg.cholesky_ex(gram + damping * identity)
            if info.item() != 0:
                raise RotaqError(f"{projection} layer {layer}: input covariance is not positive definite; "
                                 "raise the ridge or use more calibration tokens")
            path = f"{self.installed.family.layers}.{layer}.{projection}"
            maps[path] = [torch.cholesky_solve(cross.double().T, factor).T for cross in self.cross[(projection, layer)]]
        return maps


def layer_groups(installed: InstalledAdapters, budget_bytes: int) -> Iterator[list[int]]:
    """Consecutive layers whose float32 d × d sums fit in `budget_bytes` together (at least one layer each)."""
    per_layer = sum(4 * chain.adapters[0].lora_A.shape[1] ** 2 for chain in installed.chains.values())
    size = max(1, budget_bytes // max(per_layer, 1))
    layer_count = len(installed.decoder_layers)
    for start in range(0, layer_count, size):
        yield list(range(start, min(start + size, layer_count)))


@torch.inference_mode()
def lstsq_shortcut_maps(model: nn.Module, installed: InstalledAdapters, windows: Tensor, batch_size: int,
                        ridges: tuple[float, ...], budget_bytes: int) -> dict[float, ShortcutMaps]:
    """Least-squares Y_{n,k} for each ridge, from one pass over the calibration windows per group of layers."""
    device = next(model.parameters()).device
    maps: dict[float, ShortcutMaps] = {ridge: {} for ridge in ridges}
    for layers in layer_groups(installed, budget_bytes):
        regression = ShortcutRegression(installed, layers)
        for start in range(0, windows.shape[0], batch_size):
            model(input_ids=windows[start:start + batch_size].to(device), use_cache=False)
            regression.add_forward_pass()
        for ridge in ridges:
            maps[ridge].update(regression.shortcut_maps(ridge))
    for chain in installed.chains.values():
        chain.clear()
    return maps
