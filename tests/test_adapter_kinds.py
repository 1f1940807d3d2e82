"""Adapter kinds are registered once (adapters/kinds.py) and every stage reaches them through one interface:
per-linear adapters and LoR2C paths install, list their tensors, rebuild from their manifest section and
report their side paths the same way, and no module outside adapters/ imports LoR2C's own code."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from rotaq.adapters.config import AdapterConfig, default_pre_num, resolve_targets
from rotaq.adapters.kinds import (ADAPTER_KINDS, adapter_kind, adapter_type_names, install_adapter,
                                  install_adapter_structure, installed_adapter)
from rotaq.adapters.lor2c_config import Lor2cConfig
from rotaq.adapters.structure import adapter_state_dict, mark_only_adapters_trainable
from rotaq.pipeline.errors import RotaqError
from rotaq.pipeline.families import family_for_model
from tests.tiny_models import tiny_model

ROOT = Path(__file__).resolve().parents[1]


def test_every_kind_resolves_and_every_type_has_one_kind() -> None:
    names = adapter_type_names()
    assert len(names) == len(set(names)) and {"lora", "reslora-ms", "lor2c", "inject-lor2c"} <= set(names)
    for kind in ADAPTER_KINDS:
        for field in ("config", "install", "install_structure"):
            assert callable(kind.resolve(field)), (kind.name, field)
        assert all(adapter_kind(name) is kind for name in kind.types)
    with pytest.raises(RotaqError, match="unknown adapter type 'dora'"):
        adapter_kind("dora")


def _config(name: str, model: torch.nn.Module) -> AdapterConfig | Lor2cConfig:
    if adapter_kind(name).name == "lor2c":
        return Lor2cConfig(kind=name, rank=4)
    return AdapterConfig(kind=name, targets=resolve_targets(None, family_for_model(model)), rank=4,
                         pre_num=default_pre_num(name))


@pytest.mark.parametrize("name", ["lora", "reslora-ms", "lor2c", "share-lor2c", "inject-lor2c"])
def test_one_interface_for_every_kind(name: str) -> None:
    model = tiny_model("llama-untied", num_hidden_layers=3)
    family = family_for_model(model)
    installed = install_adapter(model, family, _config(name, model), seed=3)
    assert installed_adapter(model) is installed
    with pytest.raises(RotaqError, match="already has"):
        install_adapter(model, family, _config(name, model))
    tensors = adapter_state_dict(model)
    parameters = mark_only_adapters_trainable(model)
    assert sum(p.numel() for p in parameters) == sum(t.numel() for t in {id(t): t for t in tensors.values()}.values())
    assert set(tensors) <= set(model.state_dict())
    spans_layers = adapter_kind(name).name == "lor2c"
    assert bool(installed.side_paths()) == spans_layers
    assert bool(installed.describe()) == spans_layers
    assert installed.change_steps(100) == ([] if name not in ("merge-lor2c", "inject-lor2c") else [33, 66])

    # What a finetune folder's manifest carries rebuilds the same tensors under the same names.
    section = {**installed.config.to_section(), **installed.describe()}
    fresh = tiny_model("llama-untied", num_hidden_layers=3)
    rebuilt = install_adapter_structure(fresh, family, section)
    assert installed_adapter(fresh) is rebuilt
    assert {k: tuple(v.shape) for k, v in adapter_state_dict(fresh).items()} == \
        {k: tuple(v.shape) for k, v in tensors.items()}


def test_no_module_outside_adapters_imports_lor2c_code_at_run_time() -> None:
    """Stages reach LoR2C paths through rotaq.adapters.kinds; only type annotations may name its classes."""
    problems = []
    for package in ("pipeline", "rotations", "quantizers", "export", "eval"):
        for path in (ROOT / package).rglob("*.py"):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            guarded = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and getattr(block.test, "id", None) == "TYPE_CHECKING" for node in ast.walk(block)}
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rotaq.adapters.lor2c") \
                        and id(node) not in guarded:
                    problems.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {node.module}")
    assert not problems, problems
