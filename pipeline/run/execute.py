"""`rotaq run`: every stage of the pipeline into one folder, reusing each stage that is already finished.

A stage is reused when its marker holds the key the plan computed and its output is complete; otherwise
its marker is removed, it runs (writing its output atomically), and a new marker is written. So Ctrl-C
or a crash leaves every finished stage reusable, and the next run starts at the first unfinished one.
`run.json` records the plan (stages, inputs, keys, skipped stages) and each stage's status in this run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rotaq.pipeline.artifacts import remove_stale_temporaries
from rotaq.pipeline.atomic import write_json_atomic
from rotaq.pipeline.errors import ArtifactError
from rotaq.pipeline.locks import LOCK_NAME, folder_lock
from rotaq.pipeline.run.config import RunConfig
from rotaq.pipeline.run.plan import PlannedStage, RunPlan, plan_run
from rotaq.pipeline.run.stage_cache import RUN_RECORD, clear_marker, read_marker, rotaq_version, write_marker
from rotaq.pipeline.run.stage_registry import StageCall

RUN_FORMAT = "rotaq-run/1"

ProgressLine = Callable[[str], None]


@dataclass(frozen=True)
class StageOutcome:
    status: str  # "done" (ran now), "cached" (reused), "skipped" (not available or needs a skipped stage), "failed"
    seconds: float | None = None
    reason: str | None = None

    def describe(self) -> str:
        if self.status == "done":
            return f"done in {self.seconds:.1f} s"
        return f"{self.status} ({self.reason})" if self.reason else self.status


@dataclass(frozen=True)
class RunOutcome:
    folder: Path
    stages: dict[str, StageOutcome]


def run_pipeline(config: RunConfig, out: Path | None = None, progress: ProgressLine | None = None,
                 show_stage_progress: bool = True, store: Path | None = None, verify: bool = False) -> RunOutcome:
    """Run (or reuse) every planned stage in order into `out` (default: the config's `out`).

    `progress` receives one line per stage as it starts and ends; the stages draw their own progress bars
    when `show_stage_progress` is set. With a `store` (a sweep's), stages are shared through it. A finished
    stage is reused after its files pass `output_problem` (`verify`: every file's SHA-256, not only sizes).
    """
    check_run_inputs(config.model, config.data)
    run_folder = _prepare_run_folder(Path(out if out is not None else config.out))
    store = store.expanduser().resolve() if store is not None else None
    with contextlib.ExitStack() as locks:
        locks.enter_context(folder_lock(run_folder))
        if store is not None:
            locks.enter_context(folder_lock(store))
        return _run_locked(config, run_folder, store, progress or (lambda line: None), show_stage_progress, verify)


def _run_locked(config: RunConfig, run_folder: Path, store: Path | None, say: ProgressLine,
                show_stage_progress: bool, verify: bool) -> RunOutcome:
    plan = plan_run(config, run_folder, store)
    for stage in plan.stages:  # a stage killed mid-write left its temporary folder; its writer is gone
        remove_stale_temporaries(stage.output)
    outcomes = {skipped.name: StageOutcome("skipped", reason=skipped.reason) for skipped in plan.skipped}
    for name, outcome in outcomes.items():
        say(f"{name}: {outcome.describe()}")
    _write_run_record(run_folder, config, plan, outcomes)
    for index, stage in enumerate(plan.stages, 1):
        label = f"[{index}/{len(plan.stages)}] {stage.name}"
        if _is_cached(stage, verify, lambda problem: say(f"{label}: not reused: {problem}")) and \
                not _reads_a_stage_that_ran(stage, outcomes):
            outcomes[stage.name] = StageOutcome("cached", reason=f"key {stage.key[:12]}")
        else:
            say(f"{label}: running")
            try:
                outcomes[stage.name] = _run_stage(stage, plan, run_folder, show_stage_progress)
            except BaseException as exc:  # Ctrl-C included: record the failure, then let it propagate
                outcomes[stage.name] = StageOutcome("failed", reason=type(exc).__name__)
                _write_run_record(run_folder, config, plan, outcomes)
                say(f"{label}: {outcomes[stage.name].describe()}")
                raise
        say(f"{label}: {outcomes[stage.name].describe()}")
        _write_run_record(run_folder, config, plan, outcomes)
    return RunOutcome(run_folder, outcomes)


def check_run_inputs(model: str, data: str) -> None:
    """The model and the text exist and are usable, checked before the first stage: a missing `data:` used
    to surface only after the rotation had run."""
    from rotaq.pipeline.data import check_data_source
    from rotaq.pipeline.loading import classify_model_reference

    classify_model_reference(model)
    check_data_source(data)


def _prepare_run_folder(folder: Path) -> Path:
    """Create the run folder; refuse a non-empty folder that is not a previous run, so no files get mixed in."""
    folder = folder.expanduser().resolve()
    if folder.exists() and not (folder / RUN_RECORD).is_file() and (
            not folder.is_dir() or any(not _is_run_bookkeeping(path.name) for path in folder.iterdir())):
        raise ArtifactError(f"refusing to run into {folder}: it exists, is not empty and holds no {RUN_RECORD} "
                            "(pick a new --out, or the folder of an earlier run to resume it)")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _is_run_bookkeeping(name: str) -> bool:
    """The lock, or the temporary of a first run.json that a kill interrupted: the folder is still unused."""
    return name == LOCK_NAME or name.startswith(f".{RUN_RECORD}.tmp-")


def _is_cached(stage: PlannedStage, verify: bool, report: ProgressLine) -> bool:
    """The stage finished with these options and inputs, and its files are still what it wrote."""
    marker = read_marker(stage.marker)
    if marker is None or marker.get("key") != stage.key or not stage.definition.is_complete(stage.output):
        return False
    problem = stage.definition.output_problem(stage.output, full=verify)
    if problem is not None:
        report(problem)
    return problem is None


def _reads_a_stage_that_ran(stage: PlannedStage, outcomes: dict[str, StageOutcome]) -> bool:
    """True when an input was (re)computed in this run: a stage re-runs when its output went missing, and
    a rerun need not give the same output (training is seeded, but not bitwise reproducible everywhere),
    so whatever was computed from the old output is computed again."""
    return any(outcomes.get(upstream, StageOutcome("cached")).status == "done" for upstream in stage.inputs.values())


def _run_stage(stage: PlannedStage, plan: RunPlan, run_folder: Path, show_progress: bool) -> StageOutcome:
    clear_marker(stage.marker)
    call = StageCall(options=stage.options,
                     inputs={role: plan.input_reference(upstream) for role, upstream in stage.inputs.items()},
                     output=stage.output, run_folder=run_folder, scratch=stage.scratch,
                     show_progress=show_progress)
    started = time.perf_counter()
    stage.definition.run(call)
    seconds = time.perf_counter() - started
    write_marker(stage.marker, stage.name, stage.key_material, stage.key,
                 os.path.relpath(stage.output, stage.marker.parent), seconds)
    return StageOutcome("done", seconds)


def _write_run_record(run_folder: Path, config: RunConfig, plan: RunPlan, outcomes: dict[str, StageOutcome]) -> None:
    record: dict[str, Any] = {
        "format": RUN_FORMAT, "rotaq_version": rotaq_version(), "config": dataclasses.asdict(config),
        "source": plan.source,
        "stages": [stage.record(run_folder) for stage in plan.stages],
        "skipped": [dataclasses.asdict(skipped) for skipped in plan.skipped],
        "statuses": {name: dataclasses.asdict(outcome) for name, outcome in outcomes.items()},
    }
    write_json_atomic(run_folder / RUN_RECORD, record)
