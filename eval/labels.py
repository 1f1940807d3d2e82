"""What a person reads instead of a JSON key: one label (with its unit) and one rounding per metric.

Used by every Markdown and HTML table rotaq writes (report.md, report.html, sweep.md, bench.md); CSV and
JSON keep the keys, because tools read those. A key not listed here is shown as it is.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Format = str | Callable[[Any], str]


@dataclass(frozen=True)
class Metric:
    label: str
    format: Format | None = None  # None: the table's default (4 significant digits)


METRICS: dict[str, Metric] = {
    "variant": Metric("Variant"), "branch": Metric("Branch"), "model": Metric("Model"), "stage": Metric("Stage"),
    "scheme": Metric("Scheme"), "weights": Metric("Weights"), "runtime": Metric("Runtime"),
    "kernels": Metric("Kernels"), "threads": Metric("Threads", "d"),
    "perplexity": Metric("Perplexity", ".2f"),
    "ppl_vs_source": Metric("× source ppl", ".3f"),
    "kl_divergence": Metric("KL vs source (nats)", ".2e"),
    "top1_agreement": Metric("Top-1 agreement", ".1%"),
    "decode_tokens_per_s": Metric("Decode tok/s", ".1f"),
    "decode_speedup": Metric("Decode × fp32", ".2f"),
    "decode_vs_peer": Metric("Decode × peer", ".2f"),
    "prefill_vs_peer_512": Metric("Prefill 512 × peer", ".2f"),
    "decode_spread_pct": Metric("Decode spread (%)", ".1f"),
    "prefill_tokens": Metric("Prefill tokens", "d"),
    "prefill_ms": Metric("Prefill (ms)", ".1f"),
    "prefill_speedup": Metric("Prefill × fp32", ".2f"),
    "file_mb": Metric("Size (MiB)", ".1f"),
    "size_ratio": Metric("Size × fp32", ".3f"),
    "peak_rss_mb": Metric("Peak RSS (MiB)", ".0f"),
    "baseline_rss_mb": Metric("Worker RSS before load (MiB)", ".0f"),
    "finetune_s": Metric("Fine-tune (s)", ".0f"),
    "trainable_parameters": Metric("Trainable parameters", ",d"),
    "seconds": Metric("Seconds", ".1f"),
    "step": Metric("Step"), "before": Metric("Before"), "after": Metric("After"), "layer": Metric("Layer"), "statistic": Metric("Statistic"), "quantity": Metric("Quantity"),
    "value": Metric("Value"), "status": Metric("Status"), "finished": Metric("Finished"), "key": Metric("Key"),
    "package": Metric("Package"), "version": Metric("Version"), "stages": Metric("Stages"),
    "max_abs_over_rms_before": Metric("max |x| / RMS, before"), "max_abs_over_rms_after": Metric("max |x| / RMS, after"),
    "kurtosis_before": Metric("Kurtosis, before"), "kurtosis_after": Metric("Kurtosis, after"),
}
_PER_PROMPT = [  # keys that carry a prompt length: prefill_ms_128, prefill_speedup_512, ...
    (re.compile(r"prefill_ms_(\d+)$"), "Prefill {} tok (ms)", ".1f"),
    (re.compile(r"prefill_ms_(\d+)_spread_pct$"), "Prefill {} spread (%)", ".1f"),
    (re.compile(r"prefill_speedup_(\d+)$"), "Prefill {} × fp32", ".2f"),
    (re.compile(r"prefill_speedup_(\d+)_best$"), "Prefill {} × fp32, best", ".2f"),
]


def metric(key: str) -> Metric | None:
    """The label and rounding of a key, or None for a key without one."""
    if key in METRICS:
        return METRICS[key]
    for pattern, label, fmt in _PER_PROMPT:
        if match := pattern.match(key):
            return Metric(label.format(match.group(1)), fmt)
    return None


def label(key: str) -> str:
    found = metric(key)
    return found.label if found else key


def default_format(key: str) -> Format | None:
    found = metric(key)
    return found.format if found else None
