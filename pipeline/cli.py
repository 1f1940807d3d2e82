"""The `rotaq` command: a thin argparse layer over the stage functions.

Each stage package owns its subcommands in a `commands` module with `register(subparsers)`.
User errors (`RotaqError`) print one line and exit 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from pipeline.errors import RotaqError

# In pipeline order; each module defines register(subparsers).
COMMAND_MODULES = (
    "rotations.commands",
    "adapters.commands",
    "quantizers.commands",
    "eval.commands",
    "export.commands",
    "pipeline.run_commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rotaq",
        description="Rotate, fine-tune, merge, quantize and export decoder LLMs; report what it cost and bought.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.handler(args)
    except RotaqError as exc:
        print(f"rotaq: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rotaq: interrupted; finished stage folders are intact", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
