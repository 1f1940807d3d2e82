"""The cross-layer state of one projection type: its adapters in every layer and, during a forward
pass, the adapter inputs each layer has seen so far.

ResLoRA's shortcuts make layer n read x_{n-k}, the input of the same projection in an earlier layer of
the same forward pass. Keeping those inputs in one explicit object per projection type, cleared when
the model's forward starts, makes that dependency visible and testable instead of hidden in module
attributes.

Gradient checkpointing: the stored inputs are the tensors of the original forward, with their
autograd history. Non-reentrant checkpointing recomputes layer n from its saved inputs and reads
x_{n-k} from this object again (layers are recomputed last-to-first, so the entry is still the
original one), and gradients reach layer n-k through the original graph: the result is exact. The
reentrant variant runs every layer under no_grad, which would silently cut the shortcut's gradient,
so it is refused (see `refuse_reentrant_checkpointing`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from rotaq.adapters.config import AdapterConfig
from rotaq.pipeline.errors import RotaqError

if TYPE_CHECKING:
    from rotaq.adapters.layers import LowRankAdapter


class ProjectionChain:
    """One projection type (e.g. 'self_attn.q_proj') across all decoder layers."""

    def __init__(self, projection: str, config: AdapterConfig) -> None:
        self.projection = projection
        self.config = config
        self.adapters: list[LowRankAdapter] = []  # index = decoder layer
        self.track_input_norms = False
        self._inputs: dict[int, Tensor] = {}
        self._input_norms: dict[int, Tensor] = {}

    def clear(self) -> None:
        self._inputs.clear()
        self._input_norms.clear()

    def record_input(self, layer: int, adapter_input: Tensor, matmul_input: Tensor) -> None:
        """Remember layer `layer`'s adapter input for later layers (shortcut types only).

        Keyed by layer, so the recomputation of a checkpointed layer overwrites its own entry with an
        identical tensor instead of appending a second one.
        """
        if self.config.has_shortcuts:
            self._inputs[layer] = adapter_input
        if self.track_input_norms:
            self._input_norms[layer] = matmul_input.detach().float().norm(dim=-1).mean()

    def earlier_input(self, layer: int, k: int) -> Tensor:
        source = layer - k
        if source not in self._inputs:
            raise RotaqError(f"{self.projection} in layer {layer} needs the input of layer {source} from the same "
                             "forward pass; run the whole model, not single layers")
        return self._inputs[source]

    def shortcut_projection(self, layer: int) -> Tensor | None:
        """Σ_(k,j) A_j·x_{n-k}: the rank-r shortcut that B_n maps out (None for lora and bs)."""
        terms = [self.adapters[source].down(self.earlier_input(layer, k))
                 for k, source in self.config.shortcut_sources(layer)]
        return torch.stack(terms).sum(0) if terms else None

    def mergeable_delta(self, layer: int) -> Tensor:
        """Σ_j B_j·A_j over `summed_layers`: the part of the update that depends on x_n alone (unscaled)."""
        return torch.stack([self.adapters[j].delta_weight() for j in self.config.summed_layers(layer)]).sum(0)

    def current_inputs(self) -> dict[int, Tensor]:
        """Every layer's adapter input from the last forward pass (shortcut types only)."""
        return dict(self._inputs)

    def current_input_norms(self) -> dict[int, float]:
        """Mean per-token ‖x_n‖ of every layer in the last forward pass, when tracking is on."""
        return {layer: float(norm) for layer, norm in self._input_norms.items()}


def refuse_reentrant_checkpointing(decoder_layers: nn.ModuleList) -> None:
    """Reentrant checkpointing computes layers under no_grad: the shortcut x_{n-k} would carry no gradient."""
    for layer in decoder_layers:
        if not getattr(layer, "gradient_checkpointing", False):
            continue
        checkpoint_function = getattr(layer, "_gradient_checkpointing_func", None)
        if getattr(checkpoint_function, "keywords", {}).get("use_reentrant") is not False:
            raise RotaqError("reslora-is/ms need non-reentrant gradient checkpointing (use_reentrant=False): "
                             "reentrant checkpointing would cut the gradient of the cross-layer shortcut")
