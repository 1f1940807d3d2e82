"""Online rotations: an orthogonal transform applied to a linear layer's input at inference time.

QuaRot puts a Hadamard before `down_proj` and `o_proj`, whose inputs are not on the residual
stream and so cannot be rotated offline; the inverse is folded into the layer's weight.
"""

from __future__ import annotations

import math
from typing import Any, TypeVar

import torch
from torch import nn
from torch.nn import functional as F

from rotaq.rotations.hadamard import apply_hadamard, hadamard_factors, has_hadamard, random_orthogonal_matrix


def online_rotation_spec(width: int, kind: str, seed: int, block: int | None = None) -> dict[str, Any]:
    """How to rebuild an online rotation: Kronecker-factored Hadamard when one exists, else a seeded
    dense random orthogonal matrix (only with `--rotation random`). With `block` (a divisor of `width`
    with a Hadamard matrix), the Hadamard is block-diagonal: one H_block on every `block` consecutive
    channels, what per-block int8 activations need and one MatMul in the graph instead of two."""
    if kind == "hadamard" or has_hadamard(width):
        if block is not None and block < width and width % block == 0 and has_hadamard(block):
            return {"kind": "hadamard", "width": width, "block": block,
                    "factors": [int(f.shape[0]) for f in hadamard_factors(block)]}
        factors = hadamard_factors(width)  # raises NoHadamardError with advice when there is none
        return {"kind": "hadamard", "width": width, "factors": [int(f.shape[0]) for f in factors]}
    return {"kind": "random", "width": width, "seed": seed}


class OnlineRotation(nn.Module):
    """x ↦ x · R along the last dimension, R orthonormal (rows: tokens, row-vector convention); R is a
    Hadamard of order `width`, the block-diagonal I ⊗ H of order `block`, or a dense random matrix."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self.spec = dict(spec)
        self.width = int(spec["width"])
        self.block = int(spec.get("block", self.width))  # folders written before blocks rotate whole widths
        if spec["kind"] == "hadamard":
            factors = hadamard_factors(self.block)  # fresh copies, safe to keep
            for index, factor in enumerate(factors):
                self.register_buffer(f"factor_{index}", factor.float(), persistent=False)
            self.factor_count = len(factors)
        else:
            self.register_buffer("dense", random_orthogonal_matrix(self.width, int(spec["seed"])).float(),
                                 persistent=False)
            self.factor_count = 0

    def factor_tensors(self) -> list[torch.Tensor]:
        """The ±1 Kronecker factors of one block's Hadamard (of the whole width without blocks)."""
        return [getattr(self, f"factor_{i}") for i in range(self.factor_count)]

    def matrix(self) -> torch.Tensor:
        """The dense float64 R, for folding into weights offline (never used on the hot path)."""
        if self.factor_count:
            dense = torch.ones(1, 1, dtype=torch.float64)
            for factor in self.factor_tensors():
                dense = torch.kron(dense, factor.double())
            dense = dense / math.sqrt(self.block)
            return torch.block_diag(*[dense] * (self.width // self.block)) if self.block < self.width else dense
        return random_orthogonal_matrix(self.width, int(self.spec["seed"]))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self.factor_count:
            return hidden_states @ self.dense.to(hidden_states.dtype)
        if self.block < self.width:
            blocks = hidden_states.unflatten(-1, (-1, self.block))
            return apply_hadamard(blocks, self.factor_tensors()).flatten(-2)
        return apply_hadamard(hidden_states, self.factor_tensors())

    def extra_repr(self) -> str:
        return f"{self.spec}"


def adopt_linear_parameters(wrapped: nn.Linear, linear: nn.Linear) -> nn.Linear:
    """Make `wrapped` share `linear`'s weight and bias tensors (no copy), so wrapping never moves memory."""
    wrapped.weight = linear.weight
    if linear.bias is not None:
        wrapped.bias = linear.bias
    return wrapped


Wrapper = TypeVar("Wrapper", bound="RotatedInputLinear")


class RotatedInputLinear(nn.Linear):
    """The one base of rotaq's linear wrappers (online-rotated, adapted, quantized): it owns the optional
    online rotation of the input and `matmul_input`, the tensor the weight multiplies. Quantizers, outlier
    statistics, merges and the export read both through `input_rotation_of` / `matmul_input_of` only.

    Wrappers stack by taking over: `wrap` builds the wrapper on the meta device and adopts the wrapped
    layer's weight, bias and rotation, so rotation → adapter → quantization stack without any of them
    knowing the others. They subclass nn.Linear instead of holding a PEFT-style `base_layer` because the
    parameters must keep their names (`...o_proj.weight`): every stage folder's model.safetensors holds the
    parent's tensors under the parent's names, and a `base_layer.weight` would change every artifact.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, input_rotation: OnlineRotation | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.input_rotation = input_rotation

    @classmethod
    def wrap(cls: type[Wrapper], linear: nn.Linear, *args: Any, **kwargs: Any) -> Wrapper:
        """`cls(in, out, bias, *args, **kwargs)` holding `linear`'s weight, bias and online rotation (no copy)."""
        wrapped = cls(linear.in_features, linear.out_features, linear.bias is not None, *args, device="meta",
                      dtype=linear.weight.dtype, **kwargs)
        rotation = input_rotation_of(linear)
        if rotation is not None:
            wrapped.input_rotation = rotation
        return adopt_linear_parameters(wrapped, linear)

    def matmul_input(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states if self.input_rotation is None else self.input_rotation(hidden_states)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.linear(self.matmul_input(hidden_states), self.weight, self.bias)


class OnlineRotatedLinear(RotatedInputLinear):
    """A Linear whose input is rotated online first; its weight already holds W·R."""

    def __init__(self, in_features: int, out_features: int, bias: bool, rotation: OnlineRotation,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype, input_rotation=rotation)


def input_rotation_of(module: nn.Module) -> OnlineRotation | None:
    """The online rotation in front of a linear's matmul, or None (a plain nn.Linear, an unrotated layer)."""
    return module.input_rotation if isinstance(module, RotatedInputLinear) else None


def matmul_input_of(module: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """The tensor `module`'s weight multiplies when it is called on `hidden_states`: what a quantizer sees."""
    return module.matmul_input(hidden_states) if isinstance(module, RotatedInputLinear) else hidden_states
