"""`rotaq sweep`: run every variant of a sweep file, sharing the stages they have in common, then compare.

Each variant is an ordinary `rotaq run` into `OUT/variants/<name>`, planned with the sweep's store
(`OUT/store`): a stage's output lives there under its key, so variants that agree on a stage's options
and inputs share it (the rotation runs once; fine-tuning once per adapter setting), and an interrupted
sweep resumes stage by stage like a run. The comparison tables are rewritten after every variant, so
they are usable while the sweep is still running or after Ctrl-C.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rotaq.pipeline.errors import ArtifactError, RotaqError
from rotaq.pipeline.locks import LOCK_NAME, folder_lock
from rotaq.pipeline.run.execute import check_run_inputs, run_pipeline
from rotaq.pipeline.run.plan import plan_run
from rotaq.pipeline.sweep.spec import SweepSpec, Variant
from rotaq.pipeline.run.summary import variant_rows
from rotaq.pipeline.sweep.table import SWEEP_FORMAT, write_sweep_outputs

VARIANTS_FOLDER = "variants"
STORE_FOLDER = "store"
SWEEP_RECORD = "sweep.json"

ProgressLine = Callable[[str], None]


@dataclass(frozen=True)
class SharingPlan:
    """How much work the sweep shares: stage instances over all variants against distinct keys."""

    variants: list[Variant]
    instances: Counter[str]  # stage -> instances over all variants
    distinct: Counter[str]  # stage -> distinct keys (what actually runs)

    def describe(self) -> str:
        lines = [f"{len(self.variants)} variant(s):"] + [f"  {variant.name}" for variant in self.variants]
        lines.append("stages (instances over all variants → runs, the rest shared):")
        lines += [f"  {stage}: {self.instances[stage]} → {self.distinct[stage]}" for stage in self.instances]
        return "\n".join(lines)


def plan_sweep(spec: SweepSpec, out: Path) -> SharingPlan:
    """Plan every variant against the store without running anything (`rotaq sweep --dry-run`)."""
    variants = spec.expand()
    out = out.expanduser().resolve()
    instances: Counter[str] = Counter()
    keys: dict[str, set[str]] = {}
    for variant in variants:
        for stage in plan_run(variant.config, out / VARIANTS_FOLDER / variant.name, out / STORE_FOLDER).stages:
            instances[stage.definition.name] += 1
            keys.setdefault(stage.definition.name, set()).add(stage.key)
    return SharingPlan(variants, instances, Counter({stage: len(found) for stage, found in keys.items()}))


@dataclass(frozen=True)
class SweepOutcome:
    folder: Path
    outputs: dict[str, Path]
    failed: list[str]


def run_sweep(spec: SweepSpec, out: Path, progress: ProgressLine | None = None,
              show_stage_progress: bool = True, verify: bool = False) -> SweepOutcome:
    """Run each variant in turn (a variant that fails is recorded and the others go on; Ctrl-C stops)."""
    say = progress or (lambda line: None)
    variants = spec.expand()
    for model, data in dict.fromkeys((variant.config.model, variant.config.data) for variant in variants):
        check_run_inputs(model, data)  # before any variant runs
    folder = _prepare_sweep_folder(out)
    with folder_lock(folder):  # each variant's run also locks the store
        return _sweep_locked(spec, folder, variants, say, show_stage_progress, verify)


def _sweep_locked(spec: SweepSpec, folder: Path, variants: list[Variant], say: ProgressLine,
                  show_stage_progress: bool, verify: bool) -> SweepOutcome:
    statuses: dict[str, dict[str, Any]] = {variant.name: {"name": variant.name, "values": variant.values,
                                                          "status": "pending"} for variant in variants}
    outputs = _write_outputs(folder, spec, variants, statuses)  # marks the folder as this sweep's from the start
    for index, variant in enumerate(variants, 1):
        say(f"variant {index}/{len(variants)}: {variant.name}")
        started = time.perf_counter()
        try:
            outcome = run_pipeline(variant.config, folder / VARIANTS_FOLDER / variant.name,
                                   progress=lambda line: say(f"  {line}"), show_stage_progress=show_stage_progress,
                                   store=folder / STORE_FOLDER, verify=verify)
        except RotaqError as exc:
            statuses[variant.name].update(status="failed", error=str(exc))
            say(f"  failed: {exc}")
        except BaseException:
            statuses[variant.name]["status"] = "interrupted"
            outputs = _write_outputs(folder, spec, variants, statuses)
            raise
        else:
            ran = sum(1 for stage in outcome.stages.values() if stage.status == "done")
            statuses[variant.name].update(status="done", seconds=round(time.perf_counter() - started, 1),
                                          stages_run=ran, stages_reused=sum(
                                              1 for stage in outcome.stages.values() if stage.status == "cached"))
        outputs = _write_outputs(folder, spec, variants, statuses)
    failed = [name for name, status in statuses.items() if status["status"] == "failed"]
    return SweepOutcome(folder, outputs, failed)


def _write_outputs(folder: Path, spec: SweepSpec, variants: list[Variant],
                   statuses: dict[str, dict[str, Any]]) -> dict[str, Path]:
    rows = [row for variant in variants
            for row in variant_rows(folder / VARIANTS_FOLDER / variant.name, variant.name, variant.values)]
    return write_sweep_outputs(folder, rows, spec.swept_keys, [statuses[variant.name] for variant in variants],
                               f"rotaq sweep: {spec.origin}")


def _prepare_sweep_folder(out: Path) -> Path:
    """Create the sweep folder; refuse a non-empty folder that holds no earlier sweep."""
    folder = out.expanduser().resolve()
    record = folder / SWEEP_RECORD
    if folder.exists() and (not folder.is_dir() or (any(path.name != LOCK_NAME for path in folder.iterdir())
                                                  and not _is_sweep_record(record))):
        raise ArtifactError(f"refusing to sweep into {folder}: it exists, is not empty and holds no {SWEEP_RECORD} "
                            "of an earlier sweep (pick a new --out, or an earlier sweep's folder to resume it)")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _is_sweep_record(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("format") == SWEEP_FORMAT
    except (OSError, json.JSONDecodeError, AttributeError):
        return False
