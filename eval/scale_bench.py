"""`rotaq scale-bench` (`make scale`): how the wall time and peak memory of each stage grow with model size.

Random models of real shapes (Qwen2.5 0.5B / 1.5B / 3B) are written as bf16 safetensors with the embedded
model's tokenizer; each then goes through rotate → quantize (RTN and GPTQ) → export, every stage as its own
`rotaq` process. A stage's peak resident memory is its process's maxrss (`os.wait4`), its wall time is measured
around it. A stage that grows past `--memory-limit-gb` is stopped by a watchdog that polls its RSS and is
recorded as stopped, and the stages that need its output are skipped: the table then says how far each shape
got on this machine, not only how fast. Not a test: the numbers depend on the machine.

Written here rather than with `/usr/bin/time` or psutil: `os.wait4` gives one child's own peak without a
dependency, and the watchdog needs the running RSS, which /proc has.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rotaq.eval.tables import csv_text, json_records, markdown_table
from rotaq.pipeline.atomic import atomic_write, write_json_atomic
from rotaq.pipeline.errors import RotaqError

SCALE_FORMAT = "rotaq-scale/1"
GIB = 1024 ** 3
QWEN25_VOCAB = 151936
# Qwen2.5 configurations (hidden, MLP, layers, heads, KV heads), tied embeddings as in the released models;
# `tiny` keeps the shape family for the harness's own test.
SHAPES: dict[str, dict[str, Any]] = {
    # The 0.5B shape with half its layers: beside the full one, how time grows with depth at a fixed width.
    "qwen2.5-0.5b-12l": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=12, num_attention_heads=14,
                             num_key_value_heads=2, vocab_size=QWEN25_VOCAB),
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=QWEN25_VOCAB),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=QWEN25_VOCAB),
    "qwen2.5-3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                       num_key_value_heads=2, vocab_size=QWEN25_VOCAB),
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=49152),
}
# 7B-class target of the issue: Qwen2.5-7B's bf16 weights.
SEVEN_B_BF16_GB = 15.2
SCHEME = "w4a8"
GPTQ_TOKENS = 2048


@dataclass(frozen=True)
class StageRun:
    name: str
    needs: str | None  # the stage whose output folder this one reads
    arguments: tuple[str, ...]  # after `rotaq`; {source} and {out} are folders


STAGES = (
    StageRun("rotate", None, ("rotate", "--model", "{source}", "--out", "{out}/rotated")),
    StageRun("quantize-rtn", "rotate", ("quantize", "--model", "{out}/rotated", "--scheme", SCHEME, "--weights", "rtn",
                                        "--out", "{out}/quantized-rtn")),
    StageRun("quantize-gptq", "rotate", ("quantize", "--model", "{out}/rotated", "--scheme", SCHEME, "--weights", "gptq",
                                         "--max-tokens", str(GPTQ_TOKENS), "--out", "{out}/quantized-gptq")),
    StageRun("export", "quantize-rtn", ("export", "--model", "{out}/quantized-rtn", "--out", "{out}/export-rtn")),
)


@dataclass(frozen=True)
class Measured:
    status: str  # "ok", "failed (exit N)" or "stopped over N GB"
    wall_s: float
    peak_rss_bytes: int


def run_measured(command: Sequence[str], memory_limit_bytes: int, log_path: Path, poll_s: float = 0.2) -> Measured:
    """Run `command`, returning its status, wall time and peak RSS; stop it when its RSS passes the limit."""
    started = time.perf_counter()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT)
    stopped = threading.Event()
    done = threading.Event()

    def watch() -> None:
        while not done.wait(poll_s):
            if _rss_bytes(process.pid) > memory_limit_bytes:
                stopped.set()
                os.kill(process.pid, signal.SIGKILL)
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    _, status, usage = os.wait4(process.pid, 0)
    done.set()
    watcher.join()
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: tell Popen not to wait again
    wall = time.perf_counter() - started
    peak = int(usage.ru_maxrss) * 1024  # kilobytes on Linux
    if stopped.is_set():
        return Measured(f"stopped over {memory_limit_bytes / GIB:.1f} GB", wall, peak)
    code = process.returncode
    return Measured("ok" if code == 0 else f"failed (exit {code})", wall, peak)


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def write_random_source(shape: str, folder: Path) -> int:
    """A random Qwen2-architecture model of `shape` in bf16 with the embedded model's tokenizer; returns its
    weights' size in bytes. Kept when it exists already (writing a 3B model takes minutes)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rotaq.pipeline.loading import load_model

    weights = folder / "model.safetensors"
    if not weights.is_file():
        tokenizer = load_model(None).tokenizer
        config = AutoConfig.for_model("qwen2", **SHAPES[shape], tie_word_embeddings=True, max_position_embeddings=4096,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        staging = folder.with_name(folder.name + ".tmp")
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        del model
        staging.rename(folder)
    return weights.stat().st_size


def run_scale_bench(out: Path, shapes: Sequence[str], memory_limit_gb: float,
                    progress: Any = print, stages: Sequence[str] | None = None) -> dict[str, Path]:
    """Measure the stages (default all) of every shape; write scale.json, scale.csv and scale.md into `out`.
    A stage whose input stage is not selected reads that stage's folder from an earlier run, if there is one."""
    unknown = [shape for shape in shapes if shape not in SHAPES]
    if unknown:
        raise RotaqError(f"unknown shape(s) {', '.join(unknown)}; choose from {', '.join(SHAPES)}")
    names = [stage.name for stage in STAGES]
    selected = list(names if stages is None else stages)
    if unknown_stages := [name for name in selected if name not in names]:
        raise RotaqError(f"unknown stage(s) {', '.join(unknown_stages)}; choose from {', '.join(names)}")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for shape in shapes:
        folder = out / shape
        folder.mkdir(exist_ok=True)
        progress(f"{shape}: writing the random bf16 source")
        source_bytes = write_random_source(shape, folder / "source")
        finished = {stage.name for stage in STAGES
                    if stage.name not in selected and _output_folder(stage, folder).is_dir()}
        for stage in (stage for stage in STAGES if stage.name in selected):
            row: dict[str, Any] = {"shape": shape, "layers": SHAPES[shape]["num_hidden_layers"],
                                   "bf16_gb": source_bytes / GIB, "stage": stage.name}
            if stage.needs is not None and stage.needs not in finished:
                rows.append({**row, "status": f"skipped ({stage.needs} did not finish)"})
                continue
            arguments = [argument.format(source=folder / "source", out=folder) for argument in stage.arguments]
            progress(f"{shape}: {stage.name}")
            measured = run_measured([sys.executable, "-m", "rotaq.pipeline.cli", *arguments],
                                    int(memory_limit_gb * GIB), folder / f"{stage.name}.log")
            if measured.status == "ok":
                finished.add(stage.name)
            rows.append({**row, "status": measured.status, "measured": time.strftime("%Y-%m-%d %H:%M"),
                         "wall_s": measured.wall_s,
                         "wall_s_per_layer": measured.wall_s / row["layers"], "peak_rss_gb": measured.peak_rss_bytes / GIB,
                         "peak_over_bf16": measured.peak_rss_bytes / source_bytes})
            progress(f"{shape}: {stage.name} {measured.status}, {measured.wall_s:.0f} s, "
                     f"peak {measured.peak_rss_bytes / GIB:.2f} GB")
    return write_scale_outputs(out, _with_earlier_rows(out, rows), memory_limit_gb)


def _with_earlier_rows(out: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`rows` and the rows of an earlier scale.json in `out` for (shape, stage) pairs not measured again, so a
    run of some stages adds to the table instead of replacing it; each row keeps the time it was measured."""
    import json

    try:
        earlier = json.loads((out / "scale.json").read_text())["rows"]
    except (OSError, ValueError, KeyError, TypeError):
        earlier = []
    measured = {(row["shape"], row["stage"]) for row in rows}
    kept = [row for row in earlier if isinstance(row, dict) and (row.get("shape"), row.get("stage")) not in measured]
    shape_order = {shape: index for index, shape in enumerate(SHAPES)}
    stage_order = {stage.name: index for index, stage in enumerate(STAGES)}
    return sorted(kept + rows, key=lambda row: (shape_order.get(row.get("shape"), len(SHAPES)),
                                                stage_order.get(row.get("stage"), len(STAGES))))


def _output_folder(stage: StageRun, folder: Path) -> Path:
    return Path(stage.arguments[stage.arguments.index("--out") + 1].format(out=folder))


COLUMNS = ["shape", "layers", "bf16_gb", "stage", "status", "measured", "wall_s", "wall_s_per_layer", "peak_rss_gb",
           "peak_over_bf16"]


def seven_b_estimates(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per stage, the peak RSS a 7B model (bf16 15.2 GB) would need, beside the issue's budget (bf16 + 1.5 GB):
    a line through the two largest finished shapes (fixed overhead plus a per-GB slope), or the largest one's
    ratio to its bf16 size when only one finished."""
    estimates = []
    for stage in STAGES:
        done = sorted((row for row in rows if row["stage"] == stage.name and row["status"] == "ok"),
                      key=lambda row: row["bf16_gb"])
        if not done:
            continue
        largest = done[-1]
        if len(done) >= 2 and largest["bf16_gb"] > done[-2]["bf16_gb"]:
            slope = (largest["peak_rss_gb"] - done[-2]["peak_rss_gb"]) / (largest["bf16_gb"] - done[-2]["bf16_gb"])
            estimate = largest["peak_rss_gb"] + slope * (SEVEN_B_BF16_GB - largest["bf16_gb"])
            method = f"line through {done[-2]['shape']} and {largest['shape']}"
        else:
            estimate = largest["peak_over_bf16"] * SEVEN_B_BF16_GB
            method = f"{largest['shape']}'s ratio"
        estimates.append({"stage": stage.name, "estimated_7b_peak_gb": estimate, "budget_7b_gb": SEVEN_B_BF16_GB + 1.5,
                          "method": method})
    return estimates


def write_scale_outputs(out: Path, rows: list[dict[str, Any]], memory_limit_gb: float) -> dict[str, Path]:
    columns = [column for column in COLUMNS if any(row.get(column) is not None for row in rows)]
    estimates = seven_b_estimates(rows)
    paths = {ext: out / f"scale.{ext}" for ext in ("md", "csv", "json")}
    atomic_write(paths["csv"], csv_text(rows, columns))
    write_json_atomic(paths["json"], {"format": SCALE_FORMAT, "scheme": SCHEME, "gptq_tokens": GPTQ_TOKENS,
                                      "memory_limit_gb": memory_limit_gb, "columns": columns,
                                      "rows": json_records(rows, columns), "estimates_7b": estimates})
    lines = ["# Stage time and peak memory by model size", "",
             f"Random Qwen2.5-shaped models in bf16 safetensors; {SCHEME} (RTN, and GPTQ on {GPTQ_TOKENS} tokens); "
             f"each stage is one process, stopped past {memory_limit_gb:g} GB. `peak_over_bf16` is the peak "
             "resident memory over the source's bf16 weights.", "", markdown_table(rows, columns), ""]
    if estimates:
        lines += ["## A 7B model at the same ratios", "",
                  f"Qwen2.5-7B holds {SEVEN_B_BF16_GB} GB in bf16; the target is a peak of at most that plus 1.5 GB.", "",
                  markdown_table(estimates, list(estimates[0])), ""]
    atomic_write(paths["md"], "\n".join(lines))
    return paths
