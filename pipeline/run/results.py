"""`results.json`: the evaluation of every model of a run in one file, one row per model.

Each evaluation is labelled, when it is made, from the evaluated folder's own manifest (stage, scheme,
weight quantizer, rotation), so the table says what each model is without trusting its name.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rotaq.pipeline.artifacts import is_artifact, read_manifest
from rotaq.pipeline.atomic import write_json_atomic

RESULTS_FILE = "results.json"
LABELS = ("stage", "scheme", "weights", "rotation")
METRICS = ("perplexity", "nll", "kl_divergence", "top1_agreement", "tokens", "windows", "seq_len", "windows_sha256")


def write_results(evaluations: Mapping[str, str], out: Path) -> Path:
    """`evaluations`: model name in the run -> its evaluation JSON (`run_eval`'s result plus `model_labels`)."""
    results = {model: json.loads(Path(path).read_text()) for model, path in evaluations.items()}
    shared = next(iter(results.values()), {})
    references = {result["reference"] for result in results.values() if result.get("reference")}
    payload = {"split": shared.get("split"), "data": shared.get("data"), "reference": sorted(references),
               "rows": [{"model": model, **{k: result.get(k) for k in LABELS + METRICS}}
                        for model, result in results.items()]}
    write_json_atomic(out, payload)
    return out


def model_labels(reference: str) -> dict[str, Any]:
    """Stage, scheme, weight quantizer and rotation of an evaluated model, from its manifest if it has one."""
    if not is_artifact(Path(reference)):
        return {"stage": "source", "scheme": None, "weights": None, "rotation": None}
    manifest = read_manifest(Path(reference))
    quantization = manifest.get("quantization") or {}
    return {"stage": manifest.get("stage"), "scheme": (quantization.get("scheme") or {}).get("name"),
            "weights": quantization.get("weights"), "rotation": (manifest.get("rotation") or {}).get("kind")}
