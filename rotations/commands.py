"""`rotaq rotate`."""

from __future__ import annotations

import argparse
from pathlib import Path

from rotaq.pipeline.cli_args import add_model_argument
from rotaq.pipeline.options import add_option_flags, options_from_args
from rotaq.rotations.stage import RotateOptions


def _cmd_rotate(args: argparse.Namespace) -> int:
    from rotaq.pipeline.artifacts import read_manifest
    from rotaq.rotations.stage import run_rotate

    out = run_rotate(options_from_args(RotateOptions, args, model=args.model, out=Path(args.out)))
    check = read_manifest(out).get("rotation", {}).get("check")
    detail = f" (logit check: max relative error {check['max_relative_logit_error']:.2e})" if check else ""
    print(f"rotated model written to {out}{detail}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    rotate = commands.add_parser("rotate", help="stage 1: fold norms and apply function-preserving Hadamard rotations")
    add_model_argument(rotate)
    rotate.add_argument("--out", required=True, help="output folder (written atomically)")
    add_option_flags(rotate, RotateOptions)
    rotate.set_defaults(handler=_cmd_rotate)
