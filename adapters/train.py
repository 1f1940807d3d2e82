"""The adapter training loop: causal-LM loss, AdamW with warmup + cosine decay, accumulation, clipping.

Built on `accelerate.Accelerator`, so `accelerate launch --num_processes N` trains data-parallel: each
process takes its own slice of every global batch, gradients are averaged, and the adapters stay
identical on every process (checked at the end). Which windows a process sees depends only on the
seed and the step, so a resumed run trains on exactly the batches of an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from rotaq.pipeline.progress import progress_bar

from rotaq.adapters.checkpoint import CheckpointFolder, TrainingState
from rotaq.adapters.input_norms import InputNormHistory, norm_ratios
from rotaq.adapters.kinds import InstalledAdapter, required_adapter
from rotaq.adapters.structure import adapter_state_dict, mark_only_adapters_trainable
from rotaq.eval.metrics import evaluate
from rotaq.pipeline.errors import NonFiniteError, RotaqError
from rotaq.pipeline.options import setting


@dataclass(frozen=True)
class TrainConfig:
    steps: int = setting(100, "optimizer steps", minimum=1)
    lr: float = setting(2e-4, "peak learning rate")
    batch_size: int = setting(4, "windows per process per micro-batch", minimum=1)
    grad_accum: int = setting(1, "micro-batches per optimizer step", minimum=1)
    warmup: int = setting(10, "linear warmup steps before the cosine decay", minimum=0)
    weight_decay: float = setting(0.0, "AdamW weight decay on the adapter parameters", minimum=0)
    max_grad_norm: float = setting(1.0, "gradient-norm clipping threshold")
    eval_every: int = setting(50, "held-out evaluation interval in steps (0: before and after training only)",
                              minimum=0)
    save_every: int = setting(50, "checkpoint interval in steps (0: at the end only; an interrupted run resumes "
                                  "from the last one)", minimum=0)
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward pass to save memory")
    seed: int = setting(0, "seed of the adapter init and the data order")
    eval_batch_size: int = setting(4, "windows per forward pass of the held-out evaluation", minimum=1)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise RotaqError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup", "eval_every", "save_every", "weight_decay"):
            if getattr(self, name) < 0:
                raise RotaqError(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        if not self.lr > 0:
            raise RotaqError(f"--lr must be positive, got {self.lr}")

    def trajectory_settings(self) -> dict[str, Any]:
        """The settings that change which weights training produces (not how often it evaluates or saves)."""
        values = asdict(self)
        for name in ("eval_every", "save_every", "gradient_checkpointing", "eval_batch_size"):
            values.pop(name)
        return values


@dataclass
class TrainResult:
    log: dict[str, Any]
    input_norm_ratios: dict[str, list[list[float]]] | None


def causal_lm_loss(model: nn.Module, input_ids: Tensor) -> Tensor:
    """Mean next-token cross-entropy over the batch (the model shifts the labels itself)."""
    return model(input_ids=input_ids, labels=input_ids, use_cache=False).loss


class WindowSampler:
    """Window indices for (step, micro-batch, process): a seeded permutation per pass over the data."""

    def __init__(self, window_count: int, config: TrainConfig, processes: int) -> None:
        self.window_count = window_count
        self.config = config
        self.processes = processes
        self._permutations: dict[int, Tensor] = {}

    def indices(self, step: int, micro_batch: int, process: int) -> Tensor:
        batch = self.config.batch_size
        micro_batch_index = step * self.config.grad_accum + micro_batch
        first = (micro_batch_index * self.processes + process) * batch
        positions = range(first, first + batch)
        return torch.stack([self._permutation(p // self.window_count)[p % self.window_count] for p in positions])

    def _permutation(self, epoch: int) -> Tensor:
        """The order of pass `epoch`; only the latest pass is cached (a permutation is cheap to redo)."""
        if epoch not in self._permutations:
            generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
            self._permutations = {epoch: torch.randperm(self.window_count, generator=generator)}
        return self._permutations[epoch]


def new_log() -> dict[str, Any]:
    return {"steps": [], "evaluations": [], "train_tokens": 0, "train_time_s": 0.0, "wall_time_s": 0.0}


def train_adapters(model: nn.Module, train_windows: Tensor, eval_windows: Tensor, config: TrainConfig,
                   checkpoints: CheckpointFolder, resume_from: Path | None, accelerator: Any,
                   progress: bool = True) -> TrainResult:
    """Train the adapters installed in `model` for `config.steps` optimizer steps (from a checkpoint if given)."""
    started = time.perf_counter()
    model.to(accelerator.device)  # before the optimizer exists, so a restored optimizer state lands there too
    installed = required_adapter(model)
    change_steps = _structure_change_steps(installed, config, accelerator)
    if resume_from is not None and installed.describe():
        installed.rebuild(checkpoints.saved_structure(resume_from))
    parameters = mark_only_adapters_trainable(model)
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = _cosine_schedule(optimizer, config)
    norm_history = InputNormHistory(installed)
    installed.track_input_norms(installed.config.has_shortcuts)
    _seed_process(config.seed, accelerator.process_index)
    state = TrainingState(step=0, log=new_log(), input_norms=norm_history.state_dict())
    if resume_from is not None:
        state = checkpoints.load(resume_from, model, optimizer, scheduler)
        norm_history.load_state_dict(state.input_norms)
    wall_offset = state.log["wall_time_s"]
    parallel_model = accelerator.prepare(model)
    sampler = WindowSampler(train_windows.shape[0], config, accelerator.num_processes)
    if state.step == 0:
        _log_evaluation(model, eval_windows, config, state, accelerator)
    bar = progress_bar(total=config.steps, initial=state.step, desc="finetune", unit="step",
                       disable=not (progress and accelerator.is_main_process))
    try:
        while state.step < config.steps:
            record = _train_step(parallel_model, parameters, optimizer, scheduler, train_windows, sampler, state.step,
                                 config, accelerator, norm_history, checkpoints)
            state.step += 1
            state.log["steps"].append(record)
            state.log["train_tokens"] += record["tokens"]
            state.log["train_time_s"] += record["time_s"]
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)
            if state.step in change_steps:
                parameters, optimizer, scheduler = _change_structure(model, installed, optimizer, scheduler, config,
                                                                     state)
            finished = state.step == config.steps
            if finished or (config.eval_every and state.step % config.eval_every == 0):
                _log_evaluation(model, eval_windows, config, state, accelerator)
            if finished or (config.save_every and state.step % config.save_every == 0):
                state.log["wall_time_s"] = wall_offset + time.perf_counter() - started
                state.input_norms = norm_history.state_dict()
                checkpoints.save(state, model, optimizer, scheduler, installed.describe() or None)
    finally:
        bar.close()
        installed.track_input_norms(False)
        if config.gradient_checkpointing:
            model.activation_checkpointing_disable()
        model.eval()
    return _finish(model, state, norm_history, wall_offset + time.perf_counter() - started, accelerator)


def _structure_change_steps(installed: InstalledAdapter, config: TrainConfig, accelerator: Any) -> list[int]:
    """The steps after which merge-lor2c / inject-lor2c change their paths (none for other adapters)."""
    steps = installed.change_steps(config.steps)
    if steps and accelerator.num_processes > 1:
        raise RotaqError(f"{installed.config.kind} changes its parameters during training, which data-parallel "
                         "training cannot follow; train it in one process")
    return steps


def _change_structure(model: nn.Module, installed: InstalledAdapter, optimizer: torch.optim.Optimizer, scheduler: Any,
                      config: TrainConfig, state: TrainingState) -> tuple[list[nn.Parameter], Any, Any]:
    """Merge or inject once, then rebuild the optimizer over the parameters now present: the survivors keep
    their Adam moments, the new ones start fresh, and the learning-rate schedule goes on where it was."""
    change = installed.change_structure()
    parameters = mark_only_adapters_trainable(model)
    rebuilt = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    for parameter in parameters:
        if parameter in optimizer.state:
            rebuilt.state[parameter] = optimizer.state[parameter]
    rebuilt_scheduler = _cosine_schedule(rebuilt, config)
    rebuilt_scheduler.load_state_dict(scheduler.state_dict())
    for group, lr in zip(rebuilt.param_groups, rebuilt_scheduler.get_last_lr()):
        group["lr"] = lr
    state.log.setdefault("structure_changes", []).append({"step": state.step, "kind": installed.config.kind, **change})
    return parameters, rebuilt, rebuilt_scheduler


def _cosine_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig) -> Any:
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=config.warmup, num_training_steps=config.steps)


def _seed_process(seed: int, process_index: int) -> None:
    """Adapters are initialised from their own generator; this seeds dropout, differently per process."""
    from accelerate.utils import set_seed

    set_seed(seed + process_index)


def _train_step(parallel_model: nn.Module, parameters: list[nn.Parameter], optimizer: torch.optim.Optimizer,
                scheduler: Any, train_windows: Tensor, sampler: WindowSampler, step: int, config: TrainConfig,
                accelerator: Any, norm_history: InputNormHistory, checkpoints: CheckpointFolder) -> dict[str, Any]:
    """One optimizer step over `grad_accum` micro-batches; stops on a non-finite loss before any update."""
    tick = time.perf_counter()
    parallel_model.train()
    losses = []
    for micro_batch in range(config.grad_accum):
        batch = train_windows[sampler.indices(step, micro_batch, accelerator.process_index)].to(accelerator.device)
        last = micro_batch == config.grad_accum - 1
        with nullcontext() if last else accelerator.no_sync(parallel_model):
            loss = causal_lm_loss(parallel_model, batch)
            norm_history.commit_batch()
            # Averaged over processes before anyone steps, so every process sees a NaN and stops together.
            global_loss = float(accelerator.reduce(loss.detach(), reduction="mean"))
            _require_finite("loss", global_loss, step, checkpoints)
            accelerator.backward(loss / config.grad_accum)
        losses.append(global_loss)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm))
    _require_finite("gradient norm", grad_norm, step, checkpoints)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - tick
    tokens = config.grad_accum * config.batch_size * train_windows.shape[1] * accelerator.num_processes
    return {"step": step + 1, "loss": sum(losses) / len(losses), "lr": scheduler.get_last_lr()[0],
            "grad_norm": grad_norm, "tokens": tokens, "time_s": elapsed, "tokens_per_s": tokens / elapsed}


def _require_finite(what: str, value: float, step: int, checkpoints: CheckpointFolder) -> None:
    if math.isfinite(value):
        return
    kept = checkpoints.latest()
    where = f"the last good checkpoint {kept} is kept" if kept else "no checkpoint had been written yet"
    raise NonFiniteError(f"training stopped: the {what} became {value} at step {step + 1}; {where} "
                         "(lower --lr, or check the data)")


def _log_evaluation(model: nn.Module, eval_windows: Tensor, config: TrainConfig, state: TrainingState,
                    accelerator: Any) -> None:
    """Held-out perplexity, measured by the main process while the others wait."""
    if accelerator.is_main_process:
        result = evaluate(model, eval_windows, batch_size=config.eval_batch_size, progress=False)
        state.log["evaluations"].append({"step": state.step, "perplexity": result.perplexity, "nll": result.nll,
                                         "tokens": result.tokens})
    accelerator.wait_for_everyone()


def adapter_digest(model: nn.Module) -> str:
    """SHA-256 of every adapter tensor, to show that data-parallel processes hold the same adapters."""
    digest = hashlib.sha256()
    for name, tensor in sorted(adapter_state_dict(model).items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _finish(model: nn.Module, state: TrainingState, norm_history: InputNormHistory, wall_time: float,
            accelerator: Any) -> TrainResult:
    """Check the processes agree, average the input-norm statistics over them, summarise the log."""
    from accelerate.utils import gather_object

    digests = gather_object([adapter_digest(model)])
    if len(set(digests)) != 1:
        raise RotaqError(f"data-parallel processes ended with different adapter weights ({digests}); "
                         "this is a bug, please report it")
    log = state.log
    log.update(wall_time_s=wall_time, processes=accelerator.num_processes, process_adapter_sha256=digests,
               tokens_per_s=log["train_tokens"] / log["train_time_s"] if log["train_time_s"] else None)
    ratios = None
    if norm_history.history and norm_history.installed is not None:
        mean_norms = {projection: accelerator.reduce(torch.tensor(norms, dtype=torch.float64,
                                                                  device=accelerator.device), reduction="mean")
                      for projection, norms in norm_history.mean_norms().items()}
        ratios = norm_ratios({p: n.cpu().tolist() for p, n in mean_norms.items()}, norm_history.installed.config)
    return TrainResult(log=log, input_norm_ratios=ratios)
