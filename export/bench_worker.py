"""One benchmarked model in its own process: loads once, then times what the coordinator asks for.

A process per model keeps each model's peak resident memory its own (``ru_maxrss`` of a process that
held only that model) and lets the coordinator interleave repeats across models: while one worker
runs, the others wait on their pipe, so they never compete for the pinned cores.

ONNX Runtime targets stay torch-free (the deployed process has no torch); the PyTorch eager target
imports torch and transformers only in its own worker.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

import numpy as np

ONNX = "onnxruntime"
EAGER = "pytorch-eager"
GENAI = "onnxruntime-genai"


@dataclass(frozen=True)
class TargetSpec:
    """What a worker loads: an exported folder (ONNX Runtime) or a float model reference (PyTorch)."""

    kind: str  # ONNX, EAGER or GENAI
    path: str
    threads: int
    provider: str = "CPUExecutionProvider"
    seed: int = 0


class Timed(Protocol):
    vocab_size: int

    def prefill(self, input_ids: np.ndarray, extra: int = 0) -> Any: ...

    def decode(self, state: Any, token: int) -> Any: ...


class OnnxTimed:
    """Prefill and single-token decode steps on an exported graph."""

    def __init__(self, spec: TargetSpec) -> None:
        from rotaq.export.runtime import OnnxDecoder

        self.decoder = OnnxDecoder(spec.path, threads=spec.threads, provider=spec.provider)
        self.vocab_size = self.decoder.layout.vocab_size

    def prefill(self, input_ids: np.ndarray, extra: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
        mask = np.ones_like(input_ids)
        _, past = self.decoder.step(input_ids, mask, self.decoder.empty_past(input_ids.shape[0]))
        return mask, past

    def decode(self, state: tuple[np.ndarray, list[np.ndarray]], token: int) -> tuple[np.ndarray, list[np.ndarray]]:
        mask, past = state
        mask = np.ones((1, mask.shape[1] + 1), dtype=np.int64)
        _, past = self.decoder.step(np.asarray([[token]], dtype=np.int64), mask, past)
        return mask, past


class EagerTimed:
    """The float model in PyTorch with transformers' KV cache: what a user runs before exporting."""

    def __init__(self, spec: TargetSpec) -> None:
        import torch

        from rotaq.pipeline.loading import load_model

        torch.set_num_threads(spec.threads)
        self.torch = torch
        self.model = load_model(spec.path).model.eval()
        self.vocab_size = self.model.config.vocab_size

    def prefill(self, input_ids: np.ndarray, extra: int = 0) -> Any:
        with self.torch.inference_mode():
            return self.model(self.torch.from_numpy(input_ids), use_cache=True).past_key_values

    def decode(self, state: Any, token: int) -> Any:
        with self.torch.inference_mode():
            ids = self.torch.tensor([[token]], dtype=self.torch.long)
            return self.model(ids, past_key_values=state, use_cache=True).past_key_values


def load_target(spec: TargetSpec) -> Timed:
    if spec.kind == EAGER:
        return EagerTimed(spec)
    if spec.kind == GENAI:
        from rotaq.export.peer_genai import GenaiTimed

        return GenaiTimed(spec.path, spec.threads)
    return OnnxTimed(spec)


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB.

    Linux: VmHWM of /proc/self/status, the high-water mark of this process's own memory. Not ru_maxrss:
    Linux carries that across fork and exec, so a worker spawned by a large parent (`rotaq run` after
    fine-tuning holds gigabytes) would report the parent's peak (measured: 4684 MiB for a 112 MiB model).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)


def _pin(threads: int) -> None:
    """Keep the worker's threads on the first `threads` cores, so runs see the same cores."""
    if hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))[:threads]
        os.sched_setaffinity(0, cores)


MIN_SAMPLE_SECONDS = 0.05
"""A timing sample shorter than this is repeated and averaged: one sub-millisecond call (a tiny model) is
mostly timer and scheduler noise. A real model's prefill or decode run is one call, as before."""


def _timed(call: Callable[..., Any], *args: Any) -> float:
    start = time.perf_counter()
    call(*args)
    return time.perf_counter() - start


def _timed_decode(target: Timed, rng: np.random.Generator, cached: int, steps: int) -> tuple[float, float]:
    """Seconds for `steps` decode steps after a prefill of `cached` tokens (the prefill is not timed), and
    the median seconds of one step: a step the machine interrupted moves the total, not the median."""
    state = target.prefill(rng.integers(0, target.vocab_size, (1, cached), dtype=np.int64), steps)
    tokens = rng.integers(0, target.vocab_size, steps).tolist()
    step_seconds = []
    for token in tokens:
        start = time.perf_counter()
        state = target.decode(state, token)
        step_seconds.append(time.perf_counter() - start)
    return sum(step_seconds), float(np.median(step_seconds))


def _sample_seconds(measure: Callable[[], Any]) -> Any:
    """One timing sample: `measure()` once, or averaged over repeats until MIN_SAMPLE_SECONDS are timed.
    `measure` returns seconds, or a tuple whose first item is the total seconds (averaged item by item)."""
    first = measure()
    samples = [first if isinstance(first, tuple) else (first,)]
    while sum(sample[0] for sample in samples) < MIN_SAMPLE_SECONDS:
        result = measure()
        samples.append(result if isinstance(result, tuple) else (result,))
    averaged = tuple(sum(values) / len(samples) for values in zip(*samples, strict=True))
    return averaged if isinstance(first, tuple) else averaged[0]


def serve(conn: Connection, spec: TargetSpec) -> None:
    """Worker loop: ("prefill", L) → seconds; ("decode", cached, n) → (seconds
    for n steps, median seconds of one step); ("rss",) → peak MiB."""
    try:
        _pin(spec.threads)
        baseline = peak_rss_mb()
        target = load_target(spec)
        rng = np.random.default_rng(spec.seed)
        conn.send(("ready", {"baseline_rss_mb": baseline}))
        while True:
            request = conn.recv()
            if request[0] == "stop":
                return
            if request[0] == "rss":
                conn.send(("ok", peak_rss_mb()))
                continue
            if request[0] == "prefill":
                ids = rng.integers(0, target.vocab_size, (1, request[1]), dtype=np.int64)
                conn.send(("ok", _sample_seconds(lambda: _timed(target.prefill, ids))))
                continue
            if request[0] == "decode":
                _, cached, steps = request
                conn.send(("ok", _sample_seconds(lambda: _timed_decode(target, rng, cached, steps))))
                continue
            conn.send(("error", f"unknown request {request!r}"))
    except Exception as exc:  # reported to the coordinator, which raises it with the model's name
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
