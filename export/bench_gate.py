"""The CI latency-regression gate: compare a bench run with a saved baseline, from the samples.

Each gated model is judged on its speed-up over the float32 graph timed interleaved in the same run,
one paired ratio per round (`rotaq.export.bench.round_speedups`): the ratio cancels the machine's speed of
the moment. The baseline keeps its rounds, so the change is estimated from both runs' samples with an
interval (`rotaq.export.gate_stats`), and the verdict is pass, fail or inconclusive. While any verdict is
inconclusive, the bench times more rounds (up to `max_repeats`), so a busy runner costs time rather than
a false alarm. Absolute tokens/s and milliseconds are reported beside it; a drop there alone (every
model slower, the reference included) is a different machine or runtime, so it warns instead of failing
unless `absolute=True`.

Rows are matched by the graph's content hash and the model's name: a renamed model is still found,
a changed reference warns, and a baselined model missing from the run fails.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rotaq.export.bench import sample_key
from rotaq.export.gate_stats import FAIL, INCONCLUSIVE, PASS, ShiftEstimate, log_shift_interval, verdict
from rotaq.pipeline.atomic import write_json_atomic
from rotaq.pipeline.errors import ArtifactError, RotaqError

BASELINE_FORMAT = "rotaq-bench-baseline/1"
METRICS = ("decode", "prefill")
INCONCLUSIVE_POLICIES = ("exit", "fail", "pass")
EXIT_CODES = {PASS: 0, FAIL: 1, INCONCLUSIVE: 3}  # 2 is every rotaq error
REFERENCE, WARN = "reference", "warn"


@dataclass(frozen=True)
class GateOptions:
    """What the gate decides with; checked before anything is timed."""

    baseline: Path
    max_regression: float = 0.10
    metrics: tuple[str, ...] = METRICS
    absolute: bool = False
    inconclusive: str = "exit"  # exit: its own exit code (3); fail / pass: what CI should do with it
    max_repeats: int = 20
    confidence: float = 0.95

    def __post_init__(self) -> None:
        if not 0 < self.max_regression < 1:
            raise RotaqError(f"--max-regression {self.max_regression} must be a fraction in (0, 1), e.g. 0.10")
        unknown = set(self.metrics) - set(METRICS)
        if unknown or not self.metrics:
            raise RotaqError(f"unknown gate metric(s) {', '.join(sorted(unknown)) or '(none)'}; "
                             f"use {', '.join(METRICS)}")
        if self.inconclusive not in INCONCLUSIVE_POLICIES:
            raise RotaqError(f"--inconclusive {self.inconclusive!r}: use one of {', '.join(INCONCLUSIVE_POLICIES)}")
        if self.max_repeats < 1:
            raise RotaqError(f"--max-repeats {self.max_repeats} must be at least 1")
        if not 0.5 <= self.confidence < 1:
            raise RotaqError(f"gate confidence {self.confidence} must be in [0.5, 1)")


@dataclass(frozen=True)
class GateResult:
    rows: list[dict[str, Any]]
    verdict: str  # pass, fail or inconclusive: the worst over the gated rows
    warnings: list[str]

    @property
    def failed(self) -> bool:
        return self.verdict == FAIL

    def exit_code(self, policy: str = "exit") -> int:
        if self.verdict == INCONCLUSIVE and policy != "exit":
            return EXIT_CODES[FAIL if policy == "fail" else PASS]
        return EXIT_CODES[self.verdict]


# ---- the baseline file ---------------------------------------------------------------------------

def save_baseline(rows: list[dict[str, Any]], meta: dict[str, Any], path: Path) -> Path:
    """The run's rows with their raw per-round samples (seconds and paired speed-ups)."""
    seconds, speedups = meta.get("samples_seconds") or {}, meta.get("round_speedups") or {}
    stored = []
    for row in rows:
        key = sample_key(row["model"], row["runtime"])
        stored.append({**row, "samples_seconds": seconds.get(key, {}), "round_speedups": speedups.get(key, {})})
    reference = next((row for row in rows if row["model"] == meta.get("reference_label")), {})
    write_json_atomic(Path(path), {"format": BASELINE_FORMAT, "machine": meta.get("machine"),
                                   "reference": meta.get("reference_label"),
                                   "reference_sha256": reference.get("graph_sha256"), "rows": stored})
    return Path(path)


