"""The adapted linear layer: a frozen base linear (plain or online-rotated) plus a low-rank adapter.

Following PEFT's LoraLayer, the adapter's state lives apart from the base weight, which is never
modified here; `mergeable_delta_weight` is what a merge adds, and merging is a separate, checked
step (adapters/merge.py). Parameter names of the base (`weight`, `bias`) are kept, so a finetune
folder's model.safetensors holds the parent's tensors under the parent's names.

For layer n with frozen W_n, adapter input u_n (the matmul input x_n, after dropout) and s = alpha/r:

    h_n = W_n x_n + s·(Σ_{j ∈ summed(n)} B_j A_j u_n + B_n Σ_{(k,j) ∈ sources(n)} A_j u_{n-k})

(see AdapterConfig.summed_layers / shortcut_sources). Under QAT the first two terms become one
fake-quantized matmul, Q_w(W_n + s·Σ B_j A_j)·Q_a(x_n); the shortcut term stays in float.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from rotaq.adapters.chain import ProjectionChain
from rotaq.adapters.qat import FakeQuantizers
from rotaq.rotations.online import OnlineRotatedLinear, OnlineRotation, RotatedInputLinear, adopt_linear_parameters


class LowRankAdapter(nn.Module):
    """A (rank × in) and B (out × rank); B starts at zero so the adapted model starts as the base."""

    def __init__(self, in_features: int, out_features: int, rank: int, dropout: float,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.zeros(rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """Kaiming-uniform A (as nn.Linear and PEFT do), zero B."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)
        self.lora_B.zero_()

    def down(self, inputs: Tensor) -> Tensor:
        return F.linear(inputs, self.lora_A)

    def up(self, low_rank: Tensor) -> Tensor:
        return F.linear(low_rank, self.lora_B)

    def delta_weight(self) -> Tensor:
        """B·A, shape (out × in), unscaled."""
        return self.lora_B @ self.lora_A


class AdaptedLinear(RotatedInputLinear):
    """Frozen W (and bias, and online rotation when the base had one) plus the adapter of one layer.

    `AdaptedLinear.wrap(linear, adapter, chain, layer_index)` takes over `linear`'s parameters and online
    rotation (no copy); `matmul_input` is x_n, the tensor the base weight multiplies.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, adapter: LowRankAdapter,
                 chain: ProjectionChain, layer_index: int, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, input_rotation: OnlineRotation | None = None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype, input_rotation=input_rotation)
        self.adapter = adapter
        self.chain = chain
        self.layer_index = layer_index
        self.scaling = chain.config.scaling
        self.fake_quantizers: FakeQuantizers | None = None

    def base_layer(self, weight: Tensor) -> nn.Linear:
        """The base module kind again (nn.Linear or OnlineRotatedLinear), carrying `weight` (e.g. a merged W')."""
        linear = adopt_linear_parameters(
            nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta"), self)
        linear.weight = nn.Parameter(weight)
        return linear if self.input_rotation is None else OnlineRotatedLinear.wrap(linear, self.input_rotation)

    def mergeable_delta_weight(self) -> Tensor:
        """s·Σ_j B_j A_j: exact merge for lora and bs, the x_n-only part for is and ms."""
        return self.scaling * self.chain.mergeable_delta(self.layer_index)

    def forward(self, hidden_states: Tensor) -> Tensor:
        matmul_input = self.matmul_input(hidden_states)
        adapter_input = self.adapter.dropout(matmul_input)
        self.chain.record_input(self.layer_index, adapter_input, matmul_input)
        shortcut = self.chain.shortcut_projection(self.layer_index)
        if self.fake_quantizers is not None:
            return self._quantized_forward(matmul_input, shortcut)
        low_rank = self.adapter.down(adapter_input)
        if shortcut is not None:
            low_rank = low_rank + shortcut
        update = self.adapter.up(low_rank)
        for earlier in self.chain.config.summed_layers(self.layer_index)[1:]:
            earlier_adapter = self.chain.adapters[earlier]
            update = update + earlier_adapter.up(earlier_adapter.down(adapter_input))
        return F.linear(matmul_input, self.weight, self.bias) + self.scaling * update

    def _quantized_forward(self, matmul_input: Tensor, shortcut: Tensor | None) -> Tensor:
        """What the merged, quantized layer will compute, plus the float shortcut that a merge approximates."""
        quantizers = self.fake_quantizers
        effective_weight = quantizers.weight(self.weight + self.mergeable_delta_weight())
        output = F.linear(quantizers.activations(matmul_input), effective_weight, self.bias)
        if shortcut is not None:
            output = output + self.scaling * self.adapter.up(shortcut)
        return output

    def extra_repr(self) -> str:
        qat = f", qat={self.fake_quantizers.name}" if self.fake_quantizers else ""
        return (f"{super().extra_repr()}, layer={self.layer_index}, adapter={self.chain.config.kind}, "
                f"rank={self.adapter.lora_A.shape[0]}{qat}")
