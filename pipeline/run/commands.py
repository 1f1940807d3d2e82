"""`rotaq init` and `rotaq run`: write the commented default configuration, and run the whole pipeline
into one folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from rotaq.pipeline.run.config_template import describe_keys

DEFAULT_CONFIG = "rotaq.yaml"


def _cmd_init(args: argparse.Namespace) -> int:
    from rotaq.pipeline.atomic import atomic_write
    from rotaq.pipeline.run.config_template import render_default_config
    from rotaq.pipeline.errors import RotaqError

    path = Path(args.out)
    if path.exists() and not args.force:
        raise RotaqError(f"{path} already exists; pass --force to overwrite it")
    atomic_write(path, render_default_config())
    print(f"default configuration written to {path}; edit it, then: rotaq run --config {path}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from rotaq.pipeline.run.config_loading import load_run_config
    from rotaq.pipeline.run.execute import run_pipeline
    from rotaq.pipeline.run.files import REPORT_HTML, REPORT_MARKDOWN

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
    from rotaq.pipeline.run.summary import run_summary

    rows, columns = run_summary(run_folder)
    return markdown_table(rows, columns) if rows else "no evaluated model in this run"


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
