"""`rotaq sweep`: run many configurations of the pipeline side by side, sharing the stages they have in
common, and compare them."""

from __future__ import annotations

import argparse
from pathlib import Path

from rotaq.pipeline.run.commands import VERIFY_HELP


def _cmd_sweep(args: argparse.Namespace) -> int:
    from rotaq.pipeline.run.config_loading import parse_override
    from rotaq.pipeline.sweep.execute import plan_sweep, run_sweep
    from rotaq.pipeline.sweep.spec import load_sweep

    spec = load_sweep(Path(args.sweep), Path(args.config) if args.config else None,
                      [parse_override(text) for text in args.set])
    if args.dry_run:
        print(plan_sweep(spec, Path(args.out)).describe())
        return 0
    outcome = run_sweep(spec, Path(args.out), progress=lambda line: print(line, flush=True), verify=args.verify)
    print("comparison: " + ", ".join(str(path) for path in outcome.outputs.values()))
    if outcome.failed:
        print(f"{len(outcome.failed)} variant(s) failed: {', '.join(outcome.failed)} (see sweep.md)")
        return 1
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    sweep = commands.add_parser(
        "sweep", help="run several configurations (a grid of option values) sharing their common stages, "
                      "and compare them: sweep.csv/json/md and a Pareto plot",
        description="Run every variant of a sweep file as a `rotaq run` into OUT/variants/<name>, sharing each "
                    "stage that variants have in common through OUT/store, then write sweep.csv, sweep.json, "
                    "sweep.md and pareto.png (perplexity against decode speed-up and against size). An "
                    "interrupted sweep resumes where it stopped when run again with the same --out.",
        epilog="sweep file:\n  config: base.yaml        # optional base configuration (relative to the sweep file)\n"
               "  set: {finetune.steps: 20}  # optional overrides for every variant\n"
               "  grid:                    # every combination is one variant\n"
               "    quantize.schemes: [w4a4, w8a8]\n    quantize.weights: [rtn, gptq]\n"
               "  variants:                # optional list of override sets, crossed with the grid\n"
               "    - {finetune.enabled: false}\n    - {finetune.adapter: reslora-bs}\n"
               "keys: those of `rotaq run --help`",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep.add_argument("sweep", help="sweep file (YAML)")
    sweep.add_argument("--config", default=None, help="base configuration (replaces the sweep file's config:)")
    sweep.add_argument("--out", default="runs/sweep", help="sweep folder (default runs/sweep)")
    sweep.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                       help="override one key in every variant (repeatable)")
    sweep.add_argument("--dry-run", action="store_true",
                       help="list the variants and how many stage runs they share, without running anything")
    sweep.add_argument("--verify", action="store_true", help=VERIFY_HELP)
    sweep.set_defaults(handler=_cmd_sweep)
