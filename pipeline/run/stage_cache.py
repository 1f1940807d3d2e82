"""Stage keys and the markers that let `rotaq run` reuse a finished stage.

A stage's key is the SHA-256 of (stage name, its options, the keys of the stages it reads, rotaq version);
the source model counts by its reference. After a stage finishes, its key is written to
`stages/<name>.json` in the run folder (or beside the output in a sweep's shared store); the marker is
removed before the stage runs again, so a marker always describes the output it names, even after an
interrupted rerun.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rotaq.pipeline.atomic import write_json_atomic

MARKERS_FOLDER = "stages"
RUN_RECORD = "run.json"  # the run's plan and statuses, written by rotaq.pipeline.run.execute


def rotaq_version() -> str:
    try:
        return importlib.metadata.version("rotaq")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def key_material(stage: str, options: Mapping[str, Any], input_keys: Mapping[str, str]) -> dict[str, Any]:
    """Everything a stage's output depends on, as plain JSON."""
    return {"stage": stage, "options": dict(options), "inputs": dict(input_keys), "rotaq": rotaq_version()}


def stage_key(material: Mapping[str, Any]) -> str:
    canonical = json.dumps(material, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def marker_path(run_folder: Path, name: str) -> Path:
    """Where a run keeps the marker of its stage `name` (a sweep's shared stages keep theirs in its store)."""
    return run_folder / MARKERS_FOLDER / f"{name}.json"


def read_marker(path: Path) -> dict[str, Any] | None:
    """The marker at `path`, or None if there is none (or it is unreadable: treated as unfinished)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def clear_marker(path: Path) -> None:
    path.unlink(missing_ok=True)


def write_marker(path: Path, name: str, material: Mapping[str, Any], key: str, output: str,
                 seconds: float) -> None:
    write_json_atomic(path, {
        "name": name, "key": key, "key_material": dict(material), "output": output,
        "seconds": round(seconds, 3), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
