"""Read a run folder's JSON files by the names run.json gives its stages: what the report and the sweep
table both read, kept apart from either so neither imports the other to get it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rotaq.pipeline.run.stage_cache import RUN_RECORD

REPORT_MARKDOWN = "report.md"  # written by rotaq.pipeline.report.write
REPORT_HTML = "report.html"


@dataclass(frozen=True)
class RunFiles:
    """The JSON files of one run folder, by the names run.json gives its stages."""

    folder: Path
    record: dict[str, Any]

    @classmethod
    def load(cls, folder: Path) -> RunFiles:
        return cls(folder, json.loads((folder / RUN_RECORD).read_text()))

    def json(self, relative: str) -> Any:
        """A JSON file of the run, or None when it was not written."""
        path = self.folder / relative
        return json.loads(path.read_text()) if path.is_file() else None

    def stages(self, stage: str | None = None) -> list[dict[str, Any]]:
        return [entry for entry in self.record["stages"] if stage is None or entry["stage"] == stage]

    def stage_named(self, name: str) -> dict[str, Any] | None:
        return next((entry for entry in self.record["stages"] if entry["name"] == name), None)
