"""`rotaq eval` and `rotaq outliers`: score a model on held-out text, and measure activation outliers."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rotaq.eval.metrics import EvalResult, evaluate
from rotaq.eval.outliers import collect_linear_input_stats, outlier_table, summarize
from rotaq.eval.plots import plot_outliers
from rotaq.eval.tables import markdown_table, write_table
from rotaq.pipeline.devices import CPU, device_problem, torch_device
from rotaq.pipeline.atomic import write_json_atomic
from rotaq.pipeline.cli_args import add_data_arguments, add_model_argument, data_spec, print_json
from rotaq.pipeline.data import DataSpec, load_split_windows, windows_fingerprint
from rotaq.pipeline.errors import RotaqError
from rotaq.pipeline.loading import LoadedModel, load_model
from rotaq.pipeline.options import add_option_flags, options_from_args, setting


@dataclass(frozen=True)
class EvalOptions:
    model: str | None
    data: DataSpec = DataSpec()
    reference: str | None = None
    batch_size: int = setting(4, "windows per forward pass", minimum=1)
    device: str = setting(CPU, "where the forward passes run: cpu, cuda or cuda:N", check=device_problem)
    progress: bool = True


def run_eval(options: EvalOptions) -> dict[str, Any]:
    """Perplexity on the evaluation split; with a reference, also KL divergence and top-1 agreement."""
    device = torch_device(options.device)
    loaded = load_model(options.model)
    windows = load_split_windows(options.data, loaded.tokenizer, "evaluation")
    reference = load_model(options.reference).model.to(device) if options.reference else None
    result: EvalResult = evaluate(loaded.model.to(device), windows, reference=reference, batch_size=options.batch_size,
                                  progress=options.progress)
    return {"model": options.model or "default", "reference": options.reference, "data": options.data.source or "default",
            "split": "evaluation", "windows_sha256": windows_fingerprint(windows), **result.to_dict()}


@dataclass(frozen=True)
class OutlierOptions:
    model: str | None
    out: Path
    before: str | None = None
    data: DataSpec = DataSpec(max_tokens=4096)
    progress: bool = True


def source_reference(loaded: LoadedModel) -> str | None:
    """The `--model` value that loads the model a stage folder was made from, if it is on disk or a hub id."""
    origin = (loaded.source.get("origin") or {}) if loaded.source.get("kind") == "artifact" else loaded.source
    while origin.get("kind") == "artifact":
        origin = origin.get("origin") or {}
    return origin.get("path") or origin.get("id")


def run_outliers(options: OutlierOptions) -> dict[str, Any]:
    """Peak-to-RMS and kurtosis of every linear layer's input, before and after rotation: table + PNG."""
    loaded = load_model(options.model)
    before_spec = options.before or source_reference(loaded)
    if before_spec is None:
        raise RotaqError("cannot tell which model came before this one; pass --before")
    windows = load_split_windows(options.data, loaded.tokenizer, "calibration")
    after_stats = collect_linear_input_stats(loaded.model, windows, progress=options.progress)
    before_stats = collect_linear_input_stats(load_model(before_spec).model, windows, progress=options.progress)
    rows = outlier_table(before_stats, after_stats)
    out = Path(options.out)
    write_table(rows, out / "outliers")
    plot_outliers(before_stats, after_stats, out / "outliers.png", title=f"Linear-layer inputs: {before_spec} vs rotated")
    summary = {"model": options.model, "before": before_spec, "windows": int(windows.shape[0]),
               "seq_len": int(windows.shape[1]), "before_summary": summarize(before_stats),
               "after_summary": summarize(after_stats)}
    write_json_atomic(out / "outliers_summary.json", summary)
    return summary


def _cmd_eval(args: argparse.Namespace) -> int:
    result = run_eval(options_from_args(EvalOptions, args, model=args.model, data=data_spec(args),
                                        reference=args.reference, progress=not args.json))
    if args.json:
        print_json(result)
    else:
        columns = ["perplexity", "nll", "tokens", "kl_divergence", "top1_agreement"]
        print(markdown_table([result], [c for c in columns if result.get(c) is not None]))
    if args.out:
        write_json_atomic(Path(args.out), result)
    return 0


def _cmd_outliers(args: argparse.Namespace) -> int:
    summary = run_outliers(OutlierOptions(model=args.model, out=Path(args.out), before=args.before,
                                          data=data_spec(args)))
    before, after = summary["before_summary"], summary["after_summary"]
    print(f"largest max|x|/RMS over linear inputs: before {before['max_abs_over_rms']:.1f} "
          f"({before['max_abs_over_rms_layer']}), after {after['max_abs_over_rms']:.1f} "
          f"({after['max_abs_over_rms_layer']}); table and plot in {args.out}")
    return 0


