"""Validation and batching of token windows, shared by the metric and outlier passes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from rotaq.pipeline.progress import progress_bar

from rotaq.pipeline.errors import DataError, RotaqError


def as_windows(windows: torch.Tensor | np.ndarray, min_len: int = 1) -> torch.Tensor:
    """Return `windows` as a CPU LongTensor [N, T], or explain in one line why it is not usable."""
    tensor = torch.as_tensor(windows)
    if tensor.ndim != 2:
        raise DataError(f"token windows must be 2-D [windows, tokens], got shape {tuple(tensor.shape)}")
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise DataError(f"token windows must hold integer token ids, got {tensor.dtype}")
    if tensor.shape[0] == 0:
        raise DataError("no token windows to evaluate")
    if tensor.shape[1] < min_len:
        raise DataError(f"token windows need at least {min_len} tokens, got {tensor.shape[1]}")
    return tensor.to(device="cpu", dtype=torch.long)


def iter_batches(windows: torch.Tensor, batch_size: int, progress: bool, desc: str) -> Iterator[torch.Tensor]:
    """Yield consecutive batches of windows while advancing a progress bar counted in windows."""
    if batch_size < 1:
        raise RotaqError(f"batch size must be at least 1, got {batch_size}")
    with progress_bar(total=windows.shape[0], desc=desc, unit="win", disable=not progress) as bar:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start : start + batch_size]
            yield batch
            bar.update(batch.shape[0])


def check_token_ids(windows: torch.Tensor, vocab_size: int | None) -> None:
    """Token ids outside the vocabulary mean the windows came from another tokenizer."""
    if vocab_size is None:
        return
    low, high = int(windows.min()), int(windows.max())
    if low < 0 or high >= vocab_size:
        raise DataError(f"token ids span [{low}, {high}] but the model's vocabulary has {vocab_size} entries")


def input_vocab_size(model: nn.Module) -> int | None:
    """Rows of a Hugging Face model's input embedding, or None when the model does not say."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    return getattr(embeddings, "num_embeddings", None)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a stateless module)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put the model in eval mode for the duration, then give back the caller's train/eval mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
