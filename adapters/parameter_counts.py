"""Trainable parameters of every adapter type at one rank, for `rotaq finetune --dry-run`.

Counted from the model's own linear shapes, so any supported family (GQA, non-square MLPs) is right:
(Res)LoRA trains r·(in + out) per adapted linear (ResLoRA's shortcuts reuse those matrices); a LoR2C
path trains r·hidden for A and hidden·r for B; share-lor2c keeps one A; merge-lor2c loses one path per
merge; inject-lor2c trades one path for LoRA on q_proj and v_proj of its layer.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from rotaq.adapters.config import ADAPTER_TYPES, resolve_targets
from rotaq.adapters.lor2c_config import (DEFAULT_CHANGES, INJECT_LOR2C, LOR2C, MERGE_LOR2C, SHARE_LOR2C,
                                  Lor2cConfig, inject_targets, lor2c_parameter_count)
from rotaq.pipeline.families import DecoderFamily, decoder_layers


def adapter_parameter_counts(model: nn.Module, family: DecoderFamily, rank: int, targets: str | None = None,
                             merges: int = DEFAULT_CHANGES[MERGE_LOR2C],
                             injections: int = DEFAULT_CHANGES[INJECT_LOR2C]) -> list[dict[str, Any]]:
    """One row per adapter type: trainable parameters and their ratio to LoRA's at the same rank."""
    layers = decoder_layers(model, family)
    first = layers[0]
    lora = sum(rank * (linear.in_features + linear.out_features)
               for projection in resolve_targets(targets, family)
               for linear in (layer.get_submodule(projection) for layer in layers))
    hidden = first.get_submodule(family.query).in_features
    per_path = 2 * rank * hidden
    injected_lora = sum(rank * (first.get_submodule(p).in_features + first.get_submodule(p).out_features)
                        for p in inject_targets(family))
    counts = {kind: (lora, "shortcuts reuse the adapters' matrices" if kind != "lora" else "") for kind in ADAPTER_TYPES}
    counts[LOR2C] = (lor2c_parameter_count(hidden, len(layers), Lor2cConfig(rank=rank)), "one path per layer")
    counts[SHARE_LOR2C] = (lor2c_parameter_count(hidden, len(layers), Lor2cConfig(kind=SHARE_LOR2C, rank=rank)),
                           "one A shared by every path")
    counts[MERGE_LOR2C] = (counts[LOR2C][0] - merges * per_path, f"after {merges} merge(s)")
    counts[INJECT_LOR2C] = (counts[LOR2C][0] + injections * (injected_lora - per_path),
                            f"after {injections} injection(s) of LoRA on q_proj, v_proj")
    return [{"adapter": kind, "trainable_parameters": count, "vs_lora": count / lora, "note": note}
            for kind, (count, note) in counts.items()]
