"""`rotaq export`, `rotaq generate` and `rotaq bench`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from rotaq.export.stage import ExportOptions
from rotaq.pipeline.cli_args import add_model_argument
from rotaq.pipeline.options import add_option_flags, options_from_args


def _cmd_export(args: argparse.Namespace) -> int:
    from rotaq.export.layout import read_layout
    from rotaq.export.stage import run_export

    out = run_export(options_from_args(ExportOptions, args, model=args.model, out=Path(args.out)))
    manifest = read_layout(out).manifest
    checks = manifest["checks"]
    size = sum((out / name).stat().st_size for name in manifest["files"]) / 2**20
    print(f"ONNX export written to {out} ({size:.1f} MiB, {manifest['export_seconds']:.1f} s); "
          f"max relative logit error: export forward vs model {checks['graph_vs_model']['max_rel_error']:.2e}, "
          f"ONNX Runtime vs PyTorch {checks['ort_vs_torch']['max_rel_error']:.2e}, "
          f"cached decode vs prefill {checks['decode_vs_prefill']['max_rel_error']:.2e}")
    if "quantized_layers_max_rel_error" in checks:
        print(f"quantized layers alone in ONNX Runtime vs their reference: "
              f"{checks['quantized_layers_max_rel_error']:.2e}; whole-model top-1 agreement with PyTorch "
              f"{checks['ort_vs_torch']['top1_agreement']:.3f} (rounding ties make whole-model logits diverge)")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from rotaq.export.generate import SamplingOptions, generate_text

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    options = SamplingOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_p=args.top_p, seed=args.seed)
    write(args.prompt)
    result = generate_text(Path(args.folder), args.prompt, options, on_text=write, threads=args.threads,
                           verify=args.verify, runtime=args.runtime)
    write("\n")
    rate = len(result.token_ids) / result.seconds if result.seconds > 0 else float("inf")
    print(f"[{result.prompt_tokens} prompt tokens, {len(result.token_ids)} new tokens, {rate:.1f} tokens/s, "
          f"{result.runtime}]", file=sys.stderr)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from rotaq.eval.tables import markdown_table
    from rotaq.export.bench import BenchOptions, readable_columns, run_bench_with_meta
    from rotaq.pipeline.data import DataSpec

    options = BenchOptions(
        models=tuple(args.folders), out=Path(args.out), reference=args.reference,
        prompt_lengths=tuple(int(n) for n in args.prompt_lengths.split(",")), cached_tokens=args.cached_tokens,
        decode_tokens=args.decode_tokens, threads=args.threads, repeats=args.repeats, warmup=args.warmup,
        eager=not args.no_eager, cuda=not args.no_cuda, genai=not args.no_genai, profile=args.profile, perplexity=args.eval_tokens > 0, peers=tuple(args.peer),
        evaluation=DataSpec(source=args.data, seq_len=args.seq_len, max_tokens=max(args.eval_tokens, 2)))
    gate = baseline = more_rounds = None
    from rotaq.export.bench_gate import check_baseline_target, check_bench_outputs

    check_bench_outputs(Path(args.out), Path(args.json) if args.json else None, args.force)
    if args.save_baseline:
        check_baseline_target(Path(args.save_baseline), args.force)
    if args.baseline:  # options and baseline are checked before spending minutes timing
        from rotaq.export.bench_gate import GateOptions, load_baseline, more_rounds_while_inconclusive

        gate = GateOptions(baseline=Path(args.baseline), max_regression=args.max_regression,
                           metrics=tuple(m.strip() for m in args.metric.split(",")), absolute=args.absolute,
                           inconclusive=args.inconclusive, max_repeats=max(args.max_repeats, args.repeats))
        baseline = load_baseline(gate.baseline)
        more_rounds = more_rounds_while_inconclusive(baseline, gate, batch=args.repeats)
    rows, meta = run_bench_with_meta(options, more_rounds)
    print(markdown_table(rows, readable_columns(rows)))
    if args.json:
        from rotaq.pipeline.atomic import write_json_atomic

        write_json_atomic(Path(args.json), rows)
    print(f"written to {Path(args.out) / 'bench'}.{{md,csv,json}}")
    if args.save_baseline:
        from rotaq.export.bench_gate import save_baseline

        print(f"baseline written to {save_baseline(rows, meta, Path(args.save_baseline))}")
    if gate is not None:
        return _gate(gate, baseline, rows, meta, Path(args.out))
    return 0


def _gate(gate: Any, baseline: dict, rows: list, meta: dict, out: Path) -> int:
    from rotaq.eval.tables import markdown_table
    from rotaq.export.bench_gate import compare
    from rotaq.pipeline.atomic import atomic_write, write_json_atomic

    result = compare(rows, meta, baseline, gate)
    columns = ["model", "runtime", "measure", "old", "new", "change", "old_vs_fp32", "new_vs_fp32",
               "change_vs_fp32", "low", "high", "rounds", "verdict", "note"]
    present = [c for c in columns if any(c in row for row in result.rows)]
    table = markdown_table(result.rows, present, formats={key: "+.1%" for key in ("change", "change_vs_fp32",
                                                                                   "low", "high")})
    print(table)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    code = result.exit_code(gate.inconclusive)
    action = {0: "passes", 1: "fails", 3: "exits 3"}[code]
    summary = (f"latency gate {result.verdict.upper()} (tolerance {gate.max_regression:.0%} on the change against "
               f"the float32 graph{' and absolute' if gate.absolute else ''}, {gate.confidence:.0%} intervals "
               f"low..high over {meta['repeats']} rounds); the job {action}")
    write_json_atomic(out / "gate.json", {"verdict": result.verdict, "exit_code": code, "repeats": meta["repeats"],
                                          "tolerance": gate.max_regression, "confidence": gate.confidence,
                                          "rows": result.rows, "warnings": result.warnings})
    atomic_write(out / "gate.md", table + "".join(f"\n- warning: {w}" for w in result.warnings) + f"\n\n{summary}\n")
    print(summary)
    return code


def register(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser("export", help="stage 5: ONNX graph with KV cache, checked against PyTorch in ONNX Runtime")
    add_model_argument(export)
    export.add_argument("--out", required=True, help="output folder (written atomically)")
    add_option_flags(export, ExportOptions)
    export.set_defaults(handler=_cmd_export)

    generate = commands.add_parser("generate", help="generate text from an exported folder with ONNX Runtime")
    generate.add_argument("folder", help="folder written by `rotaq export`")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--verify", action="store_true",
                          help="check the graph's SHA-256 against export.json before loading (default: its size)")
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    generate.add_argument("--seed", type=int, default=0, help="sampling seed")
    generate.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all)")
    generate.add_argument("--runtime", default="auto", choices=["auto", "genai", "onnxruntime"],
                          help="auto (default): onnxruntime-genai's Generator when it is installed, else the plain "
                               "ONNX Runtime loop")
    generate.set_defaults(handler=_cmd_generate)

    bench = commands.add_parser("bench", help="benchmark: prefill latency, decode tokens/s, size, memory and "
                                              "perplexity of exported models beside float32 ONNX and PyTorch")
    bench.add_argument("folders", nargs="+", help="folders written by `rotaq export`")
    bench.add_argument("--out", default="bench", help="folder for bench.{md,csv,json} (default ./bench)")
    bench.add_argument("--json", default=None,
                       help="also write the rows to this JSON file (replaces only an earlier bench's --json)")
    bench.add_argument("--reference", default=None,
                       help="float32 export to compare against (default: one of the folders, or the float "
                            "parent of the first, exported into OUT/reference-fp32)")
    bench.add_argument("--prompt-lengths", default="128,512", help="prefill lengths, comma separated")
    bench.add_argument("--cached-tokens", type=int, default=256, help="KV cache length before decoding")
    bench.add_argument("--decode-tokens", type=int, default=64, help="decode steps timed per repeat")
    bench.add_argument("--repeats", type=int, default=5, help="interleaved timed rounds (median reported)")
    bench.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    bench.add_argument("--threads", type=int, default=None, help="intra-op threads, pinned (default: all cores)")
    bench.add_argument("--baseline", default=None,
                       help="gate: compare with this baseline JSON; exit 0 pass, 1 regression, 3 inconclusive")
    bench.add_argument("--max-regression", type=float, default=0.10, help="gate tolerance (default 0.10 = 10%%)")
    bench.add_argument("--metric", default="decode,prefill", help="gated measures: decode, prefill or both")
    bench.add_argument("--absolute", action="store_true",
                       help="gate also on absolute latency (default: only on the ratio to float32, which is "
                            "robust to a slower or busier machine; absolute drops warn)")
    bench.add_argument("--inconclusive", default="exit", choices=["exit", "fail", "pass"],
                       help="gate: what an inconclusive verdict does (exit: exit code 3, the default)")
    bench.add_argument("--max-repeats", type=int, default=20,
                       help="gate: while inconclusive, time --repeats more rounds, up to this many (default 20)")
    bench.add_argument("--save-baseline", default=None,
                       help="write this run as a baseline JSON (replaces only an existing baseline)")
    bench.add_argument("--force", action="store_true",
                       help="let --out, --json and --save-baseline replace files that are not an earlier bench's")
    bench.add_argument("--peer", action="append", default=[], choices=["genai"],
                       help="also build and time onnxruntime-genai's int4/int8/fp32 graphs of the same float model "
                            "(needs the 'peer' extra)")
    bench.add_argument("--no-eager", action="store_true", help="skip the PyTorch eager float32 row")
    bench.add_argument("--no-genai", action="store_true",
                       help="skip timing the exports through onnxruntime-genai's Generator (default: when installed)")
    bench.add_argument("--profile", action="store_true",
                       help="profile one decode step of the first 4-bit export and of the builder's int4 graph "
                            "(ONNX Runtime's profiler): OUT/profile.md, time per operator type side by side")
    bench.add_argument("--no-cuda", action="store_true", help="skip CUDA rows even when a GPU is present")
    bench.add_argument("--data", default=None, help="evaluation text (default Shakespeare's held-out split)")
    bench.add_argument("--seq-len", type=int, default=512)
    bench.add_argument("--eval-tokens", type=int, default=16 * 512,
                       help="held-out tokens for perplexity on the graphs (0 skips it)")
    bench.set_defaults(handler=_cmd_bench)
