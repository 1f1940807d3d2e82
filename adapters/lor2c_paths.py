"""LoR2C paths at run time: low-rank residual connections that span whole decoder layers, the hooks that
apply them, and the structure changes of merge-lor2c and inject-lor2c.

A path p spans layers first(p)..last(p) and adds, to the output hidden state of layer last(p),

    s·B_p A_p h_in,   h_in = the input hidden state of layer first(p),   s = alpha / r

(A Kaiming-initialised, B zero, so a new path changes nothing). On a rotated model the hidden states
are in the rotated basis and so are the paths. A path is attached with forward hooks on the decoder
layers (a pre-hook on its first layer keeps h_in, a hook on its last layer adds the product), so the
decoder layers themselves stay the Hugging Face modules and every other stage still sees them.

`merge_weakest_pair` replaces the adjacent pair of paths with the smallest summed score by one path from
the input of the first to the output of the second; `inject_lora` removes the path with the largest score
and puts plain LoRA on q_proj and v_proj of its layer. The variants and the schedule are configured in
adapters/lor2c_config.py, the score is adapters/lor2c_scores.py, and GPTQ's layer-at-a-time runner is
adapters/lor2c_layer_by_layer.py. `Lor2cPaths` is the LoR2C kind's `InstalledAdapter` (adapters/kinds.py).

Written here rather than taken from PEFT: PEFT adapts modules one by one and has no adapter that spans
a nonlinear block from one layer's input to another layer's output.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from rotaq.adapters.kinds import attach, detach, refuse_installed
from rotaq.adapters.layers import LowRankAdapter
from rotaq.adapters.lor2c_config import INJECT_LOR2C, MERGE_LOR2C, SHARE_LOR2C, Lor2cConfig, inject_targets
from rotaq.adapters.lor2c_layer_by_layer import LayerByLayer
from rotaq.adapters.lor2c_scores import path_score
from rotaq.pipeline.errors import ArtifactError, RotaqError
from rotaq.pipeline.families import DecoderFamily, decoder_layers, set_submodule

SIDE_PATHS = "rotaq_side_paths"  # the submodule holding the paths: their state-dict prefix


class ResidualPath(nn.Module):
    """s·B·A from the input of layer `first` to the output of layer `last` (first ≤ last)."""

    def __init__(self, first: int, last: int, lora_A: nn.Parameter, lora_B: nn.Parameter, scaling: float) -> None:
        super().__init__()
        self.first, self.last, self.scaling = first, last, scaling
        self.lora_A = lora_A  # possibly shared with other paths (share-lor2c)
        self.lora_B = lora_B

    def forward(self, hidden_in: Tensor) -> Tensor:
        return self.scaling * (hidden_in @ self.lora_A.T) @ self.lora_B.T

    def delta(self) -> Tensor:
        """s·B·A (hidden × hidden)."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def extra_repr(self) -> str:
        return f"layers {self.first}..{self.last}, rank={self.lora_A.shape[0]}"


class LoraLinear(nn.Module):
    """A frozen linear plus a plain LoRA adapter (what inject-lor2c puts on q_proj / v_proj)."""

    def __init__(self, base: nn.Linear, adapter: LowRankAdapter, scaling: float) -> None:
        super().__init__()
        self.base, self.adapter, self.scaling = base, adapter, scaling

    def forward(self, inputs: Tensor) -> Tensor:
        return self.base(inputs) + self.scaling * self.adapter.up(self.adapter.down(inputs))


class SidePathModule(nn.Module):
    """Holds the paths as a submodule of the model (`rotaq_side_paths`), so their tensors are part of its
    state dict: saved with the model, moved with it, and loaded strictly once the spans are rebuilt."""

    def __init__(self) -> None:
        super().__init__()
        self.paths = nn.ModuleList()


