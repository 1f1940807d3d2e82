"""`rotaq quantize`."""

from __future__ import annotations

import argparse
from pathlib import Path

from rotaq.pipeline.cli_args import add_model_argument
from rotaq.pipeline.options import add_option_flags, options_from_args
from rotaq.quantizers.stage import QuantizeOptions


def _cmd_quantize(args: argparse.Namespace) -> int:
    from rotaq.pipeline.data import DataSpec
    from rotaq.quantizers.stage import run_quantize

    calibration = DataSpec(source=args.calib, seq_len=args.seq_len, max_tokens=args.max_tokens)
    out = run_quantize(options_from_args(QuantizeOptions, args, model=args.model, out=Path(args.out),
                                         calibration=calibration))
    print(f"quantized model ({args.scheme}, {args.weights}) written to {out}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    quantize = commands.add_parser("quantize", help="stage 4: W8A8 / W4A8 / W4A4 / W4A16 with RTN or GPTQ")
    add_model_argument(quantize)
    quantize.add_argument("--out", required=True, help="output folder (written atomically)")
    add_option_flags(quantize, QuantizeOptions)
    quantize.add_argument("--calib", default=None, help="calibration text (same forms as --data; default Shakespeare)")
    quantize.add_argument("--seq-len", type=int, default=512, help="calibration window length (default 512)")
    quantize.add_argument("--max-tokens", type=int, default=32 * 512,
                          help="calibration tokens (default 16384 = 32 windows of 512)")
    quantize.set_defaults(handler=_cmd_quantize)