def check_bench_outputs(out: Path, json_file: Path | None, force: bool = False) -> None:
    """`bench --out D` writes only into a new or empty folder or an earlier bench's, and `--json F` replaces
    only an earlier bench's rows (or anything, with --force): checked before timing, like every stage's --out,
    so a typo cannot overwrite a user's bench.md or the export being timed."""
    out = Path(out)
    if out.exists() and not force:
        if not out.is_dir():
            raise RotaqError(f"--out {out} is a file; bench writes a folder (bench.md, bench.csv, bench.json)")
        if any(out.iterdir()) and not (out / "bench_meta.json").is_file():
            raise RotaqError(f"refusing to write into {out}: it exists and holds no earlier bench output "
                             "(bench_meta.json); pick another --out, or pass --force")
    if json_file is not None and Path(json_file).exists() and not force and not _is_bench_rows(Path(json_file)):
        raise RotaqError(f"refusing to overwrite {json_file}: it exists and is not a rotaq bench --json file "
                         "(--force replaces it)")


def _is_bench_rows(path: Path) -> bool:
    try:
        rows = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(rows, list) and all(isinstance(row, dict) and {"model", "runtime"} <= row.keys() for row in rows)


def check_baseline_target(path: Path, force: bool = False) -> None:
    """`--save-baseline F` replaces F only when it is a rotaq baseline (or with --force): checked before
    timing, so a typo cannot overwrite a user's file after minutes of benching."""
    path = Path(path)
    if path.is_dir():
        raise RotaqError(f"--save-baseline {path} is a folder; give a file name such as {path / 'baseline.json'}")
    if not path.exists() or force:
        return
    try:
        is_baseline = json.loads(path.read_text()).get("format") == BASELINE_FORMAT
    except (OSError, ValueError, AttributeError):
        is_baseline = False
    if not is_baseline:
        raise RotaqError(f"refusing to overwrite {path}: it exists and is not a rotaq bench baseline (--force replaces it)")


