"""The layering, written down: which modules may import which (an import-linter-style contract on `ast`).

    commands        pipeline/cli.py and the orchestration packages' commands.py
        ↓
    orchestration   pipeline/sweep/  →  pipeline/report/  →  pipeline/run/     (each may import those to its right)
        ↓
    stages          rotations/, quantizers/, adapters/, export/, eval/
        ↓
    foundation      the modules directly in pipeline/: artifacts, atomic, errors, families, loading, data, options, ...

A module may import its own layer and the layers below it. Every import counts for layering, also one inside
a function; a lower module that needs a higher one's code names it in a lookup table resolved with importlib
(pipeline/structure.py's installers, pipeline/run/stage_registry.py's stages). Module-level imports must not
form a cycle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "rotations", "quantizers", "adapters", "export", "eval")
STAGE_PACKAGES = ("rotations", "quantizers", "adapters", "export", "eval")
ORCHESTRATION_PACKAGES = ("run", "report", "sweep")  # inside pipeline/, lowest first
RANK = {"foundation": 0, "stage": 1, "run": 2, "report": 3, "sweep": 4, "commands": 5}


def module_names() -> dict[str, Path]:
    names = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = [package, *path.relative_to(ROOT / package).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            names[".".join(["rotaq", *parts])] = path
    return names


def layer(module: str) -> str:
    parts = module.removeprefix("rotaq.").split(".")
    if parts[0] in STAGE_PACKAGES:
        return "stage"
    if parts[1:] == ["cli"] or (len(parts) > 2 and parts[1] in ORCHESTRATION_PACKAGES and parts[2] == "commands"):
        return "commands"
    if len(parts) > 1 and parts[1] in ORCHESTRATION_PACKAGES:
        return parts[1]
    return "foundation"


def test_every_pipeline_module_is_in_a_layer() -> None:
    """A new subpackage of pipeline/ must be placed in the contract, not counted as foundation by default."""
    subpackages = sorted(path.parent.name for path in (ROOT / "pipeline").glob("*/__init__.py"))
    assert subpackages == sorted(ORCHESTRATION_PACKAGES)
    assert layer("rotaq.pipeline.run.plan") == "run" and layer("rotaq.pipeline.sweep.commands") == "commands"
    assert layer("rotaq.pipeline.cli") == "commands" and layer("rotaq.pipeline.cli_args") == "foundation"


def imports(path: Path, top_level_only: bool) -> Iterator[tuple[int, str]]:
    """(line, rotaq module) of every import in the file (with `top_level_only`, those run at import time)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else ast.walk(tree)
    known = module_names()
    for node in nodes:
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                       for alias in node.names]
        else:
            continue
        for target in targets:
            if target.startswith("rotaq."):
                yield node.lineno, target


def test_no_module_imports_a_higher_layer() -> None:
    problems = []
    for module, path in module_names().items():
        for line, target in imports(path, top_level_only=False):
            if target in module_names() and RANK[layer(target)] > RANK[layer(module)]:
                problems.append(f"{path.relative_to(ROOT)}:{line}: {layer(module)} module imports "
                                f"{layer(target)} {target}")
    assert not problems, "\n".join(problems)


def test_module_level_imports_have_no_cycle() -> None:
    graph = {module: sorted({target for _, target in imports(path, top_level_only=True) if target in module_names()
                             and target != module})
             for module, path in module_names().items()}
    cycles = []
    state: dict[str, str] = {}

    def visit(module: str, stack: list[str]) -> None:
        state[module] = "open"
        for target in graph[module]:
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target):] + [module, target]))
            elif target not in state:
                visit(target, [*stack, module])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [])
    assert not cycles, "\n".join(cycles)


def test_every_structure_installer_resolves() -> None:
    """pipeline/structure.py names the stage installers as strings: each must exist where it says."""
    import importlib

    from rotaq.pipeline.structure import INSTALLERS

    for installer in INSTALLERS:
        assert callable(getattr(importlib.import_module(installer.module), installer.function)), installer
