"""QuaRot-style function-preserving rotation of a decoder model, one short function per transform.

Row-vector convention: a hidden state h becomes h·Q. A linear layer reading the residual stream
(y = h Wᵀ) therefore takes W ← W·Q, and one writing to it takes W ← Qᵀ·W, b ← Qᵀ·b. All products
are done in float64 and cast back, so a float32 model keeps its logits to ~1e-6.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import logging

import torch
from torch import nn

from rotaq.pipeline.errors import RotaqError
from rotaq.pipeline.families import DecoderFamily, decoder_layers, set_submodule
from rotaq.rotations.hadamard import has_hadamard, random_hadamard_matrix, random_orthogonal_matrix
from rotaq.rotations.online import OnlineRotatedLinear, OnlineRotation, online_rotation_spec

logger = logging.getLogger(__name__)

# "learned" starts from the randomized Hadamard and learns it (rotations/learned.py); the fold is the same.
ROTATION_KINDS = ("hadamard", "random", "learned")
# How o_proj's input (heads × head_dim) is rotated. "head": QuaRot's and SpinQuant's R2, one head_dim Hadamard
# applied to every value head, folded offline into v_proj's rows and o_proj's columns, so nothing runs for it
# at inference; "online": a Hadamard over the whole input before o_proj (two MatMuls, two Reshapes per layer).
HEAD_ROTATION, ONLINE_ROTATION = "head", "online"
O_PROJ_ROTATIONS = (HEAD_ROTATION, ONLINE_ROTATION)
# The online Hadamards are block-diagonal in blocks of 128 (the A8 schemes' activation block): one MatMul per
# layer in the graph instead of a 12×12 and a 128×128 one. Measured with head R2 (SmolLM2-135M, GPTQ, 16 held-out
# windows of 512; docs/rotation.md): W4A8 perplexity 28.93 against 29.12 with the whole-width down_proj
# Hadamard and 29.21 with both whole-width online rotations of before.
DEFAULT_ONLINE_BLOCK = 128
_HEAD_SEED_OFFSET = 3  # the online rotations' random matrices use seed + 1 and seed + 2
CANNOT_ROTATE = "it cannot rotate this model (in `rotaq run`, rotate.enabled: false quantizes it unrotated)"
_ROW_CHUNK = 8192  # rows of an embedding matrix rotated at once, to bound float64 memory


@dataclass(frozen=True)
class RotationMatrices:
    """Given rotations to fold instead of the seeded ones: R1 on the residual stream, and optionally one
    head_dim × head_dim R2 per decoder layer applied to every value head (v_proj's output, o_proj's input)."""

    residual: torch.Tensor
    heads: list[torch.Tensor] | None = None


@dataclass(frozen=True)
class RotationConfig:
    kind: str = "hadamard"
    seed: int = 0
    online: bool = True  # the online Hadamard before down_proj, and before o_proj when o_proj_rotation is online
    # None: the defaults above, or for a learned rotation online and the whole width, as its tables were measured
    # (its R2 is learned from I on top of the online o_proj Hadamard).
    o_proj_rotation: str | None = None
    # Block-diagonal online Hadamards of this order where it divides the width and has a Hadamard matrix; 0:
    # over the whole width.
    online_block: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ROTATION_KINDS:
            raise RotaqError(f"unknown rotation '{self.kind}'; choose one of {', '.join(ROTATION_KINDS)}")
        learned = self.kind == "learned"
        if self.o_proj_rotation is None:
            object.__setattr__(self, "o_proj_rotation", ONLINE_ROTATION if learned else HEAD_ROTATION)
        if self.online_block is None:
            object.__setattr__(self, "online_block", 0 if learned else DEFAULT_ONLINE_BLOCK)
        if self.online_block < 0:
            raise RotaqError(f"online_block={self.online_block} must be a block order, or 0 for the whole width")
        if self.o_proj_rotation not in O_PROJ_ROTATIONS:
            raise RotaqError(f"unknown o_proj rotation '{self.o_proj_rotation}'; choose one of "
                             f"{', '.join(O_PROJ_ROTATIONS)}")


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|a − b| / max|b|: the logit error relative to the logit scale."""
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max())


