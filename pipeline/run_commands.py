"""`rotaq init`, `rotaq run` and `rotaq sweep`: write the commented default configuration, run the whole
pipeline, and run many configurations of it side by side."""

from __future__ import annotations

import argparse
from pathlib import Path

from rotaq.pipeline.config_template import describe_keys

DEFAULT_CONFIG = "rotaq.yaml"


def _cmd_init(args: argparse.Namespace) -> int:
    from rotaq.pipeline.atomic import atomic_write
    from rotaq.pipeline.config_template import render_default_config
    from rotaq.pipeline.errors import RotaqError

    path = Path(args.out)
    if path.exists() and not args.force:
        raise RotaqError(f"{path} already exists; pass --force to overwrite it")
    atomic_write(path, render_default_config())
    print(f"default configuration written to {path}; edit it, then: rotaq run --config {path}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from rotaq.pipeline.config_loading import load_run_config
    from rotaq.pipeline.report import REPORT_HTML, REPORT_MARKDOWN
    from rotaq.pipeline.run import run_pipeline

    config_path = args.config or (DEFAULT_CONFIG if Path(DEFAULT_CONFIG).is_file() else None)
    config = load_run_config(Path(config_path) if config_path else None, args.set)
    outcome = run_pipeline(config, Path(args.out) if args.out else None,
                           progress=lambda line: print(line, flush=True), verify=args.verify)
    print(summary_table(outcome.folder))
    print(f"report: {outcome.folder / REPORT_MARKDOWN} and {outcome.folder / REPORT_HTML}")
    return 0


def summary_table(run_folder: Path) -> str:
    """The run's main numbers for the terminal: each deployable model's accuracy, speed-up and size."""
    from rotaq.eval.tables import markdown_table
    from rotaq.pipeline.sweep_table import run_summary

    rows, columns = run_summary(run_folder)
    return markdown_table(rows, columns) if rows else "no evaluated model in this run"


def _cmd_sweep(args: argparse.Namespace) -> int:
    from rotaq.pipeline.config_loading import parse_override
    from rotaq.pipeline.sweep import plan_sweep, run_sweep
    from rotaq.pipeline.sweep_spec import load_sweep

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


VERIFY_HELP = ("before reusing a finished stage, check the SHA-256 of every file it wrote (default: sizes, and "
               "the hashes of files under 64 MiB)")


def register(commands: argparse._SubParsersAction) -> None:
    init = commands.add_parser("init", help="write a commented default configuration for `rotaq run`")
    init.add_argument("--out", default=DEFAULT_CONFIG, help=f"file to write (default {DEFAULT_CONFIG})")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    init.set_defaults(handler=_cmd_init)

    run = commands.add_parser(
        "run", help="rotate, finetune, merge, quantize, export, bench and report in one folder (cached per stage)",
        description="Run every stage into one folder (one subfolder per stage), evaluate every model and write\n"
                    "report.md / report.html. A finished stage is reused while its options and inputs are\n"
                    "unchanged, so a rerun after a change or an interruption only does the missing work.",
        epilog=f"configuration keys (`rotaq init` writes them all with these comments):\n{describe_keys()}",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--config", default=None,
                     help=f"YAML configuration (default: ./{DEFAULT_CONFIG} if present, else the defaults below)")
    run.add_argument("--out", default=None, help="run folder (default: the configuration's `out`)")
    run.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                     help="override one key, value read as YAML, e.g. --set quantize.weights=rtn "
                          "--set 'quantize.schemes=[w4a4, w8a8]' (repeatable)")
    run.add_argument("--verify", action="store_true", help=VERIFY_HELP)
    run.set_defaults(handler=_cmd_run)

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
