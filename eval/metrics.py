"""Perplexity, KL to a reference, and top-1 agreement over held-out token windows.

One implementation (`evaluate_logits_fn`) scores any callable that maps token ids to logits, so a
PyTorch model, a quantized model and an ONNX Runtime session are all measured the same way.
Log-probabilities are computed in float64 a slice of positions at a time, so a 49k-token vocabulary
never costs more than one batch of model logits plus a bounded float64 working set.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from rotaq.eval._windows import as_windows, check_token_ids, eval_mode, input_vocab_size, iter_batches, model_device
from rotaq.pipeline.errors import DataError, NonFiniteError, RotaqError

LogitsFn = Callable[[torch.Tensor], "torch.Tensor | np.ndarray"]
"""Maps a LongTensor [B, T] of token ids to logits [B, T, V] (torch or numpy, any float dtype)."""

# Elements per float64 working tensor (128 MiB): bounds memory whatever the vocabulary size.
_CHUNK_ELEMENTS = 1 << 24


@dataclass
class EvalResult:
    """Scores of one model on one set of windows; KL and agreement only when a reference was given."""

    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token, nats
    tokens: int  # predicted tokens: windows * (seq_len - 1)
    windows: int
    seq_len: int
    kl_divergence: float | None = None  # mean KL(reference || model) per predicted position, nats
    top1_agreement: float | None = None  # fraction of positions whose argmax matches the reference

    def to_dict(self) -> dict[str, float | int | None]:
        """Plain dict for JSON reports and tables."""
        return asdict(self)


def evaluate(
    model: nn.Module,
    windows: torch.Tensor,
    reference: nn.Module | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> EvalResult:
    """Score a causal LM (and optionally its agreement with a reference LM) on token windows.

    Both models are put in eval mode for the pass and given back in the mode they came in.
    """
    windows = as_windows(windows, min_len=2)
    for lm in (model, reference):
        if lm is not None:
            check_token_ids(windows, input_vocab_size(lm))
    with ExitStack() as stack:
        stack.enter_context(eval_mode(model))
        reference_fn = None
        if reference is not None:
            stack.enter_context(eval_mode(reference))
            reference_fn = _module_logits_fn(reference)
        return evaluate_logits_fn(
            _module_logits_fn(model), windows, reference_fn, batch_size=batch_size, progress=progress
        )


def evaluate_logits_fn(
    logits_fn: LogitsFn,
    windows: torch.Tensor | np.ndarray,
    reference_logits_fn: LogitsFn | None = None,
    batch_size: int = 4,
    progress: bool = True,
    desc: str = "eval",
) -> EvalResult:
    """Score a logits callable on windows [N, T]: position t predicts token t + 1, for t < T - 1."""
    windows = as_windows(windows, min_len=2)
    totals = _Totals(with_reference=reference_logits_fn is not None)
    with torch.inference_mode():
        for batch in iter_batches(windows, batch_size, progress, desc):
            logits = _call_logits(logits_fn, batch, "model")
            check_token_ids(batch, logits.shape[-1])
            ref_logits = None
            if reference_logits_fn is not None:
                ref_logits = _call_logits(reference_logits_fn, batch, "reference")
                if ref_logits.shape != logits.shape:
                    raise RotaqError(
                        f"reference logits {tuple(ref_logits.shape)} do not match model logits {tuple(logits.shape)}"
                    )
            totals.add_batch(logits, batch, ref_logits)
    return totals.result(windows.shape[0], windows.shape[1])


def compare_logits(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> dict[str, float]:
    """How closely candidate logits `a` reproduce reference logits `b` (same shape, vocab last).

    Returns max_abs_error = max|a - b|, max_rel_error = max|a - b| / max|b|,
    mean_kl = mean over positions of KL(softmax(b) || softmax(a)) in nats,
    top1_agreement = fraction of positions where argmax a == argmax b, and positions.
    """
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if a.shape != b.shape:
        raise RotaqError(f"cannot compare logits of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if a.ndim == 0 or a.numel() == 0:
        raise DataError(f"no logits to compare (shape {tuple(a.shape)})")
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]).to(a.device)
    max_diff = max_ref = kl = 0.0
    agree = 0
    with torch.inference_mode():
        for rows in _row_slices(a.shape[0], a.shape[1]):
            a64, b64 = a[rows].to(torch.float64), b[rows].to(torch.float64)
            max_diff = max(max_diff, float((a64 - b64).abs().max()))
            max_ref = max(max_ref, float(b64.abs().max()))
            chunk_kl, chunk_agree = _kl_and_agreement(b64.log_softmax(-1), a64.log_softmax(-1))
            kl, agree = kl + chunk_kl, agree + chunk_agree
    return {
        "max_abs_error": max_diff,
        "max_rel_error": _ratio(max_diff, max_ref),
        "mean_kl": kl / a.shape[0],
        "top1_agreement": agree / a.shape[0],
        "positions": a.shape[0],
    }


class _Totals:
    """Streaming float64 sums over predicted positions."""

    def __init__(self, with_reference: bool) -> None:
        self.with_reference = with_reference
        self.nll = 0.0
        self.kl = 0.0
        self.agree = 0
        self.tokens = 0

    def add_batch(self, logits: torch.Tensor, batch: torch.Tensor, ref_logits: torch.Tensor | None) -> None:
        """Accumulate one batch, one window and one bounded slice of positions at a time."""
        targets = batch[:, 1:].to(logits.device)
        for window in range(batch.shape[0]):
            for rows in _row_slices(targets.shape[1], logits.shape[-1]):
                log_probs = logits[window, rows].to(torch.float64).log_softmax(-1)
                self.nll -= float(log_probs.gather(-1, targets[window, rows, None]).sum())
                self.tokens += log_probs.shape[0]
                if ref_logits is not None:
                    ref_log_probs = ref_logits[window, rows].to(log_probs.device, torch.float64).log_softmax(-1)
                    kl, agree = _kl_and_agreement(ref_log_probs, log_probs)
                    self.kl, self.agree = self.kl + kl, self.agree + agree

    def result(self, windows: int, seq_len: int) -> EvalResult:
        """Turn the sums into means; a NaN/inf loss means the model is broken, not merely bad."""
        nll = self.nll / self.tokens
        kl = self.kl / self.tokens if self.with_reference else None
        if not math.isfinite(nll) or (kl is not None and not math.isfinite(kl)):
            raise NonFiniteError(f"evaluation produced a non-finite loss (nll={nll}, kl={kl})")
        return EvalResult(
            perplexity=_exp(nll),
            nll=nll,
            tokens=self.tokens,
            windows=windows,
            seq_len=seq_len,
            kl_divergence=kl,
            top1_agreement=self.agree / self.tokens if self.with_reference else None,
        )


def _module_logits_fn(model: nn.Module) -> LogitsFn:
    """Adapt a Hugging Face style causal LM to a logits callable that runs on the model's device."""
    device = model_device(model)

    def logits_fn(input_ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=input_ids.to(device)).logits

    return logits_fn