def _table_rotations(names: str) -> tuple[bool, ...]:
    """--rotation's comma list as the table's flags (True: Hadamard); other rotations come as --rotated folders."""
    chosen = [name.strip() for name in names.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in ("none", "hadamard")]
    if unknown:
        raise RotaqError(f"--rotation takes none and hadamard, not {', '.join(unknown)}; score a learned rotation "
                         "by rotating first (rotaq rotate --rotation learned --out DIR) and passing --rotated DIR")
    return tuple(name == "hadamard" for name in chosen)


def _cmd_accuracy_table(args: argparse.Namespace) -> int:
    from rotaq.eval.accuracy_table import COLUMNS, AccuracyTableOptions, run_accuracy_table

    rows = run_accuracy_table(AccuracyTableOptions(
        out=Path(args.out), model=args.model, schemes=tuple(args.schemes.split(",")),
        rotations=_table_rotations(args.rotation), rotated=tuple(Path(folder) for folder in args.rotated),
        weight_methods=tuple(args.weights.split(",")),
        evaluation=DataSpec(source=args.data, seq_len=args.seq_len, max_tokens=args.max_tokens),
        calibration=DataSpec(source=args.data, seq_len=args.seq_len, max_tokens=args.calib_tokens),
        act_clip_ratio=args.act_clip_ratio, act_symmetric=False if args.asymmetric_activations else None))
    print(markdown_table(rows, COLUMNS))
    print(f"\nwritten to {Path(args.out) / 'accuracy'}.{{md,csv,json}}")
    return 0


def _cmd_scale_bench(args: argparse.Namespace) -> int:
    from rotaq.eval.scale_bench import run_scale_bench

    paths = run_scale_bench(Path(args.out), args.shapes.split(","), args.memory_limit_gb,
                            stages=args.stages.split(",") if args.stages else None)
    print(paths["md"].read_text())
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser("eval", help="perplexity (and KL / top-1 vs --reference) on held-out text")
    add_model_argument(evaluate)
    add_data_arguments(evaluate, max_tokens=None)
    evaluate.add_argument("--reference", default=None, help="model to compare next-token distributions against")
    add_option_flags(evaluate, EvalOptions)
    evaluate.add_argument("--json", action="store_true", help="print JSON instead of a table")
    evaluate.add_argument("--out", default=None, help="also write the JSON result to this file")
    evaluate.set_defaults(handler=_cmd_eval)

    outliers = commands.add_parser("outliers", help="activation outlier statistics of every linear input, before/after")
    add_model_argument(outliers)
    outliers.add_argument("--before", default=None, help="model to compare with (default: the source of --model)")
    outliers.add_argument("--out", required=True, help="folder for outliers.{md,csv,json,png}")
    add_data_arguments(outliers, max_tokens=4096)
    outliers.set_defaults(handler=_cmd_outliers)

    table = commands.add_parser("accuracy-table",
                                help="benchmark: perplexity / KL / top-1 of every scheme, with and without rotation")
    add_model_argument(table)
    add_data_arguments(table, max_tokens=16 * 512)
    table.add_argument("--out", required=True, help="folder for accuracy.{md,csv,json}")
    table.add_argument("--schemes", default="w8a8,w4a8,w4a4,w4a16-g128")
    table.add_argument("--rotation", default="none,hadamard",
                       help="comma list of none,hadamard (empty: only the --rotated folders)")
    table.add_argument("--rotated", action="append", default=[], metavar="DIR",
                       help="a folder from `rotaq rotate` of --model (e.g. a learned rotation), scored as one more "
                            "rotation; repeatable")
    table.add_argument("--weights", default="rtn,gptq", help="comma list of rtn,gptq")
    table.add_argument("--calib-tokens", type=int, default=32 * 512, help="calibration tokens for GPTQ")
    table.add_argument("--act-clip-ratio", type=float, default=None,
                       help="clip per-token activation ranges (rows get a 'variant' label, so runs add up)")
    table.add_argument("--asymmetric-activations", action="store_true",
                       help="asymmetric per-token activations (a separate variant)")
    table.set_defaults(handler=_cmd_accuracy_table)

    scale = commands.add_parser("scale-bench", help="benchmark: wall time and peak memory of each stage on random "
                                                    "Qwen2.5-shaped bf16 models of growing size")
    scale.add_argument("--out", default="runs/scale", help="folder for the models and scale.{md,csv,json}")
    scale.add_argument("--shapes", default="qwen2.5-0.5b,qwen2.5-1.5b",
                       help="comma list of qwen2.5-0.5b, qwen2.5-1.5b, qwen2.5-3b (and tiny)")
    scale.add_argument("--memory-limit-gb", type=float, default=20.0,
                       help="stop a stage whose resident memory passes this (default 20)")
    scale.add_argument("--stages", default=None,
                       help="comma list of rotate, quantize-rtn, quantize-gptq, export (default: all); a stage "
                            "whose input stage is left out reads that stage's folder from an earlier run")
    scale.set_defaults(handler=_cmd_scale_bench)
