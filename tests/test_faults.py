"""Fault injection: SIGKILL a tiny `rotaq run` at random points, rerun it, and get an uninterrupted run's artifacts.

Why: `rotaq run` promises that a crash (not only Ctrl-C) leaves every finished stage reusable and that a rerun
completes the work. A SIGKILL skips every `finally`, so only what is already atomic on disk is safe: stage
folders swapped in by one rename, markers written after their output, finetune checkpoints staged and renamed.

Kill points are chosen by progress, never by absolute time: the child's stdout is read line by line, and when
the first "[k/N] <stage>: running" line with k at or past the target stage appears, a timer with a seeded random
delay sends SIGKILL to the child's process group. Wherever that lands (inside the stage, in a later one, or after
the child already exited by itself), the same properties must hold after a rerun in the same folder:

* the rerun exits 0 and every planned stage is complete, with the reference run's stage keys;
* every model artifact (`*.safetensors`, `*.onnx`, `*.onnx.data` outside `scratch/`) has the reference run's
  SHA-256, file by file;
* nothing named `*.tmp*` or `*.old-*` is left anywhere under the run folder.

KILL_POINTS (6) kill points are tried: one each in finetune (mid-training: resume from a checkpoint that is not
the last step), merge and quantize (mid-write of a stage folder), and a chain of three kills of the same run
folder (rotate, finetune again, a late stage) before the final rerun.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_run import tiny_settings

REPO_ROOT = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 300.0  # a watchdog, not an assertion: a hung child fails the test instead of hanging it

# Enough finetune steps for a kill to land mid-training, with a checkpoint interval that leaves steps to redo
# after a resume (12 steps, checkpoints at 3, 6, 9, 12). Everything else is the TINY_RUN of tests/test_run.py.
FAULT_RUN_OVERRIDES: dict[str, Any] = {"finetune__steps": 12, "finetune__save_every": 3}

MODEL_SUFFIXES = (".safetensors", ".onnx", ".onnx.data")
LEFTOVER_MARKS = (".tmp", ".old-")
STAGE_LINE = re.compile(r"\[(\d+)/(\d+)\] (\S+): (running|done in .*|failed.*)$")


@dataclass(frozen=True)
class KillPoint:
    """Kill once the first stage at or past `stage` starts, after a random fraction in [low, high] of the time
    that stage took in the reference run (so the point tracks progress on any machine; above 1 may overshoot)."""

    stage: str
    low: float
    high: float


# Each scenario is one fresh run folder, killed at each of its points in turn, then rerun to completion.
# Stage folders are written at the end of a stage, hence the late fractions for merge and quantize; where a
# kill really lands is recorded, not assumed.
SCENARIOS: dict[str, tuple[KillPoint, ...]] = {
    "finetune": (KillPoint("finetune", 0.3, 0.9),),
    "merge": (KillPoint("merge", 0.6, 1.05),),
    "quantize": (KillPoint("quantize-w4a8", 0.6, 1.05),),
    "chain-rotate-finetune-report": (KillPoint("rotate", 0.6, 1.05), KillPoint("finetune", 0.3, 0.9),
                                     KillPoint("report", 0.0, 1.5)),
}
KILL_POINTS = sum(len(points) for points in SCENARIOS.values())
# One RNG for every kill point, so a failure replays by rerunning the module; ROTAQ_FAULT_SEED=n tries others.
SEED = int(os.environ.get("ROTAQ_FAULT_SEED", "20240917"))
_RNG = random.Random(SEED)
FRACTIONS: dict[str, tuple[float, ...]] = {  # drawn once, in declaration order, whatever tests are selected
    name: tuple(round(_RNG.uniform(point.low, point.high), 3) for point in points)
    for name, points in SCENARIOS.items()}


@dataclass
class ChildRun:
    """One `rotaq run` subprocess: its exit status, its stage lines, and where a kill (if any) landed."""

    returncode: int
    lines: list[str] = field(default_factory=list)
    armed_at: str | None = None  # the stage line that started the kill timer
    stderr_tail: str = ""

    @property
    def killed(self) -> bool:
        return self.returncode == -signal.SIGKILL

    def landed(self) -> str:
        """Where the kill hit: inside the last stage that printed 'running', between stages, or nowhere."""
        if not self.killed:
            return f"not killed (exit {self.returncode}; armed at {self.armed_at!r})"
        stage_lines = [line for line in self.lines if STAGE_LINE.search(line)]
        last = stage_lines[-1] if stage_lines else "before the first stage line"
        return f"killed after {last!r}"


def cli_command(config: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "rotaq.pipeline.cli", "run", "--config", str(config), "--out", str(run_dir)]


def run_child(config: Path, run_dir: Path, log: Path, kill: KillPoint | None = None, delay_s: float = 0.0,
              stage_order: dict[str, int] | None = None) -> ChildRun:
    """Run the CLI in its own process group; with `kill`, SIGKILL the group `delay_s` after the trigger line.

    The trigger is the first "running" line whose index is at or past the target stage's index, so a target that
    is cached in this run (or already passed) still arms the timer at the next stage that does run.
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    target = stage_order[kill.stage] if kill is not None and stage_order is not None else None
    with open(log, "ab") as stderr:
        child = subprocess.Popen(cli_command(config, run_dir), cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                 stderr=stderr, text=True, bufsize=1, start_new_session=True)

    def kill_group() -> None:
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # already gone (it finished before the timer fired)

    hung = threading.Event()

    def stop_hung_child() -> None:
        hung.set()
        kill_group()

    watchdog, timer = threading.Timer(RUN_TIMEOUT_S, stop_hung_child), None
    watchdog.start()
    run = ChildRun(returncode=0)
    try:
        assert child.stdout is not None
        for raw in child.stdout:
            line = raw.rstrip("\n")
            run.lines.append(line)
            match = STAGE_LINE.search(line)
            if (timer is None and target is not None and match and match[4] == "running"
                    and int(match[1]) >= target):
                run.armed_at = line
                timer = threading.Timer(delay_s, kill_group)
                timer.start()
        # Stop the timers before reaping, so a kill can never reach a recycled pid.
        for pending in (timer, watchdog):
            if pending is not None:
                pending.cancel()
                pending.join()
        run.returncode = child.wait()
    finally:
        for pending in (timer, watchdog):
            if pending is not None:
                pending.cancel()
        if child.poll() is None:
            kill_group()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()
    run.stderr_tail = log.read_text(errors="replace")[-3000:]
    assert not hung.is_set(), f"rotaq run took over {RUN_TIMEOUT_S} s and was stopped:\n{run.stderr_tail}"
    return run


