"""Which stage instances a run needs, in order, with their inputs and cache keys.

The float model goes source → rotate → finetune → merge; each quantize scheme then branches off the last
float model into quantize → export (plus a float export as the baseline); one bench times every export. Outliers,
one evaluation per model, results.json and the report follow. A stage that is disabled is left out; one
that is not available in this codebase is listed as skipped, and so is everything that needs its output,
while the float lineage continues from the last stage that does run.

A sweep (`rotaq.pipeline.sweep.execute`) plans each of its variants with a shared `store`: every stage but the
per-run results and report then writes to `store/<name>-<key>` with its marker beside it, so two
variants that agree on a stage's options and inputs compute the same key and share one output.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rotaq.pipeline.run.config import RunConfig
from rotaq.pipeline.run.stage_cache import key_material, marker_path, stage_key
from rotaq.pipeline.run.stage_registry import STAGES, StageDefinition

SOURCE = "source"
"""The input name of the model the run starts from (not a stage: it is read where it is)."""
PER_RUN_STAGES = ("results", "report")
"""Stages that describe one run as a whole: never shared through a sweep's store."""
SCRATCH_FOLDER = "scratch"
STORE_KEY_CHARS = 16


@dataclass(frozen=True)
class PlannedStage:
    name: str  # unique in the run, e.g. quantize-w4a4; also names the marker and, usually, the output
    definition: StageDefinition
    inputs: dict[str, str]  # role -> stage instance name, or SOURCE
    options: dict[str, Any]
    key_material: dict[str, Any]
    key: str
    output: Path
    marker: Path  # written when the output is complete, holding the key
    scratch: Path  # resumable state (checkpoints), named by the key so other options never resume it

    def record(self, run_folder: Path) -> dict[str, Any]:
        """This stage as run.json lists it (paths relative to the run folder; shared ones start with ..)."""
        def relative(path: Path) -> str:
            return os.path.relpath(path, run_folder)

        return {"name": self.name, "stage": self.definition.name, "inputs": self.inputs, "key": self.key,
                "output": relative(self.output), "done_file": relative(self.definition.done_path(self.output)),
                "marker": relative(self.marker)}


@dataclass(frozen=True)
class SkippedStage:
    name: str
    stage: str
    reason: str


@dataclass(frozen=True)
class RunPlan:
    source: str
    stages: list[PlannedStage]
    skipped: list[SkippedStage]

    def stage(self, name: str) -> PlannedStage:
        return next(stage for stage in self.stages if stage.name == name)

    def input_reference(self, upstream: str) -> str:
        """What a stage is given for an input: the source reference, or the upstream output's path."""
        return self.source if upstream == SOURCE else str(self.stage(upstream).output)


def plan_run(config: RunConfig, run_folder: Path, store: Path | None = None) -> RunPlan:
    plan = _PlanBuilder(config, run_folder, store)
    float_models = [SOURCE]  # the float lineage; each one is evaluated
    rotated = plan.add("rotate", "rotate", {"model": SOURCE}) if config.rotate.enabled else None
    if plan.will_run(rotated):
        float_models.append(rotated)
    if config.finetune.enabled:
        finetuned = plan.add("finetune", "finetune", {"model": float_models[-1]})
        merged = plan.add("merge", "merge", {"model": finetuned})
        if plan.will_run(merged):
            float_models.append(merged)
    branches = {"float": float_models[-1]} if config.export.float_baseline else {}
    quantized = []
    if config.quantize.enabled:
        for scheme in config.quantize.schemes:
            branches[scheme] = plan.add("quantize", f"quantize-{scheme}", {"model": float_models[-1]}, branch=scheme)
            if plan.will_run(branches[scheme]):
                quantized.append(branches[scheme])
    if config.export.enabled:
        exports = {branch: plan.add("export", f"export-{branch}", {"model": model}, branch=branch)
                   for branch, model in branches.items()}
        # One bench times every export (and the peer) in one interleaved run, so every ratio in the report
        # shares one float32 reference; its key is the set of exports it times.
        timed = {bench_role(branch): exported for branch, exported in exports.items() if plan.will_run(exported)}
        if config.bench.enabled and timed:
            plan.add("bench", "bench", timed)
    if config.outliers.enabled and plan.will_run(rotated):
        plan.add("outliers", "outliers", {"model": rotated, "before": SOURCE})
    evaluations = {}
    for model in float_models + quantized:
        reference = {"reference": SOURCE} if model != SOURCE else {}
        evaluations[model] = plan.add("evaluate", f"evaluate-{model}", {"model": model, **reference})
    plan.add("results", "results", evaluations)
    plan.add("report", "report", {stage.name: stage.name for stage in plan.stages})
    return RunPlan(config.model, plan.stages, plan.skipped)


def bench_role(branch: str) -> str:
    """The bench stage's input name for a branch's export: `model-float`, `model-w4a4`, ..."""
    return f"model-{branch}"


class _PlanBuilder:
    """Adds stage instances in run order, computing each key from the keys of the stages it reads."""

    def __init__(self, config: RunConfig, run_folder: Path, store: Path | None) -> None:
        self.config = config
        self.run_folder = run_folder
        self.store = store
        self.stages: list[PlannedStage] = []
        self.skipped: list[SkippedStage] = []
        self._keys = {SOURCE: f"source:{config.model}"}
        self._unavailable: dict[str, str | None] = {}

    def add(self, stage: str, name: str, inputs: dict[str, str], branch: str | None = None) -> str:
        """Plan one instance and return its name; if it cannot run, it is recorded as skipped instead."""
        definition = STAGES[stage]
        blocked = [upstream for upstream in inputs.values() if upstream not in self._keys]
        reason = f"needs {', '.join(blocked)}" if blocked else self._unavailable_reason(definition)
        if reason is not None:
            self.skipped.append(SkippedStage(name, stage, reason))
            return name
        options = definition.options(self.config, branch)
        material = key_material(stage, options, {role: self._keys[upstream] for role, upstream in inputs.items()})
        key = stage_key(material)
        self._keys[name] = key
        self.stages.append(PlannedStage(name, definition, inputs, options, material, key, *self._locations(
            definition, name, key)))
        return name

    def _locations(self, definition: StageDefinition, name: str, key: str) -> tuple[Path, Path, Path]:
        """Output, marker and scratch paths: in the run folder, or keyed in the shared store."""
        if self.store is None or definition.name in PER_RUN_STAGES:
            return (self.run_folder / definition.output_name(name), marker_path(self.run_folder, name),
                    self.run_folder / SCRATCH_FOLDER / f"{name}-{key[:12]}")
        stem = f"{name}-{key[:STORE_KEY_CHARS]}"
        suffix = Path(definition.output_name(name)).suffix if definition.done_file is None else ""
        return (self.store / f"{stem}{suffix}", self.store / f"{stem}.done.json",
                self.store / SCRATCH_FOLDER / stem)

    def will_run(self, name: str | None) -> bool:
        """False for an instance that was skipped, or never added (None)."""
        return name in self._keys

    def _unavailable_reason(self, definition: StageDefinition) -> str | None:
        if definition.name not in self._unavailable:
            reason = definition.unavailable_reason()
            self._unavailable[definition.name] = None if reason is None else f"not available: {reason}"
        return self._unavailable[definition.name]
