"""The `rotaq` command: a thin argparse layer over the stage functions.

Each stage package owns its subcommands in a `commands` module with `register(subparsers)`.
User errors (`RotaqError`, and an `OSError` such as a full disk or an unreadable path) print one line and
exit 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from rotaq.pipeline.errors import RotaqError, first_line

# In pipeline order; each module defines register(subparsers).
COMMAND_MODULES = (
    "rotaq.rotations.commands",
    "rotaq.adapters.commands",
    "rotaq.quantizers.commands",
    "rotaq.eval.commands",
    "rotaq.export.commands",
    "rotaq.pipeline.run.commands",
    "rotaq.pipeline.sweep.commands",
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
    if not sys.stderr.isatty():
        # transformers' and huggingface_hub's own bars (loading weights, writing shards) print a line per update
        # in a CI log; rotaq's bars (rotaq.pipeline.progress) print one line every 10 s there instead.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.handler(args)
    except RotaqError as exc:
        print(f"rotaq: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a path the user gave, or the disk under it: their problem, not a bug
        if args.verbose:
            raise
        print(f"rotaq: error: {describe_os_error(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:
        from rotaq.pipeline.artifacts import is_disk_full

        if not is_disk_full(exc):  # Rust writers report ENOSPC as SafetensorError or a bare Exception
            raise
        print(f"rotaq: error: disk full ({first_line(exc)}); finished stage folders are intact", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rotaq: interrupted; finished stage folders are intact", file=sys.stderr)
        return 130


def describe_os_error(exc: OSError) -> str:
    """One line for an OSError that escaped the stages' own checks: what failed, on which file."""
    from rotaq.pipeline.artifacts import is_disk_full

    where = f" {exc.filename}" if exc.filename else ""
    if is_disk_full(exc):
        return f"disk full while writing{where or ' the output'}; finished stage folders are intact"
    return f"{exc.strerror or type(exc).__name__}:{where or ' ' + str(exc)} (rerun with -v for the traceback)"


if __name__ == "__main__":
    sys.exit(main())