def load_baseline(path: Path) -> dict[str, Any]:
    """The baseline, with its contents checked: a one-line error names the first thing that is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"baseline {path} does not exist; write one with --save-baseline")
    try:
        baseline = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"baseline {path} is not valid JSON (truncated?): {exc}") from exc
    if not isinstance(baseline, dict) or baseline.get("format") != BASELINE_FORMAT:
        raise ArtifactError(f"{path} is not a rotaq bench baseline (format {BASELINE_FORMAT})")
    problem = _baseline_problem(baseline)
    if problem:
        raise ArtifactError(f"baseline {path}: {problem}; write it again with --save-baseline")
    return baseline


def _baseline_problem(baseline: dict[str, Any]) -> str | None:
    if baseline.get("machine") is not None and not isinstance(baseline["machine"], dict):
        return "'machine' is not a mapping"
    if baseline.get("reference") is not None and not isinstance(baseline["reference"], str):
        return "'reference' is not a model name"
    rows = baseline.get("rows")
    if not isinstance(rows, list) or not rows:
        return "'rows' is missing or empty"
    for index, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("model"), str) or not isinstance(row.get("runtime"), str):
            return f"row {index} has no model and runtime names"
        for key, value in row.items():
            if _is_measure(key) and not _positive(value):
                return f"row {index} ({row['model']}): {key} = {value!r} is not a positive number"
        for field in ("samples_seconds", "round_speedups"):
            samples = row.get(field, {})
            if not isinstance(samples, dict) or not all(
                    isinstance(values, list) and values and all(_positive(v) for v in values)
                    for values in samples.values()):
                return f"row {index} ({row['model']}): {field} is not lists of positive numbers"
    return None


def _is_measure(key: str) -> bool:
    return key == "decode_tokens_per_s" or (key.startswith("prefill_ms_") and key.rsplit("_", 1)[1].isdigit()) or (
        key.endswith("_best") and "speedup" in key)


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


# ---- the decision --------------------------------------------------------------------------------

def _measures(metric: str, row: dict[str, Any]) -> list[tuple[str, str]]:
    """(absolute key, sample key) for one metric of a row: decode tokens/s, prefill ms per length."""
    if metric == "decode":
        return [("decode_tokens_per_s", "decode")]
    lengths = sorted(int(key.rsplit("_", 1)[1]) for key in row if key.startswith("prefill_ms_")
                     and key.rsplit("_", 1)[1].isdigit())
    return [(f"prefill_ms_{n}", f"prefill_{n}") for n in lengths]


def _change(old: float, new: float, higher_is_better: bool) -> float:
    """Relative change in 'goodness': −0.2 means 20% worse, whichever direction is better."""
    return new / old - 1.0 if higher_is_better else old / new - 1.0


def match_rows(rows: list[dict[str, Any]], baseline_rows: list[dict[str, Any]]
               ) -> tuple[list[tuple[dict[str, Any], dict[str, Any] | None]], list[str]]:
    """Each baseline row with its row in this run (None when missing), and warnings.

    By name and runtime first; a name that is gone is looked up by the graph's hash (a renamed
    folder). A name whose graph changed is the normal case of a gate (a new build of the model); a
    changed shape warns, since then it is a different model rather than a new build of it.
    """
    by_name = {(row["model"], row["runtime"]): row for row in rows}
    by_hash = {(row.get("graph_sha256"), row["runtime"]): row for row in rows if row.get("graph_sha256")}
    pairs, warnings = [], []
    for old in baseline_rows:
        new = by_name.get((old["model"], old["runtime"]))
        if new is None and old.get("graph_sha256"):
            new = by_hash.get((old["graph_sha256"], old["runtime"]))
            if new is not None:
                warnings.append(f"{old['model']} ({old['runtime']}) of the baseline is {new['model']} in this run "
                                "(same graph): matched by its hash")
        if new is not None and old.get("shape") and new.get("shape") and old["shape"] != new["shape"]:
            warnings.append(f"{new['model']} ({new['runtime']}) is a different model from the baseline's: "
                            f"{old['shape']} then, {new['shape']} now")
        pairs.append((old, new))
    matched = {id(new) for _, new in pairs if new is not None}
    warnings += [f"{row['model']} ({row['runtime']}) is not in the baseline: not gated"
                 for row in rows if id(row) not in matched]
    return pairs, warnings


def compare(rows: list[dict[str, Any]], meta: dict[str, Any], baseline: dict[str, Any],
            options: GateOptions) -> GateResult:
    """Old vs new per model, runtime and measure, with an interval on the change against float32."""
    warnings = _provenance_warnings(rows, meta, baseline)
    with_samples = all(old.get("round_speedups") for old in baseline["rows"]
                       if old["model"] != baseline.get("reference"))
    if not with_samples:
        warnings.append("the baseline has no raw samples (written by an older rotaq): judged by the old point "
                        "rule (best-of-N ratio against the tolerance); save it again for intervals")
    pairs, match_warnings = match_rows(rows, baseline["rows"])
    warnings += match_warnings
    reference_spread = _reference_spread(rows, meta)
    table = []
    for old, new in pairs:
        if new is None:
            table.append({"model": old["model"], "runtime": old["runtime"], "measure": "-", "verdict": FAIL,
                          "note": "in the baseline but missing from this run"})
            continue
        for metric in options.metrics:
            for absolute_key, samples_key in _measures(metric, old):
                if absolute_key in new:
                    table.append(_entry(old, new, meta, absolute_key, samples_key, options, with_samples,
                                        reference_spread, warnings))
    gated = [entry["verdict"] for entry in table]
    overall = FAIL if FAIL in gated else INCONCLUSIVE if INCONCLUSIVE in gated else PASS
    return GateResult(table, overall, warnings)


def _entry(old: dict[str, Any], new: dict[str, Any], meta: dict[str, Any], absolute_key: str, samples_key: str,
           options: GateOptions, with_samples: bool, reference_spread: dict[str, float],
           warnings: list[str]) -> dict[str, Any]:
    higher = absolute_key == "decode_tokens_per_s"
    entry: dict[str, Any] = {"model": new["model"], "runtime": new["runtime"], "measure": absolute_key,
                             "old": old[absolute_key], "new": new[absolute_key],
                             "change": _change(old[absolute_key], new[absolute_key], higher)}
    tolerance = options.max_regression
    is_reference = new["model"] == meta.get("reference_label")
    relative: str | None = None
    new_speedups = ((meta.get("round_speedups") or {}).get(sample_key(new["model"], new["runtime"])) or {})
    if samples_key == "decode" and "decode_step" in (old.get("round_speedups") or {}) and "decode_step" in new_speedups:
        samples_key = "decode_step"  # the median step of each run: robust to a step the machine interrupted
    if not is_reference:
        if with_samples and samples_key in (old.get("round_speedups") or {}) and samples_key in new_speedups:
            estimate = log_shift_interval(new_speedups[samples_key], old["round_speedups"][samples_key],
                                          options.confidence)
            entry.update(_interval_fields(estimate, old["round_speedups"][samples_key], new_speedups[samples_key]))
            relative = verdict(estimate, tolerance)
        else:
            best_key = ("decode_speedup" if samples_key.startswith("decode") else
                        samples_key.replace("prefill_", "prefill_speedup_")) + "_best"
            if best_key in old and best_key in new:
                change = _change(old[best_key], new[best_key], True)
                entry.update(old_vs_fp32=old[best_key], new_vs_fp32=new[best_key], change_vs_fp32=change)
                relative = FAIL if change < -tolerance else PASS
    absolute_verdict = _absolute_verdict(old, new, meta, samples_key, higher, options) if options.absolute else None
    if absolute_verdict is None and entry["change"] < -tolerance and relative != FAIL:
        warnings.append(f"{new['model']} {absolute_key}: {entry['change']:+.1%} in absolute terms"
                        + ("" if is_reference else " but not against the float32 graph")
                        + ": the machine or runtime is slower")
    verdicts = [v for v in (relative, absolute_verdict) if v is not None]
    entry["verdict"] = (FAIL if FAIL in verdicts else INCONCLUSIVE if INCONCLUSIVE in verdicts else PASS
                        ) if verdicts else (WARN if entry["change"] < -tolerance else REFERENCE)
    spread = reference_spread.get(samples_key)
    if spread is not None and spread > tolerance and relative is not None:
        entry["note"] = f"float32 reference spread {spread:.0%} > tolerance: a noisy run"
    return entry


def _interval_fields(estimate: ShiftEstimate, old: list[float], new: list[float]) -> dict[str, Any]:
    return {"old_vs_fp32": statistics.median(old), "new_vs_fp32": statistics.median(new),
            # An unbounded end (too few rounds for the confidence) is written as null, not Infinity.
            "change_vs_fp32": estimate.change, "low": estimate.low if estimate.bounded else None,
            "high": estimate.high if estimate.bounded else None,
            "rounds": f"{estimate.new_count}/{estimate.old_count}"}


def _absolute_verdict(old: dict[str, Any], new: dict[str, Any], meta: dict[str, Any], samples_key: str,
                      higher: bool, options: GateOptions) -> str | None:
    """The same test on the model's own speed (1 / seconds per round), for `--absolute`."""
    old_seconds = (old.get("samples_seconds") or {}).get(samples_key)
    new_seconds = ((meta.get("samples_seconds") or {}).get(sample_key(new["model"], new["runtime"])) or {}).get(
        samples_key)
    if old_seconds and new_seconds:
        return verdict(log_shift_interval([1 / s for s in new_seconds], [1 / s for s in old_seconds],
                                          options.confidence), options.max_regression)
    absolute_key = ("decode_tokens_per_s" if samples_key.startswith("decode") else
                    f"prefill_ms_{samples_key.split('_')[1]}")
    return FAIL if _change(old[absolute_key], new[absolute_key], higher) < -options.max_regression else PASS