@dataclass
class Lor2cPaths:
    """The paths installed in one model, the hooks that run them, and any injected LoRA."""

    config: Lor2cConfig
    family: DecoderFamily
    layers: nn.ModuleList
    module: SidePathModule
    seed: int = 0
    injected: dict[str, LoraLinear] = field(default_factory=dict)
    reset_hook: RemovableHandle | None = None
    _inputs: dict[int, Tensor] = field(default_factory=dict)
    _hooks: list[RemovableHandle] = field(default_factory=list)

    @property
    def paths(self) -> nn.ModuleList:
        return self.module.paths

    @property
    def shared_A(self) -> nn.Parameter | None:
        """share-lor2c: the one A of every path (owned by the first path)."""
        return self.paths[0].lora_A if self.config.kind == SHARE_LOR2C and len(self.paths) else None

    def spans(self) -> list[tuple[int, int]]:
        return [(path.first, path.last) for path in self.paths]

    def injected_layers(self) -> list[int]:
        return sorted({int(path.split(".")[-3]) for path in self.injected})

    def describe(self) -> dict[str, Any]:
        """The structure, to rebuild it before tensors are loaded (checkpoints, stage folders)."""
        return {"spans": [list(span) for span in self.spans()], "injected_layers": self.injected_layers()}

    def parameters(self) -> Iterator[nn.Parameter]:
        """Every trainable tensor once (a shared A counts once), paths first, then injected LoRA."""
        seen: set[int] = set()
        modules = [*self.paths, *(linear.adapter for linear in self.injected.values())]
        for module in modules:
            for parameter in module.parameters():
                if id(parameter) not in seen:
                    seen.add(id(parameter))
                    yield parameter

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def parameter_count(self) -> int:
        return sum(parameter.numel() for parameter in self.parameters())

    def rebuild(self, structure: dict[str, Any]) -> None:
        self.build([tuple(span) for span in structure["spans"]], list(structure["injected_layers"]))

    def change_steps(self, total_steps: int) -> list[int]:
        return self.config.change_steps(total_steps, len(self.layers))

    def track_input_norms(self, enabled: bool) -> None:
        """Nothing to measure: LoR2C paths have no shortcuts whose merge needs input norms."""

    def side_paths(self) -> list[nn.Module]:
        return list(self.paths)

    def named_tensors(self, model: nn.Module) -> dict[str, Tensor]:
        """Every trainable tensor under its (first) name in the model's state dict."""
        own = {id(parameter) for parameter in self.parameters()}
        return {name: parameter.detach() for name, parameter in model.named_parameters() if id(parameter) in own}

    def scores(self) -> list[float]:
        """One score per path, in path order (see the module docstring)."""
        return [path_score(path, self.config) for path in self.paths]

    def change_structure(self) -> dict[str, Any]:
        """One scheduled change of merge-lor2c or inject-lor2c; returns the scores it acted on and the new
        structure, as the training log records them."""
        scores = self.scores()
        if self.config.kind == MERGE_LOR2C:
            self.merge_weakest_pair()
        elif self.config.kind == INJECT_LOR2C:
            self.inject_lora()
        else:
            raise RotaqError(f"{self.config.kind} has no structure changes")
        return {"scores_before": scores, **self.describe(), "trainable_parameters": self.parameter_count()}

    def merge_weakest_pair(self) -> list[nn.Parameter]:
        """Replace the adjacent pair (p, q), last(p) + 1 = first(q), with the smallest summed score by one path
        first(p)..last(q), freshly initialised; returns its parameters for the optimizer."""
        scores = self.scores()
        pairs = [index for index in range(len(self.paths) - 1)
                 if self.paths[index].last + 1 == self.paths[index + 1].first]
        if not pairs:
            raise RotaqError("no adjacent pair of LoR2C paths is left to merge")
        index = min(pairs, key=lambda i: scores[i] + scores[i + 1])
        first, last = self.paths[index].first, self.paths[index + 1].last
        merged = self._new_path(first, last)
        self.module.paths = nn.ModuleList([*self.paths[:index], merged, *self.paths[index + 2:]])
        self._rehook()
        return [merged.lora_A, merged.lora_B] if self.config.kind != SHARE_LOR2C else [merged.lora_B]

    def inject_lora(self) -> tuple[int, list[nn.Parameter]]:
        """Remove the path with the largest score; put LoRA on q_proj and v_proj of its (first) layer.
        Returns the layer and the new parameters for the optimizer."""
        scores = self.scores()
        index = max(range(len(scores)), key=scores.__getitem__)
        layer = self.paths[index].first
        self.module.paths = nn.ModuleList([path for i, path in enumerate(self.paths) if i != index])
        self._rehook()
        return layer, self._inject_at(layer)

    def _inject_at(self, layer: int) -> list[nn.Parameter]:
        added: list[nn.Parameter] = []
        for number, projection in enumerate(inject_targets(self.family)):
            path = f"{self.family.layers}.{layer}.{projection}"
            base = self.layers[layer].get_submodule(projection)
            if isinstance(base, LoraLinear):
                continue
            adapter = LowRankAdapter(base.in_features, base.out_features, self.config.rank, 0.0,
                                     dtype=base.weight.dtype)
            adapter.reset_parameters(self._generator(layer, layer, 1 + number))
            adapter.to(base.weight.device)
            wrapped = LoraLinear(base, adapter, self.config.scaling)
            set_submodule(self.layers[layer], projection, wrapped)
            self.injected[path] = wrapped
            added += list(adapter.parameters())
        return added

    def _generator(self, first: int, last: int, salt: int = 0) -> torch.Generator:
        """A generator per span (and injected projection): a path's initial A depends only on the seed and
        where it sits, so a run resumed after a merge initialises what an uninterrupted run would."""
        return torch.Generator().manual_seed(((self.seed * 1_000_003 + first) * 1009 + last) * 7 + salt)

    def _new_path(self, first: int, last: int) -> ResidualPath:
        """A (Kaiming, or the shared one) and a zero B: the new path adds nothing until B is trained."""
        hidden = self.hidden_size()
        reference = next(self.layers[first].parameters())
        lora_A = self.shared_A
        if lora_A is None:
            initial = torch.empty(self.config.rank, hidden, dtype=reference.dtype)
            nn.init.kaiming_uniform_(initial, a=5 ** 0.5, generator=self._generator(first, last))
            lora_A = nn.Parameter(initial.to(reference.device))
        lora_B = nn.Parameter(torch.zeros(hidden, self.config.rank, dtype=reference.dtype, device=reference.device))
        return ResidualPath(first, last, lora_A, lora_B, self.config.scaling)

    def hidden_size(self) -> int:
        return int(self.layers[0].get_submodule(self.family.query).in_features)

    def build(self, spans: list[tuple[int, int]], injected_layers: list[int] = ()) -> None:
        """Set the paths to `spans` (fresh initialisation) and LoRA on the injected layers, then hook them."""
        self.module.paths = nn.ModuleList()
        for first, last in spans:
            if not 0 <= first <= last < len(self.layers):
                raise ArtifactError(f"LoR2C span {first}..{last} does not fit a model with {len(self.layers)} layers")
            self.paths.append(self._new_path(first, last))
        for layer in injected_layers:
            self._inject_at(int(layer))
        self._rehook()

    def _rehook(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        starts = {path.first for path in self.paths}
        ends: dict[int, list[ResidualPath]] = {}
        for path in self.paths:
            ends.setdefault(path.last, []).append(path)
        for index in sorted(starts):
            self._hooks.append(self.layers[index].register_forward_pre_hook(
                _keep_input(self._inputs, index), with_kwargs=True))
        for index, paths in sorted(ends.items()):
            self._hooks.append(self.layers[index].register_forward_hook(_add_paths(self._inputs, paths)))

    @contextmanager
    def layer_by_layer(self) -> Iterator[LayerByLayer]:
        """Run the paths for a caller that feeds the decoder layers one at a time over many batches (GPTQ
        calibration), where the hooks would see layer i for every batch before layer j for any."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        try:
            yield LayerByLayer(list(self.paths))
        finally:
            self._rehook()

    def remove(self, model: nn.Module) -> None:
        """Detach every hook, the path module and every injected wrapper (the base linears go back in place)."""
        for handle in [*self._hooks, *([self.reset_hook] if self.reset_hook else [])]:
            handle.remove()
        self._hooks.clear()
        for path, wrapped in self.injected.items():
            set_submodule(model, path, wrapped.base)
        self.injected.clear()
        detach(model)
        if SIDE_PATHS in model._modules:
            delattr(model, SIDE_PATHS)

    def fold_injected(self, model: nn.Module) -> dict[str, Tensor]:
        """Fold every injected LoRA into its base weight (W + s·B·A, exact); returns the new weights by path."""
        merged = {}
        with torch.no_grad():
            for path, wrapped in self.injected.items():
                wrapped.base.weight.add_(wrapped.scaling * wrapped.adapter.delta_weight().to(wrapped.base.weight.dtype))
                merged[path] = wrapped.base.weight.detach()
                set_submodule(model, path, wrapped.base)
        self.injected.clear()
        return merged


def _hidden_argument(args: tuple, kwargs: dict[str, Any]) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _keep_input(inputs: dict[int, Tensor], layer: int) -> Any:
    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        inputs[layer] = _hidden_argument(args, kwargs)
    return hook


def _add_paths(inputs: dict[int, Tensor], paths: list[ResidualPath]) -> Any:
    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        for path in paths:
            hidden = hidden + path(inputs[path.first])
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
    return hook


def install_lor2c(model: nn.Module, family: DecoderFamily, config: Lor2cConfig, seed: int = 0,
                  spans: list[tuple[int, int]] | None = None, injected_layers: list[int] = ()) -> Lor2cPaths:
    """Zero-effect paths (default: one per decoder layer; A shared for share-lor2c), plus LoRA on the given
    injected layers; returns the installed paths."""
    refuse_installed(model, "this model already has LoR2C paths or adapters")
    layers = decoder_layers(model, family)
    module = SidePathModule()
    installed = Lor2cPaths(config, family, layers, module, seed)
    installed.build(spans if spans is not None else [(index, index) for index in range(len(layers))],
                    list(injected_layers))
    model.add_module(SIDE_PATHS, module)
    # A new forward pass starts with no kept inputs, so nothing of the last pass (or its graph) lingers.
    installed.reset_hook = model.register_forward_pre_hook(lambda module, args: installed._inputs.clear())
    attach(model, installed)
    return installed


def install_lor2c_structure(model: nn.Module, family: DecoderFamily, section: dict[str, Any]) -> Lor2cPaths:
    """Rebuild the paths (and injected LoRA) a manifest section describes; tensors are loaded afterwards."""
    return install_lor2c(model, family, Lor2cConfig.from_section(section),
                         spans=[tuple(span) for span in section["spans"]],
                         injected_layers=section.get("injected_layers", []))


def side_path_section(paths: Lor2cPaths) -> dict[str, Any]:
    """The manifest's 'side_paths' section of a merged model: what rebuilds the paths and what they cost.

    Per token a path of rank r on hidden width h costs two matmuls, h·r and r·h multiply-adds: 4·r·h FLOPs
    (a shared A is still applied once per path, to that path's own input).
    """
    hidden = paths.hidden_size()
    flops = 4 * paths.config.rank * hidden * len(paths.paths)
    return {**paths.config.to_section(), "spans": [list(span) for span in paths.spans()],
            "shared_A": paths.config.kind == SHARE_LOR2C, "parameters": paths.parameter_count(),
            "flops_per_token": flops}
