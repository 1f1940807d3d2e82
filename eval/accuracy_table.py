"""The accuracy table (a benchmark, not a test): every scheme × {no rotation, rotation} × {RTN, GPTQ}.

Rotations the table cannot make cheaply (a learned rotation takes minutes of training) come as folders
written by `rotaq rotate`, each scored like the built-in ones and labelled with its manifest's rotation kind
(`rotation`) and how it was made (`rotation_detail`: what was learned, for which scheme, steps, weights).

Each row is scored against the float model on the same held-out windows: perplexity (and its
ratio to float), mean KL divergence and top-1 agreement. Rows are written as they finish, so an
interrupted run keeps what it measured and a rerun skips rows already in the JSON.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rotaq.eval.metrics import evaluate
from rotaq.eval.tables import write_table
from rotaq.pipeline.data import DataSpec, load_split_windows, windows_fingerprint
from rotaq.pipeline.errors import RotaqError
from rotaq.pipeline.loading import LoadedModel, load_model
from rotaq.quantizers.quantize_model import QuantizeSettings, quantize_model
from rotaq.quantizers.schemes import parse_scheme
from rotaq.rotations.rotate import RotationConfig, rotate_model

COLUMNS = ["scheme", "rotation", "rotation_detail", "weights", "variant", "perplexity", "ppl_ratio", "kl_divergence",
           "top1_agreement", "quantize_seconds"]


@dataclass(frozen=True)
class AccuracyTableOptions:
    out: Path
    model: str | None = None
    schemes: tuple[str, ...] = ("w8a8", "w4a8", "w4a4", "w4a16-g128")
    rotations: tuple[bool, ...] = (False, True)
    rotated: tuple[Path, ...] = ()  # folders from `rotaq rotate` of `model`, scored as further rotations
    weight_methods: tuple[str, ...] = ("rtn", "gptq")
    evaluation: DataSpec = DataSpec(seq_len=512, max_tokens=16 * 512)
    calibration: DataSpec = DataSpec(seq_len=512, max_tokens=32 * 512)
    act_clip_ratio: float | None = None
    act_symmetric: bool | None = None
    seed: int = 0
    progress: bool = True
    extra_fields: dict[str, Any] = field(default_factory=dict)


def _row_key(row: dict[str, Any]) -> tuple:
    return row["scheme"], row["rotation"], row.get("rotation_detail", "-"), row["weights"], row.get("variant", "-")


def rotation_detail(section: dict[str, Any], table_seed: int) -> str:
    """How a rotate-stage folder's rotation was made, short enough for a table cell; "-" for the rotation the
    table builds itself (Hadamard, the table's seed, online Hadamards), so the two share their rows."""
    learned = section.get("learned")
    if not learned:
        parts = [] if section.get("seed", 0) == table_seed else [f"seed {section.get('seed', 0)}"]
        parts += [] if section.get("online") else ["no online"]
        return ", ".join(parts) or "-"
    parts = ["R1+R2" if learned.get("learn_heads") else "R1", f"for {learned['scheme']}"]
    if learned.get("act_clip_ratio") not in (None, 1.0):
        parts.append(f"clip {learned['act_clip_ratio']:g}")
    parts += [f"{learned.get('weights', 'rtn')} weights", f"{learned['steps']} steps", f"lr {learned['lr']:g}"]
    if learned.get("batch_size", 1) != 1:
        parts.append(f"batch {learned['batch_size']}")
    return ", ".join(parts)


def _rotated_bases(options: AccuracyTableOptions, float_loaded: LoadedModel) -> Iterator[tuple[str, str, Any]]:
    """(rotation, rotation_detail, model) for each rotation of the table, built or loaded one at a time: each
    model is released before the next is made, so at most one rotated copy is held beside the float model."""
    for rotated in options.rotations:
        base = copy.deepcopy(float_loaded.model)
        if rotated:
            rotate_model(base, float_loaded.family, RotationConfig(seed=options.seed))
        yield ("hadamard" if rotated else "none"), "-", base
        del base
    for folder in options.rotated:
        loaded = load_model(folder)
        section = (loaded.manifest or {}).get("rotation")
        if not section:
            raise RotaqError(f"{folder} is not a rotated model folder (no rotation in its manifest); "
                             "pass a folder written by `rotaq rotate`")
        origin = loaded.source.get("origin")
        if origin != float_loaded.source:
            raise RotaqError(f"{folder} was rotated from {origin}, not from the table's model {float_loaded.source}")
        yield section["kind"], rotation_detail(section, options.seed), loaded.model
        del loaded


def scheme_variant(options: AccuracyTableOptions) -> tuple[dict[str, Any], str]:
    """Scheme overrides of this run and the short label that keeps their rows apart in the table.

    Group sizes that do not divide a width become ragged (the table's default w4a16-g128 on a
    576-wide model has groups of 128 and a last one of 64, the layout MatMulNBits uses).
    """
    overrides: dict[str, Any] = {"ragged_groups": True}
    if options.act_clip_ratio not in (None, 1.0) or options.act_symmetric is False:
        overrides["act_block_size"] = None  # ONNX Runtime's per-block kernel neither clips nor shifts
    labels = []
    if options.act_clip_ratio is not None and options.act_clip_ratio != 1.0:
        overrides["act_clip_ratio"] = options.act_clip_ratio
        labels.append(f"act-clip {options.act_clip_ratio:g}")
    if options.act_symmetric is False:
        overrides["act_symmetric"] = False
        labels.append("asym act")
    return overrides, ", ".join(labels) or "-"


def _load_previous(path: Path, fingerprint: str) -> list[dict[str, Any]]:
    """Rows of an earlier, interrupted run on the same evaluation tokens."""
    if not path.is_file():
        return []
    previous = json.loads(path.read_text())
    return previous if all(row.get("windows_sha256") == fingerprint for row in previous) else []


def run_accuracy_table(options: AccuracyTableOptions) -> list[dict[str, Any]]:
    loaded = load_model(options.model)
    float_model = loaded.model
    evaluation = load_split_windows(options.evaluation, loaded.tokenizer, "evaluation")
    calibration = load_split_windows(options.calibration, loaded.tokenizer, "calibration")
    fingerprint = windows_fingerprint(evaluation)
    stem = Path(options.out) / "accuracy"
    rows = _load_previous(stem.with_suffix(".json"), fingerprint)
    done = {_row_key(row) for row in rows}

    float_key = ("fp32", "none", "-", "-", "-")
    if float_key not in done:
        result = evaluate(float_model, evaluation, progress=options.progress)
        rows.append({"scheme": "fp32", "rotation": "none", "rotation_detail": "-", "weights": "-", "variant": "-",
                     **result.to_dict(),
                     "ppl_ratio": 1.0, "kl_divergence": 0.0, "top1_agreement": 1.0, "windows_sha256": fingerprint})
        write_table(rows, stem, COLUMNS + ["tokens", "windows_sha256"])
    overrides, variant = scheme_variant(options)
    float_ppl = next(row["perplexity"] for row in rows if _row_key(row) == float_key)

    for rotation, detail, base in _rotated_bases(options, loaded):
        for scheme_name in options.schemes:
            scheme = dataclasses.replace(parse_scheme(scheme_name), **overrides)
            if not scheme.quantizes_activations and variant != "-":
                continue  # activation options do not change a weight-only scheme
            for weights in options.weight_methods:
                key = (scheme_name, rotation, detail, weights, variant)
                if key in done:
                    continue
                model = copy.deepcopy(base)
                started = time.perf_counter()
                quantize_model(model, loaded.family, QuantizeSettings(scheme=scheme, weights=weights,
                                                                      progress=options.progress), calibration)
                seconds = time.perf_counter() - started
                result = evaluate(model, evaluation, reference=float_model, progress=options.progress)
                rows.append({"scheme": scheme_name, "rotation": rotation, "rotation_detail": detail,
                             "weights": weights, "variant": variant,
                             **result.to_dict(),
                             "ppl_ratio": result.perplexity / float_ppl, "quantize_seconds": round(seconds, 1),
                             "windows_sha256": fingerprint, **options.extra_fields})
                write_table(rows, stem, COLUMNS + ["tokens", "windows_sha256"])
                done.add(key)
                del model
        del base
    return rows
