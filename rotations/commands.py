"""`rotaq rotate`."""

from __future__ import annotations

import argparse
from pathlib import Path

from rotaq.pipeline.cli_args import add_model_argument
from rotaq.pipeline.options import add_option_flags, options_from_args
from rotaq.rotations.learn_stage import LEARN_CALIBRATION
from rotaq.rotations.stage import RotateOptions


def _cmd_rotate(args: argparse.Namespace) -> int:
    from rotaq.pipeline.artifacts import read_manifest
    from rotaq.pipeline.data import DataSpec
    from rotaq.rotations.stage import run_rotate

    calibration = DataSpec(source=args.calib, seq_len=args.seq_len, max_tokens=args.max_tokens)
    out = run_rotate(options_from_args(RotateOptions, args, model=args.model, out=Path(args.out),
                                       calibration=calibration,
                                       checkpoint=Path(args.checkpoint) if args.checkpoint else None))
    rotation = read_manifest(out).get("rotation", {})
    check = rotation.get("check")
    detail = f" (logit check: max relative error {check['max_relative_logit_error']:.2e})" if check else ""
    learned = rotation.get("learned")
    if learned and learned["steps"]:
        detail += (f"; learned in {learned['steps']} steps, {learned['seconds']:.0f} s, "
                   f"loss {learned['first_loss']:.4f} → {learned['last_loss']:.4f}")
    print(f"rotated model written to {out}{detail}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    rotate = commands.add_parser("rotate", help="stage 1: fold norms and apply function-preserving Hadamard rotations")
    add_model_argument(rotate)
    rotate.add_argument("--out", required=True, help="output folder (written atomically)")
    add_option_flags(rotate, RotateOptions)
    learned = rotate.add_argument_group("--rotation learned")
    learned.add_argument("--calib", default=None, help="calibration text (same forms as --data; default Shakespeare)")
    learned.add_argument("--seq-len", type=int, default=LEARN_CALIBRATION.seq_len,
                         help=f"calibration window length (default {LEARN_CALIBRATION.seq_len})")
    learned.add_argument("--max-tokens", type=int, default=LEARN_CALIBRATION.max_tokens,
                         help=f"calibration tokens (default {LEARN_CALIBRATION.max_tokens})")
    learned.add_argument("--checkpoint", default=None,
                         help="resumable state, written every step (default OUT.rotation-checkpoint.pt); "
                              "an interrupted run resumes from it")
    rotate.set_defaults(handler=_cmd_rotate)