def _reference_spread(rows: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, float]:
    """(max − min) / median of the float32 reference's own samples, per measure, on the CPU."""
    reference = next((row for row in rows if row["model"] == meta.get("reference_label")), None)
    if reference is None:
        return {}
    samples = (meta.get("samples_seconds") or {}).get(sample_key(reference["model"], reference["runtime"])) or {}
    return {key: (max(values) - min(values)) / statistics.median(values) for key, values in samples.items() if values}


def _provenance_warnings(rows: list[dict[str, Any]], meta: dict[str, Any], baseline: dict[str, Any]) -> list[str]:
    warnings = []
    old_machine, new_machine = baseline.get("machine") or {}, meta.get("machine") or {}
    for key in ("cpu", "threads", "onnxruntime", "rotaq"):
        if key in old_machine and old_machine.get(key) != new_machine.get(key):
            warnings.append(f"baseline {key} differs: {old_machine.get(key)!r} then, {new_machine.get(key)!r} now; "
                            "absolute numbers are not comparable, ratios to float32 still are")
    if baseline.get("reference") != meta.get("reference_label"):
        warnings.append(f"baseline was taken against reference {baseline.get('reference')!r}, this run against "
                        f"{meta.get('reference_label')!r}: a different model?")
    reference = next((row for row in rows if row["model"] == meta.get("reference_label")), {})
    if baseline.get("reference_sha256") and reference.get("graph_sha256") not in (None, baseline["reference_sha256"]):
        warnings.append(f"the float32 reference {meta.get('reference_label')!r} is a different graph from the "
                        "baseline's (its hash changed): ratios are taken against another float model")
    return warnings


# ---- adaptive repeats ----------------------------------------------------------------------------

def more_rounds_while_inconclusive(baseline: dict[str, Any], options: GateOptions, batch: int):
    """A `run_bench_with_meta(more_rounds=…)` callback: `batch` more rounds while the gate is
    inconclusive and fewer than `max_repeats` rounds were timed."""
    def more_rounds(rows: list[dict[str, Any]], meta: dict[str, Any]) -> int:
        if compare(rows, meta, baseline, options).verdict != INCONCLUSIVE:
            return 0
        return max(0, min(batch, options.max_repeats - int(meta["repeats"])))

    return more_rounds