@torch.no_grad()
def _set_weight(linear: nn.Module, new_weight: torch.Tensor) -> None:
    linear.weight.data = new_weight.to(linear.weight.dtype).contiguous()


@torch.no_grad()
def fold_rmsnorm_into_linears(norm: nn.Module, linears: list[nn.Linear]) -> None:
    """RMSNorm(x)·g feeding W equals RMSNorm(x) feeding W·diag(g); the norm's weight becomes 1."""
    scale = norm.weight.double()
    for linear in linears:
        _update_rows_in_chunks(linear.weight.data, lambda rows: rows * scale[None, :])
    norm.weight.data.fill_(1.0)


@torch.no_grad()
def untie_word_embeddings(model: nn.Module, family: DecoderFamily) -> None:
    """Folding the final norm changes lm_head but not the embeddings, so they can no longer share a tensor."""
    embed = model.get_submodule(family.embed_tokens)
    lm_head = model.get_submodule(family.lm_head)
    if lm_head.weight is embed.weight or lm_head.weight.data_ptr() == embed.weight.data_ptr():
        lm_head.weight = nn.Parameter(embed.weight.detach().clone())
    untie_config(model.config)


def untie_config(config: Any) -> None:
    config.tie_word_embeddings = False
    if hasattr(config, "get_text_config"):
        config.get_text_config().tie_word_embeddings = False


def fold_layer_norms(layer: nn.Module, family: DecoderFamily) -> None:
    fold_rmsnorm_into_linears(layer.get_submodule(family.input_norm),
                              [layer.get_submodule(p) for p in family.attention_inputs])
    fold_rmsnorm_into_linears(layer.get_submodule(family.post_attention_norm),
                              [layer.get_submodule(p) for p in family.mlp_inputs])


def fold_all_norms(model: nn.Module, family: DecoderFamily) -> None:
    """Fold every RMSNorm's scale into the linears it feeds (refused, before any change, for a norm kind whose
    scale is not its weight)."""
    family.check_norm_kind(CANNOT_ROTATE)
    for layer in decoder_layers(model, family):
        fold_layer_norms(layer, family)
    fold_rmsnorm_into_linears(model.get_submodule(family.final_norm), [model.get_submodule(family.lm_head)])


@torch.no_grad()
def rotate_weight_rows(module: nn.Module, rotation: torch.Tensor) -> None:
    """W ← W·Q for an embedding or a linear that reads the rotated stream.

    Rows are rotated in chunks so the float64 copy of a large vocabulary stays small.
    """
    _update_rows_in_chunks(module.weight.data, lambda rows: rows @ rotation)


def _update_rows_in_chunks(weight: torch.Tensor, update: Any) -> None:
    """weight ← update(weight) in float64, _ROW_CHUNK rows at a time: a vocabulary-sized matrix in float64 is
    GBs. `update` must act on each row alone (a right product, a column scale)."""
    for start in range(0, weight.shape[0], _ROW_CHUNK):
        rows = weight[start:start + _ROW_CHUNK]
        rows.copy_(update(rows.double()).to(weight.dtype))


@torch.no_grad()
def rotate_linear_output(linear: nn.Linear, rotation: torch.Tensor) -> None:
    """W ← Qᵀ·W, b ← Qᵀ·b for a layer that writes to the rotated stream."""
    _set_weight(linear, rotation.T @ linear.weight.double())
    if linear.bias is not None:
        linear.bias.data = (rotation.T @ linear.bias.double()).to(linear.bias.dtype)


def residual_rotation_matrix(width: int, config: RotationConfig) -> torch.Tensor:
    if config.kind == "random":
        return random_orthogonal_matrix(width, config.seed)
    return start_matrix(width, config.seed) if config.kind == "learned" else random_hadamard_matrix(width, config.seed)


def start_matrix(width: int, seed: int) -> torch.Tensor:
    """Where a learned rotation starts: the randomized Hadamard, or (with a warning) a seeded random
    orthogonal matrix for a width that has no Hadamard construction."""
    if has_hadamard(width):
        return random_hadamard_matrix(width, seed)
    logger.warning("no Hadamard matrix of order %d: the learned rotation starts from a random orthogonal one", width)
    return random_orthogonal_matrix(width, seed)