def model_hashes(run_dir: Path) -> dict[str, str]:
    """SHA-256 of every deterministic model artifact, keyed by its path in the run folder (scratch excluded:
    checkpoints are training state, not outputs)."""
    hashes = {}
    for path in sorted(run_dir.rglob("*")):
        relative = path.relative_to(run_dir).as_posix()
        if path.is_file() and relative.endswith(MODEL_SUFFIXES) and not relative.startswith("scratch/"):
            hashes[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def leftovers(run_dir: Path) -> list[str]:
    """Temporary folders and files anywhere under the run folder (stage staging, trash, atomic writes,
    checkpoint staging)."""
    return sorted(path.relative_to(run_dir).as_posix() for path in run_dir.rglob("*")
                  if any(mark in path.name for mark in LEFTOVER_MARKS))


def markers(run_dir: Path) -> dict[str, dict[str, Any]]:
    return {marker.stem: json.loads(marker.read_text()) for marker in (run_dir / "stages").glob("*.json")}


def stage_keys(run_dir: Path) -> dict[str, str]:
    return {name: marker["key"] for name, marker in markers(run_dir).items()}


def stage_order_of(lines: list[str]) -> dict[str, int]:
    return {match[3]: int(match[1]) for line in lines if (match := STAGE_LINE.search(line))}


@dataclass(frozen=True)
class Reference:
    config: Path
    run_dir: Path
    hashes: dict[str, str]
    keys: dict[str, str]
    order: dict[str, int]  # stage name -> its index in "[k/N]"
    seconds: dict[str, float]  # stage name -> how long it ran, from its marker


@pytest.fixture(scope="module")
def fault_config(tmp_path_factory: pytest.TempPathFactory, tiny_hf_folder: Path, tiny_text_file: Path) -> Path:
    config = tmp_path_factory.mktemp("fault-config") / "rotaq.yaml"
    config.write_text(yaml.safe_dump(tiny_settings(tiny_hf_folder, tiny_text_file, **FAULT_RUN_OVERRIDES)))
    return config


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, fault_config: Path) -> Reference:
    """The same config run once, uninterrupted, by the same command."""
    folder = tmp_path_factory.mktemp("fault-reference")
    run = run_child(fault_config, folder / "run", folder / "stderr.log")
    assert run.returncode == 0, f"reference run failed:\n{run.stderr_tail}"
    hashes, order = model_hashes(folder / "run"), stage_order_of(run.lines)
    assert {"rotate/model.safetensors", "finetune/adapters.safetensors", "merge/model.safetensors",
            "quantize-w4a8/model.safetensors"} <= set(hashes), hashes
    assert all(point.stage in order for points in SCENARIOS.values() for point in points), order
    seconds = {name: float(marker["seconds"]) for name, marker in markers(folder / "run").items()}
    return Reference(fault_config, folder / "run", hashes, stage_keys(folder / "run"), order, seconds)


