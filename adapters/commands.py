"""`rotaq finetune` and `rotaq merge`."""

from __future__ import annotations

import argparse
from pathlib import Path

from rotaq.adapters.finetune import FinetuneOptions
from rotaq.adapters.merge_stage import MergeOptions
from rotaq.pipeline.cli_args import add_model_argument
from rotaq.pipeline.errors import RotaqError
from rotaq.pipeline.options import add_option_flags, options_from_args


def _cmd_finetune(args: argparse.Namespace) -> int:
    if args.dry_run:
        return _print_parameter_counts(args)
    if args.out is None:
        raise RotaqError("rotaq finetune needs --out (or --dry-run to print parameter counts only)")
    from accelerate import PartialState

    from rotaq.adapters.finetune import run_finetune
    from rotaq.pipeline.artifacts import read_manifest

    checkpoints = Path(args.checkpoint_dir) if args.checkpoint_dir else None
    out = run_finetune(options_from_args(FinetuneOptions, args, model=args.model, out=Path(args.out), data=args.data,
                                         seq_len=args.seq_len, resume=args.resume, checkpoint_dir=checkpoints))
    if PartialState().is_main_process:
        summary = read_manifest(out)["adapters"]["training"]
        print(f"adapters written to {out}: final loss {summary['final_loss']:.4f}, eval perplexity "
              f"{summary['eval_perplexity_before']:.3f} → {summary['eval_perplexity_after']:.3f}, "
              f"{summary['tokens_per_s']:.0f} tokens/s, {summary['wall_time_s']:.1f} s")
    return 0


def _print_parameter_counts(args: argparse.Namespace) -> int:
    """Trainable parameters of every adapter type at --rank, without training anything."""
    from rotaq.adapters.parameter_counts import adapter_parameter_counts
    from rotaq.eval.tables import markdown_table
    from rotaq.pipeline.loading import load_model

    loaded = load_model(args.model)
    changes = {"merges": args.lor2c_changes, "injections": args.lor2c_changes} if args.lor2c_changes else {}
    rows = adapter_parameter_counts(loaded.model, loaded.family, args.rank, args.targets, **changes)
    print(f"trainable parameters at rank {args.rank} ({args.targets or 'all seven projections'} for (Res)LoRA):")
    print(markdown_table(rows, ["adapter", "trainable_parameters", "vs_lora", "note"],
                         {"trainable_parameters": ",d", "vs_lora": ".3f"}))
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from rotaq.adapters.merge_stage import run_merge

    out, section = run_merge(options_from_args(MergeOptions, args, model=args.model, out=Path(args.out),
                                               data=args.data, seq_len=args.seq_len))
    error = section["error"]
    print(f"merged {section['adapter_type']} ({section['method']}) into {out}: perplexity "
          f"{error['perplexity_adapted']:.4f} (adapted) → {error['perplexity_merged']:.4f} (merged), "
          f"KL {error['kl_divergence']:.2e}, max relative logit error {error['max_relative_logit_error']:.2e}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    finetune = commands.add_parser("finetune", help="stage 2: train (Res)LoRA adapters on the frozen rotated weights")
    add_model_argument(finetune)
    finetune.add_argument("--out", default=None, help="output folder (written atomically)")
    finetune.add_argument("--dry-run", action="store_true",
                          help="print the trainable parameters of every adapter type (LoRA, ResLoRA, LoR2C variants) "
                               "at --rank, and exit")
    add_option_flags(finetune, FinetuneOptions)
    finetune.add_argument("--seq-len", type=int, default=256, help="tokens per training window")
    finetune.add_argument("--data", default=None, help="training text, as for `rotaq eval` (default: Shakespeare)")
    finetune.add_argument("--checkpoint-dir", default=None, help="checkpoint folder (default: OUT.checkpoints)")
    finetune.add_argument("--resume", action="store_true",
                          help="continue from the last checkpoint (refused if the settings differ)")
    finetune.set_defaults(handler=_cmd_finetune)

    merge = commands.add_parser("merge", help="stage 3: fold the adapters into plain weights and measure the error")
    merge.add_argument("--model", required=True, help="finetune stage folder")
    merge.add_argument("--out", required=True, help="output folder (written atomically)")
    add_option_flags(merge, MergeOptions)
    merge.add_argument("--data", default=None, help="text for calibration and evaluation (default: the training text)")
    merge.add_argument("--seq-len", type=int, default=None, help="tokens per window (default: the training length)")
    merge.set_defaults(handler=_cmd_merge)
