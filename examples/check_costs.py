"""What each reliability check costs on the embedded model: run after `make gate-check`, which builds
runs/gate-check/{rotated,w4a8,fp32-onnx,w4a8-onnx}: python examples/check_costs.py runs/gate-check
(best of 3, files in the page cache). Quoted in docs/reliability.md."""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path

from rotaq.export.layout import read_layout
from rotaq.pipeline.artifacts import file_records, verify_files
from rotaq.pipeline.loading import cache_root, conversion_cache_problem
from rotaq.pipeline.locks import folder_lock

def best(fn: Callable[[], object], n: int = 3) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    return min(times)

root = Path(sys.argv[1])
rows: list[tuple[str, str, float]] = []
for name in ["rotated", "w4a8"]:
    folder = root / name
    manifest = {"format": "x", **file_records(folder)}
    size = sum(manifest["file_sizes"].values()) / 2**20
    rows.append((f"{name} (stage folder, {size:.0f} MiB)", "reuse check: sizes + files <= 64 MiB hashed",
                 best(lambda: verify_files(folder, manifest, full=False))))
    rows.append((f"{name} (stage folder, {size:.0f} MiB)", "--verify: every file hashed",
                 best(lambda: verify_files(folder, manifest, full=True))))
for name in ["fp32-onnx", "w4a8-onnx"]:
    layout = read_layout(root / name)
    # Records made now, so folders from before file sizes were recorded are measured the same way.
    layout = dataclasses.replace(layout, manifest={**layout.manifest,
                                                   **file_records(root / name, exclude=("export.json",))})
    size = sum(p.stat().st_size for p in layout.graph_files()) / 2**20
    rows.append((f"{name} (graph, {size:.0f} MiB)", "generate: sizes", best(lambda: layout.verify_graph(full=False))))
    rows.append((f"{name} (graph, {size:.0f} MiB)", "bench / generate --verify: SHA-256",
                 best(lambda: layout.verify_graph(full=True))))
cached = next(p for p in (cache_root() / "gguf").iterdir() if p.is_dir())
rows.append(("GGUF conversion cache (513 MiB)", "every load: every file hashed", best(lambda: conversion_cache_problem(cached), 1)))
lock_dir = root / "lock-cost"
lock_dir.mkdir(exist_ok=True)
def lock() -> None:
    with folder_lock(lock_dir):
        pass
rows.append(("run folder", "lock taken and released", best(lock)))
print("| what | check | seconds |\n|---|---|---|")
for what, check, seconds in rows:
    print(f"| {what} | {check} | {seconds:.4f} |")
