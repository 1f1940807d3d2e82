"""`rotaq bench --profile`: where one decode step's time goes, per operator type, for two graphs side by side.

Both graphs are read through their genai_config.json (rotaq's exports and the builder's folders have
one), run with ONNX Runtime's own profiler on the same single-token step after the same cached length,
and the node events are summed by operator type. The profiler's per-node times include each node's
dispatch, which is what a small model's decode step is made of, so the table shows where a gap is.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from rotaq.export.genai_folder import GENAI_CONFIG
from rotaq.export.runtime import create_session
from rotaq.pipeline.atomic import atomic_write, write_json_atomic

PROFILE_FILE = "profile"


def profile_decode_step(folder: Path, threads: int, cached_tokens: int, steps: int = 20) -> dict[str, Any]:
    """Milliseconds per decode step by operator type (node events only), and the node count per type."""
    decoder = json.loads((Path(folder) / GENAI_CONFIG).read_text())["model"]["decoder"]
    with tempfile.TemporaryDirectory() as scratch:
        session = create_session(Path(folder) / decoder["filename"], threads, profile_prefix=f"{scratch}/step")
        shape = (1, decoder["num_key_value_heads"], cached_tokens, decoder["head_size"])
        rng = np.random.default_rng(0)
        feeds: dict[str, Any] = {"input_ids": np.array([[42]], np.int64),
                                 "attention_mask": np.ones((1, cached_tokens + 1), np.int64)}
        for value in session.get_inputs():
            if value.name.startswith("past_key_values"):
                feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
        warmup = 3  # the first calls allocate; their events are dropped below
        for _ in range(warmup + steps):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = sorted(e["ts"] + e["dur"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    timed_from = runs[warmup - 1] if len(runs) >= warmup else 0
    events = [e for e in events if e.get("ts", 0) >= timed_from]
    total: dict[str, float] = defaultdict(float)
    calls: Counter[str] = Counter()
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            op = event["args"]["op_name"]
            total[op] += event["dur"] / 1000.0
            calls[op] += 1
    return {"ms_per_step": {op: ms / steps for op, ms in total.items()},
            "nodes": {op: count // steps for op, count in calls.items()}}


def write_profile(profiles: dict[str, dict[str, Any]], out: Path, meta: dict[str, Any]) -> Path:
    """profile.json and profile.md: one row per operator type, ms per step and node count per graph."""
    labels = list(profiles)
    ops = sorted({op for p in profiles.values() for op in p["ms_per_step"]},
                 key=lambda op: -max(p["ms_per_step"].get(op, 0.0) for p in profiles.values()))
    header = "| operator | " + " | ".join(f"{label} ms | {label} nodes" for label in labels) + " |"
    lines = [header, "|---|" + "---:|---:|" * len(labels)]
    for op in ops:
        cells = [f"{profiles[label]['ms_per_step'].get(op, 0.0):.3f} | {profiles[label]['nodes'].get(op, 0)}"
                 for label in labels]
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    totals = [f"**{sum(profiles[label]['ms_per_step'].values()):.3f}** | **{sum(profiles[label]['nodes'].values())}**"
              for label in labels]
    lines.append("| all nodes | " + " | ".join(totals) + " |")
    note = (f"\nONNX Runtime profiler, node events only, one decode step after {meta['cached_tokens']} cached "
            f"tokens, mean of {meta['steps']} steps, {meta['threads']} threads.\n")
    write_json_atomic(out / f"{PROFILE_FILE}.json", {"profiles": profiles, **meta})
    path = out / f"{PROFILE_FILE}.md"
    atomic_write(path, "\n".join(lines) + "\n" + note)
    return path
