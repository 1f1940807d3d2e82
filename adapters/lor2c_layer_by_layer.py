"""LoR2C side paths for layer-at-a-time execution (GPTQ calibration), where the forward hooks cannot run them.

GPTQ feeds the decoder layers one at a time over many batches, so the hooks would see layer i for every batch
before layer j for any; this runner keeps the input batches of every path's first layer instead, and adds each
path's product to the output batches of its last layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass
class LayerByLayer:
    """The side paths for layer-at-a-time execution: keep the input batches of every path's first layer,
    add each path's product to the output batches of its last layer."""

    paths: list[nn.Module]  # ResidualPath: first, last, and forward(hidden_in)
    kept: dict[int, list[Tensor]] = field(default_factory=dict)

    def before_layer(self, index: int, hidden_states: list[Tensor]) -> None:
        if any(path.first == index for path in self.paths):
            self.kept[index] = list(hidden_states)

    @torch.no_grad()
    def after_layer(self, index: int, outputs: list[Tensor]) -> list[Tensor]:
        ending = [path for path in self.paths if path.last == index]
        for path in ending:
            outputs = [output + path(kept) for output, kept in zip(outputs, self.kept[path.first])]
        for first in [first for first in self.kept if all(path.last <= index for path in self.paths
                                                           if path.first == first)]:
            del self.kept[first]  # no path still needs this layer's inputs
        return outputs
