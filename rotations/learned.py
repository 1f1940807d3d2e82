"""Learned rotations (SpinQuant-style): R1 on the residual stream and one R2 per layer on the value heads.

A fixed Hadamard spreads outliers but is not the best rotation for a given quantizer. Here R1
(hidden × hidden) and R2 (head_dim × head_dim, applied to every value head) start from the fixed rotation
(the randomized Hadamard R1, R2 = I) and follow the Riemannian gradient of the causal-LM loss of the
model *under the target scheme's fake quantization* (per-token activations with the scheme's clip and, with
`weights="rtn"`, RTN weights with straight-through rounding), with a Cayley retraction so they stay
orthogonal. The online Hadamards before o_proj and down_proj stay fixed, as in SpinQuant. The learned
matrices are then folded by `rotate_model`, the code path of the fixed rotation, so the float model is
unchanged.

While learning, each linear computes its rotated weight from the norm-folded original on every call
(W·R1, R1ᵀ·W, R2 per head) instead of the weights being rotated in place: gradients reach R1/R2 and the
original weights are never modified. The embedding rows are 8-bit as deployed; the lm_head stays float while
learning (rotating and quantizing its 49152 rows at every step would cost more than the decoder).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import geoopt
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from rotaq.pipeline.errors import RotaqError
from rotaq.pipeline.families import DecoderFamily, decoder_layers, set_submodule
from rotaq.pipeline.progress import progress_bar
from rotaq.quantizers.activations import fake_quantize_activations
from rotaq.quantizers.linear import LayerQuantSpec, decoder_layer_specs, quantize_output
from rotaq.quantizers.quantize_model import head_spec
from rotaq.quantizers.rtn import compute_qparams, dequantize_codes, fake_quantize_weight, quantize_to_codes
from rotaq.quantizers.schemes import QuantScheme
from rotaq.rotations.learn_checkpoint import RotationCheckpoint
from rotaq.rotations.online import OnlineRotation
from rotaq.rotations.rotate import (
    RotationMatrices,
    fold_all_norms,
    rotate_head_columns,
    rotate_head_rows,
    untie_word_embeddings,
)

# SGD with momentum on the Stiefel manifold (canonical metric, Cayley retraction), as SpinQuant's Cayley SGD.
# geoopt does not normalise the step as SpinQuant's SGDG does (its lr 1.5 diverged here: loss 5.4 → 8.1 in one
# step on SmolLM2-135M); 0.002 gave lower losses than 0.01 over 16 steps on the same windows.
DEFAULT_LR = 0.002
MOMENTUM = 0.9
# The weights' clipping search (21 ratios) would cost more than the model's own forward pass at every step;
# learning uses plain absmax RTN per channel. The quantize stage still searches.
LEARN_WEIGHT_CLIP_SEARCH = False
# What the decoder weights are while learning: "rtn", fake-quantized per channel with straight-through
# rounding (the deployed weights when the quantize stage uses RTN), or "float", activations only, which is
# what SpinQuant learns with when GPTQ quantizes the weights afterwards (GPTQ's codes are not RTN's, so a
# rotation fitted to RTN's rounding errors fits errors that the deployed model does not make).
LEARN_WEIGHT_MODES = ("rtn", "float")


@dataclass(frozen=True)
class LearnSettings:
    """What the rotation is learned for and how long."""

    scheme: QuantScheme
    steps: int = 100
    lr: float = DEFAULT_LR
    learn_heads: bool = True  # False: learn R1 only (no R2)
    weights: str = "float"  # one of LEARN_WEIGHT_MODES
    batch_size: int = 1
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.scheme.quantizes_activations:
            raise RotaqError(f"--rotation learned needs a scheme that quantizes activations (w4a4, w4a8, w8a8); "
                             f"{self.scheme.name} keeps them in float, so use --rotation hadamard")
        if self.steps < 1:
            raise RotaqError(f"--steps must be at least 1 for --rotation learned, got {self.steps}")
        if not self.lr > 0:
            raise RotaqError(f"--lr must be positive, got {self.lr}")
        if self.batch_size < 1:
            raise RotaqError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.weights not in LEARN_WEIGHT_MODES:
            raise RotaqError(f"--learn-weights must be one of {', '.join(LEARN_WEIGHT_MODES)}, got {self.weights!r}")

    def trajectory(self) -> dict[str, Any]:
        """Everything that decides the matrices after a given step (not the step count: the rate is constant)."""
        scheme = self.scheme
        return {"scheme": scheme.name, "act_clip_ratio": scheme.act_clip_ratio, "act_symmetric": scheme.act_symmetric,
                "act_block_size": scheme.act_block_size, "kv_bits": scheme.kv_bits, "group": scheme.weight_group_size,
                "lm_head_bits": scheme.lm_head_bits, "lr": self.lr, "momentum": MOMENTUM,
                "learn_heads": self.learn_heads, "weights": self.weights, "batch_size": self.batch_size,
                "seed": self.seed}


@dataclass
class LearnResult:
    matrices: RotationMatrices
    log: dict[str, Any] = field(default_factory=dict)


class LearnableRotations(nn.Module):
    """R1 and the R2s as float64 points of the orthogonal group (float64 keeps RᵀR = I through many steps)."""

    def __init__(self, start: RotationMatrices) -> None:
        super().__init__()
        stiefel = geoopt.CanonicalStiefel()
        self.residual = geoopt.ManifoldParameter(start.residual.double().clone(), manifold=stiefel)
        self.heads = None if start.heads is None else nn.ParameterList(
            [geoopt.ManifoldParameter(r.double().clone(), manifold=stiefel) for r in start.heads])

    def matrices(self) -> RotationMatrices:
        heads = None if self.heads is None else [r.detach().clone() for r in self.heads]
        return RotationMatrices(self.residual.detach().clone(), heads)


def rotation_optimizer(rotations: LearnableRotations, lr: float) -> torch.optim.Optimizer:
    """Riemannian SGD with momentum; on CanonicalStiefel its retraction is the Cayley transform, which maps a
    skew-symmetric step to an orthogonal matrix exactly (up to rounding), so R stays orthogonal."""
    return geoopt.optim.RiemannianSGD(rotations.parameters(), lr=lr, momentum=MOMENTUM, stabilize=None)


def _straight_through_weight(weight: Tensor, spec: LayerQuantSpec, ragged: bool) -> Tensor:
    """RTN fake quantization whose gradient is the identity (the rounding has no useful derivative).

    Per channel, the scales and codes come straight from the RTN helpers, without `fake_quantize_weight`'s
    integer packing and finiteness scan: the same numbers at about half the cost, paid at every step.
    """
    detached = weight.detach()
    if spec.group_size is None:
        scale, zero = compute_qparams(detached, spec.weight_bits, spec.weight_symmetric, LEARN_WEIGHT_CLIP_SEARCH)
        scale, zero = scale.unsqueeze(-1), None if zero is None else zero.unsqueeze(-1)
        codes = quantize_to_codes(detached.float(), scale, zero, spec.weight_bits, spec.weight_symmetric)
        quantized = dequantize_codes(codes, scale, zero).to(weight.dtype)
    else:
        quantized = fake_quantize_weight(detached, spec.weight_bits, spec.group_size, spec.weight_symmetric,
                                         LEARN_WEIGHT_CLIP_SEARCH, allow_ragged=ragged)
    return weight + (quantized - weight).detach()


class LearningLinear(nn.Module):
    """A frozen linear whose weight is rotated from the current R1/R2 at every call, then fake-quantized.

    role: "reads" (input on the residual stream: W·R1) or "writes" (output to it: R1ᵀ·W). `value_head`
    puts R2 on the output heads (v_proj), `output_head` undoes it on the input heads (o_proj). An online
    rotation H, when given, is applied to the input and folded as W·H, as the deployed layer does.
    `quantize_weight=False` keeps the rotated weight in float (only the activations are quantized).
    """

    def __init__(self, linear: nn.Linear, role: str, rotations: LearnableRotations, spec: LayerQuantSpec,
                 ragged: bool, layer_index: int | None = None, value_head: bool = False, output_head: bool = False,
                 online: OnlineRotation | None = None, quantize_weight: bool = True) -> None:
        super().__init__()
        self.linear, self.role, self.spec, self.ragged = linear, role, spec, ragged
        self.quantize_weight = quantize_weight
        self.rotations = [rotations]  # a list, so the shared rotations are not registered once per layer
        self.layer_index, self.value_head, self.output_head = layer_index, value_head, output_head
        self.online = online
        if online is not None:
            self.register_buffer("online_matrix", online.matrix().to(linear.weight.dtype), persistent=False)

    def _head_rotation(self, dtype: torch.dtype) -> Tensor | None:
        heads = self.rotations[0].heads
        if heads is None or not (self.value_head or self.output_head):
            return None
        return heads[self.layer_index].to(dtype)

    def rotated(self) -> tuple[Tensor, Tensor | None]:
        weight, bias = self.linear.weight, self.linear.bias
        r1 = self.rotations[0].residual.to(weight.dtype)
        r2 = self._head_rotation(weight.dtype)
        if self.role == "reads":
            weight = weight @ r1
        else:
            weight = r1.T @ weight
            bias = None if bias is None else bias @ r1
        if r2 is not None and self.value_head:  # r2 is None unless this is v_proj or o_proj
            weight = rotate_head_rows(weight, r2)
            bias = None if bias is None else (bias.reshape(-1, r2.shape[0]) @ r2).reshape(-1)
        if r2 is not None and self.output_head:
            weight = rotate_head_columns(weight, r2)
        if self.online is not None:
            weight = weight @ self.online_matrix
        return weight, bias

    def forward(self, hidden_states: Tensor) -> Tensor:
        if self.online is not None:
            hidden_states = self.online(hidden_states)
        spec = self.spec
        if spec.act_bits < 16:
            hidden_states = fake_quantize_activations(hidden_states, spec.act_bits, spec.act_symmetric,
                                                      spec.act_clip_ratio, spec.act_block_size)
        weight, bias = self.rotated()
        if self.quantize_weight:
            weight = _straight_through_weight(weight, spec, self.ragged)
        output = F.linear(hidden_states, weight, bias)
        return quantize_output(output, spec)


class FloatHead(nn.Module):
    """The lm_head kept in float while learning: its input is rotated back (h·R1·R1ᵀ) instead of its 49152-row
    weight being rotated and quantized at every step, which would cost more than the decoder's seven linears
    (it is 8-bit when deployed, whose error is small beside W4A4's)."""

    def __init__(self, linear: nn.Linear, rotations: LearnableRotations) -> None:
        super().__init__()
        self.linear = linear
        self.rotations = [rotations]

    def forward(self, hidden_states: Tensor) -> Tensor:
        r1 = self.rotations[0].residual.to(hidden_states.dtype)
        return self.linear(hidden_states @ r1.T)


class LearningEmbedding(nn.Module):
    """Looked-up rows times R1, fake-quantized per row as the quantize stage quantizes the table (per-row RTN:
    quantizing only the rows looked up gives the same numbers and skips the vocabulary)."""

    def __init__(self, embedding: nn.Embedding, rotations: LearnableRotations, spec: LayerQuantSpec | None) -> None:
        super().__init__()
        self.embedding, self.spec = embedding, spec
        self.rotations = [rotations]

    def forward(self, input_ids: Tensor) -> Tensor:
        weight = self.embedding.weight
        rows = F.embedding(input_ids, weight) @ self.rotations[0].residual.to(weight.dtype)
        if self.spec is None:
            return rows
        flat = rows.reshape(-1, rows.shape[-1])
        return _straight_through_weight(flat, self.spec, ragged=False).reshape(rows.shape)


def _online_rotations(online_specs: dict[str, dict], device: torch.device) -> dict[str, OnlineRotation]:
    return {path: OnlineRotation(spec).to(device) for path, spec in online_specs.items()}


@contextmanager
def learning_view(model: nn.Module, family: DecoderFamily, rotations: LearnableRotations, scheme: QuantScheme,
                  online_specs: dict[str, dict], weights: str = "float") -> Iterator[None]:
    """Swap every rotated module for its learning twin, and put the originals back afterwards.

    `weights` is one of LEARN_WEIGHT_MODES: "float" leaves the decoder weights unquantized.

    The model must be untied and norm-folded (`prepare_for_learning`), so R1 commutes with every RMSNorm.
    """
    device = next(model.parameters()).device
    specs = decoder_layer_specs(scheme, family, model)  # what the quantize stage deploys, per projection
    online = _online_rotations(online_specs, device)
    originals: dict[str, nn.Module] = {}

    def swap(path: str, replacement: nn.Module) -> None:
        originals[path] = model.get_submodule(path)
        set_submodule(model, path, replacement)

    for index, layer in enumerate(decoder_layers(model, family)):
        prefix = f"{family.layers}.{index}"
        for path in family.decoder_linears:
            full = f"{prefix}.{path}"
            role = "writes" if path in (family.attention_output, family.mlp_output) else "reads"
            swap(full, LearningLinear(layer.get_submodule(path), role, rotations, specs[path], scheme.ragged_groups,
                                      index, value_head=path == family.value,
                                      output_head=path == family.attention_output, online=online.get(full),
                                      quantize_weight=weights == "rtn"))
    swap(family.lm_head, FloatHead(model.get_submodule(family.lm_head), rotations))
    head_bits = scheme.lm_head_bits
    swap(family.embed_tokens, LearningEmbedding(model.get_submodule(family.embed_tokens), rotations,
                                                head_spec(head_bits) if head_bits is not None else None))
    try:
        yield
    finally:
        for path, module in originals.items():
            set_submodule(model, path, module)


def prepare_for_learning(model: nn.Module, family: DecoderFamily) -> None:
    """Untie and fold the norms in place (the fold repeats both, harmlessly), and freeze every weight."""
    untie_word_embeddings(model, family)
    fold_all_norms(model, family)
    for parameter in model.parameters():
        parameter.requires_grad_(False)


def _batch(windows: Tensor, order: Tensor, step: int, batch_size: int) -> Tensor:
    """The windows of `step`: a seeded order, cycled, so a resumed run sees the batches of an uninterrupted one."""
    positions = torch.arange(step * batch_size, (step + 1) * batch_size) % windows.shape[0]
    return windows[order[positions]]


def learn_rotations(model: nn.Module, family: DecoderFamily, windows: Tensor, settings: LearnSettings,
                    start: RotationMatrices, online_specs: dict[str, dict],
                    checkpoint: RotationCheckpoint | None = None) -> LearnResult:
    """Learn R1 (and the R2s when `start.heads` is given) on `windows` for `settings.steps` steps.

    A non-finite loss or gradient stops the learning with the last rotation whose loss was finite; the
    result's log says where (`stopped`). With `checkpoint`, every step is saved and a saved run resumes.
    """
    if windows.numel() == 0:
        raise RotaqError("--rotation learned needs calibration text, and the calibration set is empty")
    prepare_for_learning(model, family)
    device = next(model.parameters()).device
    rotations = LearnableRotations(start).to(device)
    optimizer = rotation_optimizer(rotations, settings.lr)
    step, log = 0, {"losses": [], "seconds": 0.0, "resumed_at": None, "stopped": None}
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:
        rotations.load_state_dict(saved["rotations"])
        optimizer.load_state_dict(saved["optimizer"])
        step, log = int(saved["step"]), {**saved["log"], "resumed_at": int(saved["step"])}
    order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(settings.seed))
    started = time.perf_counter()
    good = rotations.state_dict()
    was_training = model.training
    model.eval()
    bar = progress_bar(total=settings.steps, initial=step, desc="learn rotation", unit="step",
                       disable=not settings.progress)
    try:
        with learning_view(model, family, rotations, settings.scheme, online_specs, settings.weights):
            while step < settings.steps:
                batch = _batch(windows, order, step, settings.batch_size).to(device)
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                value = float(loss.detach())
                if not math.isfinite(value):  # R after `step` updates is bad: go back to the one before it
                    rotations.load_state_dict(good)
                    kept = max(step - 1, 0)
                    log["stopped"] = f"the loss became {value} after {step} steps; kept the rotation after {kept}"
                    step, log["losses"] = kept, log["losses"][:kept]
                    break
                good = {k: v.detach().clone() for k, v in rotations.state_dict().items()}
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if not all(torch.isfinite(p.grad).all() for p in rotations.parameters() if p.grad is not None):
                    log["stopped"] = f"the gradient became non-finite after {step} steps; kept that rotation"
                    break
                optimizer.step()
                step += 1
                log["losses"].append(value)
                bar.set_postfix(loss=f"{value:.4f}")
                bar.update(1)
                if checkpoint is not None:
                    log["seconds"] += time.perf_counter() - started
                    started = time.perf_counter()
                    checkpoint.save(step, rotations.state_dict(), optimizer.state_dict(), log)
    finally:
        bar.close()
        model.train(was_training)
    log["seconds"] = round(log["seconds"] + time.perf_counter() - started, 2)
    log["steps"] = step
    return LearnResult(rotations.matrices(), log)
