"""A sweep file: which `rotaq run` configurations to compare, read and validated before anything runs.

    config: demo.yaml            # optional base configuration (relative to this file)
    set:                         # optional: fixed overrides applied to every variant
      finetune.steps: 20
    grid:                        # every combination of these values is one variant
      quantize.weights: [rtn, gptq]
      rotate.enabled: [true, false]
    variants:                    # optional: a list of override sets, crossed with the grid
      - {finetune.enabled: false}
      - {finetune.adapter: lora}

Keys are the dotted keys of `rotaq run --help`. A scalar given for a list key (`quantize.schemes: w4a4`)
means a one-element list, so a grid over schemes compares one scheme per variant.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rotaq.pipeline.run.config_loading import ConfigError, apply_override, config_from_mapping, read_run_yaml, read_yaml_mapping
from rotaq.pipeline.run.config import RunConfig

SWEEP_KEYS = ("config", "set", "grid", "variants")
SLUG_LIMIT = 80


@dataclass(frozen=True)
class Variant:
    """One configuration of the sweep: its swept values (what tells it apart) and the whole config."""

    name: str  # folder name, derived from the values, so the same values always land in the same folder
    values: dict[str, Any]
    config: RunConfig


@dataclass(frozen=True)
class SweepSpec:
    base: dict[str, Any]  # the base configuration mapping (with the fixed `set` overrides applied)
    grid: dict[str, list[Any]]
    variants: list[dict[str, Any]]
    origin: str

    @property
    def swept_keys(self) -> list[str]:
        """Every key that varies, in the order the file names them."""
        keys = list(self.grid)
        for overrides in self.variants:
            keys += [key for key in overrides if key not in keys]
        return keys

    def expand(self) -> list[Variant]:
        """Every variant, validated: a bad key or value fails here, naming the variant, before any stage runs."""
        combinations = [dict(zip(self.grid, values, strict=True)) for values in itertools.product(*self.grid.values())]
        expanded = [{**point, **overrides} for point in combinations for overrides in (self.variants or [{}])]
        variants, names = [], set()
        for values in expanded:
            raw = copy.deepcopy(self.base)
            for key, value in values.items():
                apply_override(raw, key, _as_list_if_needed(key, value))
            name = variant_name(values)
            config = config_from_mapping(raw, f"{self.origin}, variant {name}")
            if name in names:
                raise ConfigError(f"{self.origin}: variant {name} is listed twice")
            names.add(name)
            variants.append(Variant(name, values, config))
        return variants


def load_sweep(path: Path, base_config: Path | None = None, overrides: Sequence[tuple[str, Any]] = ()) -> SweepSpec:
    """Read and check a sweep file; `base_config` (from the command line) replaces the file's `config`."""
    raw = read_yaml_mapping(path)
    unknown = sorted(set(raw) - set(SWEEP_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown sweep key(s) {', '.join(unknown)}; a sweep file holds "
                          f"{', '.join(SWEEP_KEYS)} (option keys go under grid:, variants: or set:)")
    base_path = base_config or (path.parent / raw["config"] if raw.get("config") else None)
    base = read_run_yaml(Path(base_path)) if base_path is not None else {}
    for key, value in [*_mapping(raw.get("set") or {}, path, "set").items(), *overrides]:
        apply_override(base, key, _as_list_if_needed(key, value))
    grid = _mapping(raw.get("grid") or {}, path, "grid")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: grid.{key} must be a non-empty list of values, got {values!r}")
    variants = raw.get("variants") or []
    if not isinstance(variants, list):
        raise ConfigError(f"{path}: variants must be a list of mappings of option keys to values")
    variants = [_mapping(item, path, f"variants[{index}]") for index, item in enumerate(variants)]
    if not grid and not variants:
        raise ConfigError(f"{path}: nothing to sweep; give grid: (lists of values) and/or variants:")
    spec = SweepSpec(base, dict(grid), variants, str(path))
    config_from_mapping(base, f"{path} (base configuration)")
    return spec


def variant_name(values: Mapping[str, Any]) -> str:
    """`weights=gptq_rotate=off` style: readable, stable, and safe as a folder name."""
    parts = [f"{_short_key(key, values)}={_value_text(value)}" for key, value in values.items()]
    slug = re.sub(r"[^A-Za-z0-9=._+-]+", "-", "_".join(parts)) or "base"
    if len(slug) > SLUG_LIMIT:
        slug = f"{slug[:SLUG_LIMIT - 13]}-{hashlib.sha256(slug.encode()).hexdigest()[:12]}"
    return slug


def _short_key(key: str, values: Mapping[str, Any]) -> str:
    """The last part of a dotted key (the section for `section.enabled`: rotate=off), unless another swept key
    ends the same way."""
    section, _, last = key.rpartition(".")
    if last == "enabled" and section:
        return section
    clashes = [other for other in values if other != key and other.rsplit(".", 1)[-1] == last]
    return key if clashes else last


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return "+".join(map(_value_text, value))
    return str(value)


def _as_list_if_needed(key: str, value: Any) -> Any:
    """A scalar for a list-valued key becomes a one-element list."""
    default: Any = RunConfig()
    for part in key.split("."):
        default = getattr(default, part, None)
    return [value] if isinstance(default, tuple) and not isinstance(value, (list, tuple)) else value


def _mapping(value: Any, path: Path, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: {where} must be a mapping of option keys to values, got {value!r}")
    return {str(key): item for key, item in value.items()}
