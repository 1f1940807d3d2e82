"""The LoR2C path score: which paths merge-lor2c merges and inject-lor2c replaces.

A path's score is computed from the singular values σ of s·B A. The default, their mean (`mean`), grows
with the size of the path's update, so merge takes the pair carrying least of it and inject the path
carrying most; it is also what the authors' code (github.com/Oblivioniss/LoR2C) uses unless `sfs_k` is
given. `top-share`, the share of the top-k singular values in their sum (their SFS with `sfs_k`), says how
concentrated an update is, not how large: scaling a path's B leaves it unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from rotaq.adapters.lor2c_config import Lor2cConfig


def path_score(path: nn.Module, config: Lor2cConfig) -> float:
    """Score of a path from the singular values of s·B·A (rank-sized: computed from the r × r core)."""
    with torch.no_grad():
        # σ(B A) = σ(R_B R_Aᵀ) with B = Q_B R_B and Aᵀ = Q_A R_A, which avoids a hidden × hidden SVD.
        r_b = torch.linalg.qr(path.lora_B.double(), mode="r").R
        r_a = torch.linalg.qr(path.lora_A.double().T, mode="r").R
        singular = torch.linalg.svdvals(path.scaling * (r_b @ r_a.T))
    if config.score == "mean":
        return float(singular.mean())
    total = float(singular.sum())
    return float(singular[:config.top_k].sum()) / total if total > 0 else 0.0
