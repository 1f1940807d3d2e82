"""`rotaq quantize`."""

from __future__ import annotations

import argparse
from pathlib import Path

from rotaq.pipeline.cli_args import add_model_argument


def _cmd_quantize(args: argparse.Namespace) -> int:
    from rotaq.pipeline.data import DataSpec
    from rotaq.quantizers.stage import QuantizeOptions, run_quantize

    out = run_quantize(QuantizeOptions(
        model=args.model, out=Path(args.out), scheme=args.scheme, weights=args.weights, group=args.group,
        act_clip_ratio=args.act_clip_ratio, ragged_groups=args.ragged_groups, act_block_size=args.act_block_size, kv_bits=args.kv_bits, act_order=not args.no_act_order,
        calibration=DataSpec(source=args.calib, seq_len=args.seq_len, max_tokens=args.max_tokens)))
    print(f"quantized model ({args.scheme}, {args.weights}) written to {out}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    quantize = commands.add_parser("quantize", help="stage 4: W8A8 / W4A8 / W4A4 / W4A16 with RTN or GPTQ")
    add_model_argument(quantize)
    quantize.add_argument("--out", required=True, help="output folder (written atomically)")
    quantize.add_argument("--scheme", default="w4a4",
                          help="w8a8, w4a8, w4a4, w4a16, optionally with a group suffix such as w4a16-g128")
    quantize.add_argument("--weights", choices=["rtn", "gptq"], default="gptq", help="weight quantizer")
    quantize.add_argument("--group", type=int, default=None, help="weight group size along the input (overrides the scheme)")
    quantize.add_argument("--act-block-size", type=int, default=None,
                          help="int8 activations per block of N along K, as ONNX Runtime's MatMulNBits "
                               "accuracy_level 4 computes them (w4a8 default 32); 0 = per token")
    quantize.add_argument("--kv-bits", type=int, choices=[4, 8], default=None,
                          help="also quantize the KV cache: k_proj/v_proj outputs per token and head, symmetric")
    quantize.add_argument("--ragged-groups", action="store_true",
                          help="allow a shorter last weight group where the group size does not divide a width "
                               "(e.g. -g128 on 576: groups of 128 and a last one of 64, as MatMulNBits pads K)")
    quantize.add_argument("--act-clip-ratio", type=float, default=None,
                          help="clip per-token activation ranges to this fraction of max|x| (default: the scheme's)")
    quantize.add_argument("--no-act-order", action="store_true", help="GPTQ: visit columns in their natural order")
    quantize.add_argument("--calib", default=None, help="calibration text (same forms as --data; default Shakespeare)")
    quantize.add_argument("--seq-len", type=int, default=512, help="calibration window length (default 512)")
    quantize.add_argument("--max-tokens", type=int, default=32 * 512,
                          help="calibration tokens (default 16384 = 32 windows of 512)")
    quantize.set_defaults(handler=_cmd_quantize)
