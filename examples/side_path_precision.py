"""Measure whether LoR2C side paths should be quantized with the scheme or kept in float (issue 4).

Loads a quantized stage folder that carries side paths, scores it as deployed (float32 paths) and with
the paths fake-quantized like the scheme's linears (RTN weights of A and s·B at the scheme's weight
bits, per-token dynamic activations at its activation bits on h_in and on the rank-r intermediate).
Writes JSON and Markdown next to --out.

    .venv/bin/python examples/side_path_precision.py QUANTIZED_FOLDER --out runs/side-path-precision
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from rotaq.adapters.kinds import installed_adapter
from rotaq.eval.metrics import evaluate
from rotaq.eval.tables import markdown_table
from rotaq.pipeline.data import DataSpec, load_split_windows
from rotaq.pipeline.loading import load_model
from rotaq.quantizers.activations import fake_quantize_per_token
from rotaq.quantizers.rtn import fake_quantize_weight
from rotaq.quantizers.schemes import parse_scheme


def quantize_paths(model: torch.nn.Module, weight_bits: int, act_bits: int) -> None:
    """Replace every path's weights by their RTN fake-quant and quantize its two matmul inputs per token."""
    paths = installed_adapter(model)  # the merged model's LoR2C side paths
    done: set[int] = set()
    with torch.no_grad():
        for path in paths.paths:
            for parameter in (path.lora_A, path.lora_B):
                if id(parameter) not in done:
                    parameter.copy_(fake_quantize_weight(parameter, weight_bits))
                    done.add(id(parameter))

    def forward(path, hidden_in):
        low_rank = fake_quantize_per_token(hidden_in, act_bits) @ path.lora_A.T
        return path.scaling * fake_quantize_per_token(low_rank, act_bits) @ path.lora_B.T

    for path in paths.paths:
        path.forward = forward.__get__(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a quantized stage folder whose manifest has a side_paths section")
    parser.add_argument("--out", required=True)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    loaded = load_model(args.model)
    scheme = parse_scheme(loaded.manifest["quantization"]["scheme"]["name"])
    windows = load_split_windows(DataSpec(None, args.seq_len, args.eval_tokens), loaded.tokenizer, "evaluation")
    rows = [{"side_paths": "float32", **_scores(loaded.model, windows)}]
    quantize_paths(loaded.model, scheme.weight_bits, scheme.act_bits)
    rows.append({"side_paths": f"{scheme.name} (RTN weights, per-token activations)", **_scores(loaded.model, windows)})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "side_path_precision.json").write_text(json.dumps({"model": args.model, "rows": rows}, indent=1) + "\n")
    table = markdown_table(rows, ["side_paths", "perplexity", "tokens"], {"perplexity": ".3f"})
    (out / "side_path_precision.md").write_text(table + "\n")
    print(table)


def _scores(model: torch.nn.Module, windows: torch.Tensor) -> dict[str, float]:
    result = evaluate(model, windows, progress=False)
    return {"perplexity": result.perplexity, "tokens": result.tokens}


if __name__ == "__main__":
    main()