def head_rotation_matrix(head_dim: int, config: RotationConfig) -> torch.Tensor | None:
    """The fixed R2 of `o_proj_rotation: head` (a randomized Hadamard of order head_dim, or a seeded random
    orthogonal matrix for `--rotation random` or a head_dim without a Hadamard), None without one."""
    if config.o_proj_rotation != HEAD_ROTATION:
        return None
    seed = config.seed + _HEAD_SEED_OFFSET
    return random_orthogonal_matrix(head_dim, seed) if config.kind == "random" else start_matrix(head_dim, seed)


def rotate_head_rows(weight: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """R2ᵀ·W_h for every head block of rows (heads · head_dim × in): the layer's output per head becomes v_h·R2.
    Shared by the fold and by the learning, so both compute the same weights."""
    head_dim = rotation.shape[0]
    return (rotation.T @ weight.reshape(-1, head_dim, weight.shape[-1])).reshape(weight.shape)


def rotate_head_columns(weight: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """W_h·R2 for every head block of columns (out × heads · head_dim): undoes `rotate_head_rows` on the input."""
    head_dim = rotation.shape[0]
    return (weight.reshape(weight.shape[0], -1, head_dim) @ rotation).reshape(weight.shape)


@torch.no_grad()
def rotate_value_heads(layer: nn.Module, family: DecoderFamily, rotation: torch.Tensor) -> None:
    """Every value head v_h ↦ v_h·R2 and o_proj's input columns by the same R2 per head. Attention mixes values
    only across positions, and grouped queries share a value head, so each head's output carries R2 and
    o_proj's weight cancels it: the function is unchanged."""
    value = layer.get_submodule(family.value)
    output = layer.get_submodule(family.attention_output)
    _set_weight(value, rotate_head_rows(value.weight.double(), rotation))
    if value.bias is not None:
        value.bias.data = (value.bias.double().reshape(-1, rotation.shape[0]) @ rotation).reshape(-1).to(
            value.bias.dtype)
    _set_weight(output, rotate_head_columns(output.weight.double(), rotation))


@torch.no_grad()
def install_online_rotation(model: nn.Module, path: str, spec: dict[str, Any], fold: bool) -> OnlineRotatedLinear:
    """Put an online rotation R in front of the linear at `path`; with `fold`, its weight becomes W·R."""
    linear = model.get_submodule(path)
    # On a layer-streamed model's empty skeleton the weight is on the meta device; the rotation's factors are
    # not in the weights file, so they stay real there.
    rotation = OnlineRotation(spec).to("cpu" if linear.weight.is_meta else linear.weight.device)
    if fold:
        _set_weight(linear, linear.weight.double() @ rotation.matrix())
    wrapped = OnlineRotatedLinear.wrap(linear, rotation)
    set_submodule(model, path, wrapped)
    return wrapped


def online_rotation_specs(model: nn.Module, family: DecoderFamily, config: RotationConfig) -> dict[str, dict]:
    """Spec of every online rotation, checked before any weight changes so a bad width loses nothing.

    An online o_proj rotation spans its whole input (heads × head_dim): head counts like 9 or 14 have no
    Hadamard matrix of their own, but their product with head_dim usually has one. With `o_proj_rotation:
    head` o_proj has none (its R2 is folded offline), so only down_proj's runs online.
    """
    specs: dict[str, dict] = {}
    for index, layer in enumerate(decoder_layers(model, family)):
        prefix = f"{family.layers}.{index}"
        for offset, local_path in enumerate((family.attention_output, family.mlp_output)):
            if local_path == family.attention_output and config.o_proj_rotation == HEAD_ROTATION:
                continue
            width = layer.get_submodule(local_path).in_features
            specs[f"{prefix}.{local_path}"] = online_rotation_spec(width, config.kind, config.seed + 1 + offset,
                                                                   config.online_block or None)
    return specs


def check_head_rotations(model: nn.Module, family: DecoderFamily, heads: list[torch.Tensor]) -> None:
    layer_count, head_dim = len(decoder_layers(model, family)), family.head_dim(model.config)
    if len(heads) != layer_count or any(tuple(r.shape) != (head_dim, head_dim) for r in heads):
        raise RotaqError(f"head rotations must be {layer_count} matrices of {head_dim}×{head_dim}")


@torch.no_grad()
def rotate_model(model: nn.Module, family: DecoderFamily, config: RotationConfig,
                 matrices: RotationMatrices | None = None) -> dict[str, Any]:
    """Rotate `model` in place; returns the manifest section that lets a loader rebuild its structure.

    `matrices` (a learned R1, and R2 per layer) replace the seeded residual rotation; everything else
    (norm folding, the online rotations) is the same for every kind.
    """
    hidden_size = model.get_submodule(family.embed_tokens).weight.shape[1]
    device = model.get_submodule(family.embed_tokens).weight.device
    rotation = (residual_rotation_matrix(hidden_size, config) if matrices is None
                else matrices.residual.double()).to(device)
    if tuple(rotation.shape) != (hidden_size, hidden_size):
        raise RotaqError(f"the residual rotation must be {hidden_size}×{hidden_size}, got {tuple(rotation.shape)}")
    family.check_norm_kind(CANNOT_ROTATE)  # before anything changes: the model stays as it was loaded
    heads = None if matrices is None else matrices.heads
    if heads is None and (fixed := head_rotation_matrix(family.head_dim(model.config), config)) is not None:
        heads = [fixed] * len(decoder_layers(model, family))
    if heads is not None:
        check_head_rotations(model, family, heads)
    online_specs = online_rotation_specs(model, family, config) if config.online else {}

    untie_word_embeddings(model, family)
    rotate_weight_rows(model.get_submodule(family.embed_tokens), rotation)
    for index, layer in enumerate(decoder_layers(model, family)):
        rotate_decoder_layer(layer, family, rotation, layer_online_specs(online_specs, family, index),
                             None if heads is None else heads[index].double().to(device))
    rotate_head(model, family, rotation)
    return rotation_section(config, hidden_size, online_specs, heads is not None)


def rotation_section(config: RotationConfig, hidden_size: int, online_specs: dict[str, dict],
                     head_rotations: bool) -> dict[str, Any]:
    """The manifest section that lets a loader rebuild a rotated model's structure."""
    section = {"kind": config.kind, "seed": config.seed, "residual_width": hidden_size,
               "o_proj_rotation": config.o_proj_rotation, "online_block": config.online_block, "online": online_specs}
    return {**section, "head_rotations": True} if head_rotations else section


def layer_online_specs(online_specs: dict[str, dict], family: DecoderFamily, index: int) -> dict[str, dict]:
    """Layer `index`'s online rotations keyed by their path inside the layer."""
    prefix = f"{family.layers}.{index}."
    return {path[len(prefix):]: spec for path, spec in online_specs.items() if path.startswith(prefix)}


@torch.no_grad()
def rotate_decoder_layer(layer: nn.Module, family: DecoderFamily, rotation: torch.Tensor,
                         online_specs: dict[str, dict], head_rotation: torch.Tensor | None = None) -> None:
    """Everything the rotation does to one decoder layer, which touches no other layer: fold its two norms,
    rotate the stream's readers and writers, the value heads (R2), and fold and install its online rotations.
    The whole-model and the layer-streamed rotation both call this, so they compute the same weights."""
    fold_layer_norms(layer, family)
    for path in (*family.attention_inputs, *family.mlp_inputs):
        rotate_weight_rows(layer.get_submodule(path), rotation)
    for path in (family.attention_output, family.mlp_output):
        rotate_linear_output(layer.get_submodule(path), rotation)
    if head_rotation is not None:
        rotate_value_heads(layer, family, head_rotation)
    for path, spec in online_specs.items():
        install_online_rotation(layer, path, spec, fold=True)


@torch.no_grad()
def rotate_head(model: nn.Module, family: DecoderFamily, rotation: torch.Tensor) -> None:
    """The final norm folded into lm_head, whose rows then read the rotated stream."""
    fold_rmsnorm_into_linears(model.get_submodule(family.final_norm), [model.get_submodule(family.lm_head)])
    rotate_weight_rows(model.get_submodule(family.lm_head), rotation)


def install_rotation_structure(model: nn.Module, rotation_section: dict[str, Any]) -> None:
    """Rebuild the online-rotation modules of a saved rotated model (its weights already hold W·R)."""
    for path, spec in rotation_section.get("online", {}).items():
        install_online_rotation(model, path, spec, fold=False)