def test_the_kill_plan_tries_the_quoted_number_of_points() -> None:
    """The module docstring and the report quote this number."""
    assert KILL_POINTS == 6
    print(f"kill points: {KILL_POINTS}; fractions of the stage's reference time (seed {SEED}): {FRACTIONS}")


@pytest.mark.parametrize("scenario", list(SCENARIOS),
                         ids=[f"{name}-{len(points)}of{KILL_POINTS}-kills" for name, points in SCENARIOS.items()])
def test_killed_run_reruns_to_the_uninterrupted_artifacts(scenario: str, reference: Reference,
                                                          tmp_path: Path) -> None:
    run_dir, log = tmp_path / "run", tmp_path / "stderr.log"
    history = []
    for point, fraction in zip(SCENARIOS[scenario], FRACTIONS[scenario]):
        delay = fraction * reference.seconds[point.stage]
        killed = run_child(reference.config, run_dir, log, point, delay, reference.order)
        assert killed.returncode in (0, -signal.SIGKILL), (
            f"interrupted run failed on its own (exit {killed.returncode}):\n{killed.stderr_tail}")
        history.append(f"{point.stage} +{fraction:.2f} x {reference.seconds[point.stage]:.3f} s: {killed.landed()}")
        print(history[-1])
    checkpoints = sorted(path.name for path in (run_dir / "scratch").glob("*/step-*"))
    print(f"before the rerun: checkpoints {checkpoints}, leftovers {leftovers(run_dir)}")

    rerun = run_child(reference.config, run_dir, log)
    where = "; ".join(history)
    assert rerun.returncode == 0, f"rerun after [{where}] failed:\n{rerun.stderr_tail}"
    assert stage_keys(run_dir) == reference.keys, f"after [{where}]"
    hashes = model_hashes(run_dir)
    differing = sorted(path for path in set(hashes) | set(reference.hashes)
                       if hashes.get(path) != reference.hashes.get(path))
    assert not differing, f"after [{where}] these artifacts differ from the uninterrupted run: {differing}"
    assert not leftovers(run_dir), f"after [{where}] temporary files were left: {leftovers(run_dir)}"
