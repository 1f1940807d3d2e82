"""`make gate-check`: measure the latency gate's false-alarm and detection rates (a benchmark, not a test).

On the embedded model's W4A8 export: a baseline saved on the idle machine, then N gate runs of the same
export against it (every fail is a false alarm) and N runs of a copy slowed on purpose (every pass or
inconclusive is a missed regression), alternating, with a competing CPU load on one core during half of
each. The slowed copy's decode slowdown is calibrated, then measured in an idle bench, and quoted.
Writes gate-check.json and gate-check.md.

    python -m rotaq.export.gate_check --out runs/gate-check [--runs 20] [--slowdown 0.20]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from rotaq.eval.tables import markdown_table
from rotaq.pipeline.atomic import atomic_write, write_json_atomic

ROTAQ = [sys.executable, "-m", "rotaq.pipeline.cli"]
# What a CI job would gate on (docs/ci.md): decode after 256 cached tokens and a 128-token prefill, on all
# cores, 5 rounds after a warm-up, up to --max-repeats while inconclusive.
BENCH_FLAGS = ("--no-eager", "--eval-tokens", "0", "--no-cuda", "--prompt-lengths", "128")


def slowed_copy(folder: Path, dest: Path, matmuls: int = 40, width: int = 512) -> Path:
    """The same export with extra input-dependent work added to its graph (a model slowed on purpose):
    `matmuls` chained [tokens, width] × [width, width] products, each followed by a Tanh, whose result
    is multiplied by 0 and added to the logits, so the outputs are unchanged and the cost is real.
    export.json's recorded hash of the graph is updated, as a real re-export's would be."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from rotaq.pipeline.artifacts import sha256_file

    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(folder, dest)
    path = dest / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    producer = next(node for node in graph.node if "logits" in node.output)
    producer.output[list(producer.output).index("logits")] = "logits_unslowed"
    weight = np.random.default_rng(0).standard_normal((width, width)).astype(np.float32) / width
    graph.initializer.extend([numpy_helper.from_array(weight, "slow_w"),
                              numpy_helper.from_array(np.array([1, 1, width], np.int64), "slow_shape"),
                              numpy_helper.from_array(np.array([-1], np.int64), "slow_axes"),
                              numpy_helper.from_array(np.array(0.0, np.float32), "slow_zero")])
    nodes = [helper.make_node("Cast", ["input_ids"], ["slow_ids"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["slow_ids", "slow_axes"], ["slow_col"]),
             helper.make_node("Expand", ["slow_col", "slow_shape"], ["slow_x0"])]
    for i in range(matmuls):
        nodes += [helper.make_node("MatMul", [f"slow_x{i}", "slow_w"], [f"slow_m{i}"]),
                  helper.make_node("Tanh", [f"slow_m{i}"], [f"slow_x{i + 1}"])]
    nodes += [helper.make_node("ReduceMean", [f"slow_x{matmuls}"], ["slow_mean"], keepdims=0),
              helper.make_node("Mul", ["slow_mean", "slow_zero"], ["slow_nothing"]),
              helper.make_node("Add", ["logits_unslowed", "slow_nothing"], ["logits"])]
    graph.node.extend(nodes)
    onnx.save(model, str(path))
    manifest_path = dest / "export.json"
    manifest = json.loads(manifest_path.read_text())
    manifest.setdefault("files", {})["model.onnx"] = sha256_file(path)
    manifest.setdefault("file_sizes", {})["model.onnx"] = path.stat().st_size
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return dest


def build_exports(root: Path) -> dict[str, Path]:
    """The rotated embedded model's float32 and W4A8 (RTN) exports, built once under `root`."""
    from rotaq.export.stage import ExportOptions, run_export
    from rotaq.quantizers.stage import QuantizeOptions, run_quantize
    from rotaq.rotations.stage import RotateOptions, run_rotate

    rotated, w4a8 = root / "rotated", root / "w4a8"
    if not rotated.is_dir():
        run_rotate(RotateOptions(out=rotated))
    if not w4a8.is_dir():
        run_quantize(QuantizeOptions(model=str(rotated), out=w4a8, scheme="w4a8", weights="rtn"))
    exports = {"fp32": root / "fp32-onnx", "w4a8": root / "w4a8-onnx"}
    for name, source in (("fp32", rotated), ("w4a8", w4a8)):
        if not (exports[name] / "export.json").is_file():
            run_export(ExportOptions(model=str(source), out=exports[name]))
    return exports


def bench(models: list[Path], out: Path, *flags: str) -> tuple[int, float, dict[str, Any]]:
    """One `rotaq bench` as CI would run it: exit code, wall seconds, and its gate.json (if any)."""
    start = time.perf_counter()
    completed = subprocess.run([*ROTAQ, "bench", *map(str, models), "--out", str(out), *BENCH_FLAGS, *flags],
                               capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if completed.returncode not in (0, 1, 3):
        raise SystemExit(f"bench failed (exit {completed.returncode}):\n{completed.stderr[-3000:]}")
    gate = out / "gate.json"
    return completed.returncode, seconds, json.loads(gate.read_text()) if gate.is_file() else {}


def decode_slowdown(fp32: Path, base: Path, slowed: Path, out: Path, repeats: int) -> float:
    """1 − (slowed decode tok/s ÷ base decode tok/s), each against the float32 graph of the same run."""
    bench([fp32, base], out / "base", "--repeats", str(repeats))
    rows_base = json.loads((out / "base" / "bench.json").read_text())
    bench([fp32, slowed], out / "slowed", "--repeats", str(repeats))
    rows_slowed = json.loads((out / "slowed" / "bench.json").read_text())
    speedup = {name: next(r["decode_speedup"] for r in rows if r["model"] == base.name)
               for name, rows in (("base", rows_base), ("slowed", rows_slowed))}
    return 1 - speedup["slowed"] / speedup["base"]


def calibrate_slowed(exports: dict[str, Path], root: Path, target: float) -> tuple[Path, int, float]:
    """A slowed copy of the W4A8 export whose decode is `target` slower, by scaling the number of extra
    MatMuls from a first measurement (two corrections)."""
    slowed = root / "slowed" / exports["w4a8"].name
    matmuls = 40
    for _ in range(3):
        slowed_copy(exports["w4a8"], slowed, matmuls=matmuls, width=512)
        measured = decode_slowdown(exports["fp32"], exports["w4a8"], slowed, root / "calibration", repeats=3)
        print(f"calibration: {matmuls} extra MatMuls slow decode by {measured:.1%}", flush=True)
        if abs(measured - target) < 0.03 or measured <= 0:
            break
        # Extra time per token grows linearly with the MatMuls: time ratio 1/(1 − s) − 1 is that extra.
        extra, wanted = 1 / (1 - measured) - 1, 1 / (1 - target) - 1
        matmuls = max(1, round(matmuls * wanted / extra))
    return slowed, matmuls, measured


class CpuLoad:
    """A busy loop pinned to one core: the competing job of a shared CI runner."""

    def __init__(self, core: int) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", "while True: pass"],
                                        preexec_fn=lambda: os.sched_setaffinity(0, {core}))

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/gate-check")
    parser.add_argument("--runs", type=int, default=20, help="gate runs of each kind (default 20)")
    parser.add_argument("--slowdown", type=float, default=0.20, help="decode slowdown of the slowed copy")
    parser.add_argument("--tolerance", type=float, default=0.10, help="the gate's --max-regression")
    parser.add_argument("--baseline-repeats", type=int, default=10)
    parser.add_argument("--max-repeats", type=int, default=15)
    args = parser.parse_args(argv)
    root = Path(args.out)
    exports = build_exports(root)
    slowed, matmuls, calibrated = calibrate_slowed(exports, root, args.slowdown)
    measured = decode_slowdown(exports["fp32"], exports["w4a8"], slowed, root / "slowdown", repeats=10)
    print(f"slowed copy: {matmuls} extra MatMuls; decode {measured:.1%} slower (idle bench, 10 repeats)", flush=True)
    baseline = root / "baseline.json"
    bench([exports["fp32"], exports["w4a8"]], root / "baseline-run", "--repeats", str(args.baseline_repeats),
          "--save-baseline", str(baseline))
    cores = sorted(os.sched_getaffinity(0))
    runs = []
    for index in range(2 * args.runs):
        kind = "self" if index % 2 == 0 else "slowed"
        loaded = (index // 2) % 2 == 1  # every other pair of runs shares the machine with a busy core
        load = CpuLoad(cores[-1]) if loaded else None
        try:
            code, seconds, gate = bench([exports["fp32"], exports["w4a8"] if kind == "self" else slowed],
                                        root / "runs" / f"{index:02d}", "--baseline", str(baseline),
                                        "--max-regression", str(args.tolerance),
                                        "--max-repeats", str(args.max_repeats))
        finally:
            if load is not None:
                load.stop()
        decode = next((row for row in gate.get("rows", []) if row["measure"] == "decode_tokens_per_s"
                       and row["model"] == exports["w4a8"].name), {})
        runs.append({"run": index, "kind": kind, "cpu_load": loaded, "exit_code": code,
                     "verdict": gate.get("verdict"), "wall_s": round(seconds, 1), "rounds": gate.get("repeats"),
                     "decode_change": decode.get("change_vs_fp32"), "decode_low": decode.get("low"),
                     "decode_high": decode.get("high")})
        print(f"run {index:2d} {kind:6s} load={loaded!s:5s} -> {gate.get('verdict')} (exit {code}, "
              f"{seconds:.0f} s, {gate.get('repeats')} rounds)", flush=True)
    summary = summarise(runs)
    record = {"settings": vars(args), "slowed_matmuls": matmuls, "calibrated_slowdown": calibrated,
              "measured_decode_slowdown": measured, "summary": summary, "runs": runs}
    write_json_atomic(root / "gate-check.json", record)
    atomic_write(root / "gate-check.md", markdown_table(summary) + "\n" + markdown_table(
        runs, formats={"decode_change": "+.1%", "decode_low": "+.1%", "decode_high": "+.1%"}) +
        f"\nSlowed copy: {matmuls} extra MatMuls, decode {measured:.1%} slower in an idle 10-round bench; "
        f"tolerance {args.tolerance:.0%}; baseline of {args.baseline_repeats} rounds.\n")
    print(markdown_table(summary))
    return 0


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Verdict counts and wall time per kind of run and load."""
    rows = []
    for kind in ("self", "slowed"):
        for loaded in (False, True, None):
            chosen = [r for r in runs if r["kind"] == kind and (loaded is None or r["cpu_load"] == loaded)]
            if not chosen:
                continue
            verdicts = Counter(r["verdict"] for r in chosen)
            walls = sorted(r["wall_s"] for r in chosen)
            rows.append({"runs": kind, "cpu load": {False: "idle", True: "1 core busy", None: "all"}[loaded],
                         "count": len(chosen), "pass": verdicts["pass"], "inconclusive": verdicts["inconclusive"],
                         "fail": verdicts["fail"], "median wall s": walls[len(walls) // 2], "max wall s": walls[-1],
                         "median rounds": sorted(r["rounds"] or 0 for r in chosen)[len(chosen) // 2]})
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
