"""`rotaq finetune` and `rotaq merge`."""

from __future__ import annotations

import argparse
from pathlib import Path

from rotaq.adapters.config import ADAPTER_TYPES
from rotaq.adapters.lor2c import LOR2C_TYPES
from rotaq.pipeline.errors import RotaqError
from rotaq.pipeline.cli_args import add_model_argument


def _cmd_finetune(args: argparse.Namespace) -> int:
    if args.dry_run:
        return _print_parameter_counts(args)
    if args.out is None:
        raise RotaqError("rotaq finetune needs --out (or --dry-run to print parameter counts only)")
    from accelerate import PartialState

    from rotaq.adapters.finetune import FinetuneOptions, run_finetune
    from rotaq.adapters.train import TrainConfig
    from rotaq.pipeline.artifacts import read_manifest

    training = TrainConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum,
                           warmup=args.warmup, eval_every=args.eval_every, save_every=args.save_every,
                           gradient_checkpointing=args.gradient_checkpointing, seed=args.seed)
    out = run_finetune(FinetuneOptions(
        model=args.model, out=Path(args.out), adapter=args.adapter, targets=args.targets, rank=args.rank,
        alpha=args.alpha, dropout=args.dropout, pre_num=args.pre_num, qat=args.qat,
        qat_act_clip_ratio=args.qat_act_clip_ratio, lor2c_changes=args.lor2c_changes,
        lor2c_interval=args.lor2c_interval, lor2c_score=args.lor2c_score, lor2c_top_k=args.lor2c_top_k,
        training=training, data=args.data,
        seq_len=args.seq_len, eval_tokens=args.eval_tokens, resume=args.resume,
        checkpoint_dir=Path(args.checkpoint_dir) if args.checkpoint_dir else None))
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
    from rotaq.adapters.merge_stage import MergeOptions, run_merge

    out, section = run_merge(MergeOptions(model=args.model, out=Path(args.out), method=args.method, data=args.data,
                                          seq_len=args.seq_len, eval_tokens=args.eval_tokens,
                                          calibration_tokens=args.calibration_tokens, ridge=args.ridge))
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
    finetune.add_argument("--adapter", default="lora",
                          help=f"one of {', '.join(ADAPTER_TYPES + LOR2C_TYPES)} (default lora)")
    finetune.add_argument("--rank", type=int, default=8)
    finetune.add_argument("--alpha", type=float, default=16.0, help="scaling s = alpha / rank (default 16)")
    finetune.add_argument("--dropout", type=float, default=0.0, help="dropout on the adapter input")
    finetune.add_argument("--pre-num", type=int, default=None,
                          help="earlier blocks a reslora-bs/ms shortcut reaches (default 2)")
    finetune.add_argument("--targets", default=None,
                          help="comma-separated projections, e.g. q_proj,v_proj (default: all seven)")
    finetune.add_argument("--steps", type=int, default=100, help="optimizer steps")
    finetune.add_argument("--lr", type=float, default=2e-4)
    finetune.add_argument("--batch-size", type=int, default=4, help="windows per process per micro-batch")
    finetune.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    finetune.add_argument("--warmup", type=int, default=10, help="linear warmup steps before the cosine decay")
    finetune.add_argument("--seq-len", type=int, default=256, help="tokens per training window")
    finetune.add_argument("--data", default=None, help="training text, as for `rotaq eval` (default: Shakespeare)")
    finetune.add_argument("--eval-every", type=int, default=50, help="held-out evaluation interval (0: start and end)")
    finetune.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens per evaluation")
    finetune.add_argument("--save-every", type=int, default=50, help="checkpoint interval (0: at the end only)")
    finetune.add_argument("--checkpoint-dir", default=None, help="checkpoint folder (default: OUT.checkpoints)")
    finetune.add_argument("--qat", default=None, metavar="SCHEME",
                          help="quantization-aware training for a scheme such as w4a4 or w4a16-g128")
    finetune.add_argument("--qat-act-clip-ratio", type=float, default=None, metavar="R",
                          help="with --qat: clip per-token activations as `rotaq quantize --act-clip-ratio R` will")
    finetune.add_argument("--lor2c-changes", type=int, default=None, metavar="N",
                          help="merge-lor2c: path merges; inject-lor2c: LoRA injections (default 4 and 2)")
    finetune.add_argument("--lor2c-interval", type=int, default=None, metavar="STEPS",
                          help="steps between merges / injections (default: spread evenly over training)")
    finetune.add_argument("--lor2c-score", default="top-share", choices=("top-share", "mean"),
                          help="path score from the singular values of s·B·A: share of the top-k, or their mean")
    finetune.add_argument("--lor2c-top-k", type=int, default=1,
                          help="singular values counted by --lor2c-score top-share")
    finetune.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations to save memory")
    finetune.add_argument("--resume", action="store_true",
                          help="continue from the last checkpoint (refused if the settings differ)")
    finetune.add_argument("--seed", type=int, default=0)
    finetune.set_defaults(handler=_cmd_finetune)

    merge = commands.add_parser("merge", help="stage 3: fold the adapters into plain weights and measure the error")
    merge.add_argument("--model", required=True, help="finetune stage folder")
    merge.add_argument("--out", required=True, help="output folder (written atomically)")
    merge.add_argument("--method", default="lstsq",
                       help="lstsq or paper: how reslora-is/ms shortcuts merge (lora, reslora-bs: always exact)")
    merge.add_argument("--data", default=None, help="text for calibration and evaluation (default: the training text)")
    merge.add_argument("--seq-len", type=int, default=None, help="tokens per window (default: the training length)")
    merge.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens for the merge error")
    merge.add_argument("--calibration-tokens", type=int, default=8192, help="calibration tokens for --method lstsq")
    merge.add_argument("--ridge", type=float, default=None,
                       help="lstsq ridge relative to the mean input energy (default: best of 1e-3…1 by KL)")
    merge.set_defaults(handler=_cmd_merge)
