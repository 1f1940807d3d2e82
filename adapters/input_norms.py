"""Input-norm statistics for the paper's merge of ResLoRA shortcuts.

ResLoRA merges a shortcut x_{n-k} into layer n by assuming x_{n-k} ≈ α·x_n with α the ratio of the
mean input norms, ‖x_{n-k}‖ / ‖x_n‖, measured during training. This module keeps the mean per-token
norm of every shortcut projection's input over the last `NORM_BATCHES` training batches.
"""

from __future__ import annotations

from collections import deque

from rotaq.adapters.config import AdapterConfig
from rotaq.adapters.kinds import InstalledAdapter

NORM_BATCHES = 100


class InputNormHistory:
    """Per projection and layer, the mean ‖x_n‖ of each of the last `window` training batches."""

    def __init__(self, installed: InstalledAdapter, window: int = NORM_BATCHES) -> None:
        """Adapters without shortcuts to merge (LoRA, ResLoRA-bs, LoR2C paths) keep no statistics."""
        self.installed = installed
        has_shortcuts = installed.config.has_shortcuts
        layer_count = len(installed.decoder_layers) if has_shortcuts else 0
        projections = installed.chains if has_shortcuts else {}
        self.history = {p: [deque(maxlen=window) for _ in range(layer_count)] for p in projections}

    def commit_batch(self) -> None:
        """Append what the last forward pass measured (called once per training micro-batch)."""
        for projection, per_layer in self.history.items():
            for layer, norm in self.installed.chains[projection].current_input_norms().items():
                per_layer[layer].append(norm)

    def mean_norms(self) -> dict[str, list[float]]:
        return {projection: [sum(values) / len(values) if values else float("nan") for values in per_layer]
                for projection, per_layer in self.history.items()}

    def state_dict(self) -> dict[str, list[list[float]]]:
        return {projection: [list(values) for values in per_layer] for projection, per_layer in self.history.items()}

    def load_state_dict(self, state: dict[str, list[list[float]]]) -> None:
        for projection, per_layer in self.history.items():
            for values, saved in zip(per_layer, state[projection]):
                values.clear()
                values.extend(saved)


def norm_ratios(mean_norms: dict[str, list[float]], config: AdapterConfig) -> dict[str, list[list[float]]]:
    """α_{n,k} = mean‖x_{n-k}‖ / mean‖x_n‖, per projection and layer, in `config.shortcut_sources(n)` order."""
    return {projection: [[norms[layer - k] / norms[layer] for k, _ in config.shortcut_sources(layer)]
                         for layer in range(len(norms))]
            for projection, norms in mean_norms.items()}
