"""`rotaq rotate`."""

from __future__ import annotations

import argparse
from pathlib import Path

from rotaq.pipeline.cli_args import add_model_argument


def _cmd_rotate(args: argparse.Namespace) -> int:
    from rotaq.pipeline.artifacts import read_manifest
    from rotaq.rotations.stage import RotateOptions, run_rotate

    out = run_rotate(RotateOptions(model=args.model, out=Path(args.out), rotation=args.rotation, seed=args.seed,
                                   online=not args.no_online, check=not args.no_check))
    check = read_manifest(out).get("rotation", {}).get("check")
    detail = f" (logit check: max relative error {check['max_relative_logit_error']:.2e})" if check else ""
    print(f"rotated model written to {out}{detail}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    rotate = commands.add_parser("rotate", help="stage 1: fold norms and apply function-preserving Hadamard rotations")
    add_model_argument(rotate)
    rotate.add_argument("--out", required=True, help="output folder (written atomically)")
    rotate.add_argument("--rotation", choices=["hadamard", "random"], default="hadamard",
                        help="residual rotation: randomized Hadamard, or seeded random orthogonal for widths without one")
    rotate.add_argument("--seed", type=int, default=0)
    rotate.add_argument("--no-online", action="store_true", help="skip the online rotations before o_proj/down_proj")
    rotate.add_argument("--no-check", action="store_true", help="skip the logit check (saves one model copy in memory)")
    rotate.set_defaults(handler=_cmd_rotate)