def _call_logits(logits_fn: LogitsFn, batch: torch.Tensor, role: str) -> torch.Tensor:
    """Run a logits callable and insist on [B, T, V] output for the batch it was given."""
    logits = torch.as_tensor(logits_fn(batch))
    if logits.ndim != 3 or tuple(logits.shape[:2]) != tuple(batch.shape):
        raise RotaqError(
            f"{role} returned logits of shape {tuple(logits.shape)} for input {tuple(batch.shape)}; expected [B, T, V]"
        )
    if not logits.dtype.is_floating_point:
        raise RotaqError(f"{role} returned logits of dtype {logits.dtype}; expected a float dtype")
    return logits


def _row_slices(n_rows: int, vocab_size: int) -> Iterator[slice]:
    """Slices of rows whose [rows, vocab] float64 tensors stay within _CHUNK_ELEMENTS."""
    step = max(1, _CHUNK_ELEMENTS // vocab_size)
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def _kl_and_agreement(ref_log_probs: torch.Tensor, log_probs: torch.Tensor) -> tuple[float, int]:
    """Summed KL(ref || model) over rows, and how many rows share the reference's argmax."""
    ref_probs = ref_log_probs.exp()
    # Tokens the reference rules out (p_ref = 0) contribute nothing, even where log p_ref = -inf.
    terms = torch.where(ref_probs > 0, ref_probs * (ref_log_probs - log_probs), 0.0)
    agree = int((ref_log_probs.argmax(-1) == log_probs.argmax(-1)).sum())
    return float(terms.sum()), agree


def _ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, with 0/0 read as 'identical' (0) and x/0 as infinitely far (inf)."""
    if denominator == 0.0:
        return 0.0 if numerator == 0.0 else math.inf
    return numerator / denominator


def _exp(x: float) -> float:
    """exp that saturates to inf instead of raising for a hopeless model's perplexity."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf
