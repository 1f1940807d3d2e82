"""QuaRot-style function-preserving rotation of a decoder model, one short function per transform.

Row-vector convention: a hidden state h becomes h·Q. A linear layer reading the residual stream
(y = h Wᵀ) therefore takes W ← W·Q, and one writing to it takes W ← Qᵀ·W, b ← Qᵀ·b. All products
are done in float64 and cast back, so a float32 model keeps its logits to ~1e-6.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rotaq.pipeline.errors import RotaqError
from rotaq.pipeline.families import DecoderFamily, decoder_layers, set_submodule
from rotaq.rotations.hadamard import random_hadamard_matrix, random_orthogonal_matrix
from rotaq.rotations.online import OnlineRotatedLinear, OnlineRotation, online_rotation_spec

ROTATION_KINDS = ("hadamard", "random")
_ROW_CHUNK = 8192  # rows of an embedding matrix rotated at once, to bound float64 memory


@dataclass(frozen=True)
class RotationConfig:
    kind: str = "hadamard"
    seed: int = 0
    online: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ROTATION_KINDS:
            raise RotaqError(f"unknown rotation '{self.kind}'; choose one of {', '.join(ROTATION_KINDS)}")


@torch.no_grad()
def _set_weight(linear: nn.Module, new_weight: torch.Tensor) -> None:
    linear.weight.data = new_weight.to(linear.weight.dtype).contiguous()


@torch.no_grad()
def fold_rmsnorm_into_linears(norm: nn.Module, linears: list[nn.Linear]) -> None:
    """RMSNorm(x)·g feeding W equals RMSNorm(x) feeding W·diag(g); the norm's weight becomes 1."""
    scale = norm.weight.double()
    for linear in linears:
        _set_weight(linear, linear.weight.double() * scale[None, :])
    norm.weight.data.fill_(1.0)


@torch.no_grad()
def untie_word_embeddings(model: nn.Module, family: DecoderFamily) -> None:
    """Folding the final norm changes lm_head but not the embeddings, so they can no longer share a tensor."""
    embed = model.get_submodule(family.embed_tokens)
    lm_head = model.get_submodule(family.lm_head)
    if lm_head.weight is embed.weight or lm_head.weight.data_ptr() == embed.weight.data_ptr():
        lm_head.weight = nn.Parameter(embed.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False


def fold_all_norms(model: nn.Module, family: DecoderFamily) -> None:
    for layer in decoder_layers(model, family):
        fold_rmsnorm_into_linears(layer.get_submodule(family.input_norm),
                                  [layer.get_submodule(p) for p in family.attention_inputs])
        fold_rmsnorm_into_linears(layer.get_submodule(family.post_attention_norm),
                                  [layer.get_submodule(p) for p in family.mlp_inputs])
    fold_rmsnorm_into_linears(model.get_submodule(family.final_norm), [model.get_submodule(family.lm_head)])


@torch.no_grad()
def rotate_weight_rows(module: nn.Module, rotation: torch.Tensor) -> None:
    """W ← W·Q for an embedding or a linear that reads the rotated stream.

    Rows are rotated in chunks so the float64 copy of a large vocabulary stays small.
    """
    weight = module.weight
    for start in range(0, weight.shape[0], _ROW_CHUNK):
        rows = weight.data[start:start + _ROW_CHUNK]
        rows.copy_((rows.double() @ rotation).to(weight.dtype))


@torch.no_grad()
def rotate_linear_output(linear: nn.Linear, rotation: torch.Tensor) -> None:
    """W ← Qᵀ·W, b ← Qᵀ·b for a layer that writes to the rotated stream."""
    _set_weight(linear, rotation.T @ linear.weight.double())
    if linear.bias is not None:
        linear.bias.data = (rotation.T @ linear.bias.double()).to(linear.bias.dtype)


def residual_rotation_matrix(width: int, config: RotationConfig) -> torch.Tensor:
    if config.kind == "hadamard":
        return random_hadamard_matrix(width, config.seed)
    return random_orthogonal_matrix(width, config.seed)


@torch.no_grad()
def install_online_rotation(model: nn.Module, path: str, spec: dict[str, Any], fold: bool) -> OnlineRotatedLinear:
    """Put an online rotation R in front of the linear at `path`; with `fold`, its weight becomes W·R."""
    linear = model.get_submodule(path)
    rotation = OnlineRotation(spec).to(linear.weight.device)
    if fold:
        _set_weight(linear, linear.weight.double() @ rotation.matrix())
    wrapped = OnlineRotatedLinear.wrap(linear, rotation)
    set_submodule(model, path, wrapped)
    return wrapped


def online_rotation_specs(model: nn.Module, family: DecoderFamily, config: RotationConfig) -> dict[str, dict]:
    """Spec of every online rotation, checked before any weight changes so a bad width loses nothing.

    The o_proj rotation spans its whole input (heads × head_dim): head counts like 9 or 14 have no
    Hadamard matrix of their own, but their product with head_dim usually has one.
    """
    specs: dict[str, dict] = {}
    for index, layer in enumerate(decoder_layers(model, family)):
        prefix = f"{family.layers}.{index}"
        for offset, local_path in enumerate((family.attention_output, family.mlp_output)):
            width = layer.get_submodule(local_path).in_features
            specs[f"{prefix}.{local_path}"] = online_rotation_spec(width, config.kind, config.seed + 1 + offset)
    return specs


@torch.no_grad()
def rotate_model(model: nn.Module, family: DecoderFamily, config: RotationConfig) -> dict[str, Any]:
    """Rotate `model` in place; returns the manifest section that lets a loader rebuild its structure."""
    hidden_size = model.get_submodule(family.embed_tokens).weight.shape[1]
    rotation = residual_rotation_matrix(hidden_size, config)
    online_specs = online_rotation_specs(model, family, config) if config.online else {}

    untie_word_embeddings(model, family)
    fold_all_norms(model, family)
    rotate_weight_rows(model.get_submodule(family.embed_tokens), rotation)
    for layer in decoder_layers(model, family):
        for path in (*family.attention_inputs, *family.mlp_inputs):
            rotate_weight_rows(layer.get_submodule(path), rotation)
        for path in (family.attention_output, family.mlp_output):
            rotate_linear_output(layer.get_submodule(path), rotation)
    rotate_weight_rows(model.get_submodule(family.lm_head), rotation)
    for path, spec in online_specs.items():
        install_online_rotation(model, path, spec, fold=True)
    return {"kind": config.kind, "seed": config.seed, "residual_width": hidden_size,
            "online": online_specs}


def install_rotation_structure(model: nn.Module, rotation_section: dict[str, Any]) -> None:
    """Rebuild the online-rotation modules of a saved rotated model (its weights already hold W·R)."""
    for path, spec in rotation_section.get("online", {}).items():
        install_online_rotation(model, path, spec, fold=False)
