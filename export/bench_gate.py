"""The CI latency-regression gate: compare a bench run with a saved baseline.

Each model is compared two ways. Relative: its speed-up over the float32 graph timed interleaved
in the same run, best time against best time (`decode_speedup_best`, `prefill_speedup_<L>_best`):
the ratio cancels the machine's speed, and minimums ignore the interference a shared machine adds;
this decides the verdict. Absolute: its own tokens/s and milliseconds, reported
beside it; a drop there alone (every model slower, the reference included) is a different machine
or runtime, so it warns instead of failing unless `absolute=True`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.atomic import write_json_atomic
from pipeline.errors import ArtifactError, RotaqError

BASELINE_FORMAT = "rotaq-bench-baseline/1"
METRICS = ("decode", "prefill")


@dataclass(frozen=True)
class GateResult:
    rows: list[dict[str, Any]]
    failed: bool
    warnings: list[str]


def save_baseline(rows: list[dict[str, Any]], meta: dict[str, Any], path: Path) -> Path:
    write_json_atomic(Path(path), {"format": BASELINE_FORMAT, "machine": meta.get("machine"),
                                   "reference": meta.get("reference_label"), "rows": rows})
    return Path(path)


def load_baseline(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"baseline {path} does not exist; write one with --save-baseline")
    try:
        baseline = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"baseline {path} is not valid JSON: {exc}") from exc
    if not isinstance(baseline, dict) or baseline.get("format") != BASELINE_FORMAT:
        raise ArtifactError(f"{path} is not a rotaq bench baseline (format {BASELINE_FORMAT})")
    return baseline


def _measures(metric: str, row: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(absolute key, relative key, higher is better) for one metric of a row."""
    if metric == "decode":
        return [("decode_tokens_per_s", "decode_speedup", True)]
    lengths = sorted(int(key.rsplit("_", 1)[1]) for key in row if key.startswith("prefill_ms_")
                     and key.rsplit("_", 1)[1].isdigit())
    return [(f"prefill_ms_{n}", f"prefill_speedup_{n}", False) for n in lengths]


def _change(old: float, new: float, higher_is_better: bool) -> float:
    """Relative change in 'goodness': −0.2 means 20% worse, whichever direction is better."""
    return new / old - 1.0 if higher_is_better else old / new - 1.0


def compare(rows: list[dict[str, Any]], meta: dict[str, Any], baseline: dict[str, Any],
            max_regression: float, metrics: tuple[str, ...] = METRICS, absolute: bool = False) -> GateResult:
    """Old vs new per model, runtime and measure; failed when a relative change is below −tolerance."""
    if not 0 < max_regression < 1:
        raise RotaqError(f"--max-regression {max_regression} must be a fraction in (0, 1), e.g. 0.10")
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise RotaqError(f"unknown gate metric(s) {', '.join(sorted(unknown))}; use {', '.join(METRICS)}")
    warnings = _provenance_warnings(meta, baseline)
    old_rows = {(row["model"], row["runtime"]): row for row in baseline["rows"]}
    table, failed = [], False
    for row in rows:
        old = old_rows.get((row["model"], row["runtime"]))
        if old is None:
            warnings.append(f"{row['model']} ({row['runtime']}) is not in the baseline: not gated")
            continue
        for metric in metrics:
            for absolute_key, relative_key, higher in _measures(metric, row):
                if absolute_key not in old:
                    continue
                entry = {"model": row["model"], "runtime": row["runtime"], "measure": absolute_key,
                         "old": old[absolute_key], "new": row[absolute_key],
                         "change": _change(old[absolute_key], row[absolute_key], higher)}
                relative_key += "_best"
                if relative_key in row and relative_key in old and row["model"] != baseline.get("reference"):
                    entry.update(old_vs_fp32=old[relative_key], new_vs_fp32=row[relative_key],
                                 change_vs_fp32=_change(old[relative_key], row[relative_key], True))
                entry["verdict"] = _verdict(entry, max_regression, absolute)
                failed |= entry["verdict"] == "FAIL"
                if entry["verdict"] == "warn":
                    warnings.append(f"{row['model']} {absolute_key}: {entry['change']:+.1%} in absolute terms but "
                                    "not against the float32 graph: the machine or runtime is slower")
                table.append(entry)
    missing = set(old_rows) - {(row["model"], row["runtime"]) for row in rows}
    warnings += [f"{model} ({runtime}) is in the baseline but was not benchmarked" for model, runtime in sorted(missing)]
    return GateResult(table, failed, warnings)


def _verdict(entry: dict[str, Any], tolerance: float, absolute: bool) -> str:
    relative = entry.get("change_vs_fp32")
    if relative is not None and relative < -tolerance:
        return "FAIL"
    if entry["change"] < -tolerance:
        return "FAIL" if absolute else "warn"
    return "ok"


def _provenance_warnings(meta: dict[str, Any], baseline: dict[str, Any]) -> list[str]:
    warnings = []
    old_machine, new_machine = baseline.get("machine") or {}, meta.get("machine") or {}
    for key in ("cpu", "threads", "onnxruntime"):
        if old_machine.get(key) != new_machine.get(key):
            warnings.append(f"baseline {key} differs: {old_machine.get(key)!r} then, {new_machine.get(key)!r} now; "
                            "absolute numbers are not comparable, ratios to float32 still are")
    if baseline.get("reference") != meta.get("reference_label"):
        warnings.append(f"baseline was taken against reference {baseline.get('reference')!r}, this run against "
                        f"{meta.get('reference_label')!r}: a different model?")
    return warnings
