"""The finetune stage: a (rotated) stage folder in, the same frozen weights plus trained adapters out.

Output folder: model.safetensors (the parent's tensors, unchanged and under the same names, plus the
adapter tensors, so `load_model` rebuilds the adapted model in one strict load), adapters.safetensors
(the adapter tensors alone), training_log.json, and a manifest whose 'adapters' section describes
them; the parent's 'rotation' section is carried forward so the folder reloads with its online
rotations.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from rotaq.adapters.checkpoint import CheckpointFolder
from rotaq.adapters.config import AdapterConfig
from rotaq.adapters.input_norms import NORM_BATCHES
from rotaq.adapters.kinds import adapter_kind, adapter_type_names, install_adapter, required_adapter
from rotaq.adapters.lor2c_config import SCORE_METHODS, Lor2cConfig
from rotaq.adapters.structure import adapter_state_dict
from rotaq.adapters.train import TrainConfig, TrainResult, train_adapters
from rotaq.pipeline.devices import AUTO, CPU, torch_device, training_device_problem
from rotaq.pipeline.artifacts import WEIGHTS_NAME, is_artifact, new_manifest, refuse_output_over_input, write_model_artifact
from rotaq.pipeline.data import DataSpec, load_split_windows, windows_fingerprint
from rotaq.pipeline.errors import ArtifactError, RotaqError
from rotaq.pipeline.loading import LoadedModel, load_model
from rotaq.pipeline.options import setting
from rotaq.quantizers.schemes import clip_ratio_problem, scheme_problem

logger = logging.getLogger(__name__)

ADAPTERS_FILE = "adapters.safetensors"
TRAINING_LOG_FILE = "training_log.json"


def dropout_problem(dropout: float) -> str | None:
    return None if 0.0 <= dropout < 1.0 else f"must be in [0, 1), got {dropout}"


@dataclass(frozen=True)
class FinetuneOptions:
    model: str | None
    out: Path
    adapter: str = setting("lora", "lora, reslora-is/bs/ms, or a LoR2C type: lor2c, share-lor2c, merge-lor2c, "
                                   "inject-lor2c", choices=adapter_type_names)
    targets: str | None = setting(None, "comma-separated projections, e.g. q_proj,v_proj (null: all seven)")
    rank: int = setting(8, "adapter rank", minimum=1)
    alpha: float = setting(16.0, "scaling s = alpha / rank")
    dropout: float = setting(0.0, "dropout on the adapter input, in [0, 1)", check=dropout_problem)
    pre_num: int | None = setting(None, "earlier blocks a reslora-bs/ms shortcut reaches (null: the type's default)",
                                  minimum=1)
    qat: str | None = setting(None, "train for a quantized deployment, e.g. w4a4 (null: plain float training)",
                              check=scheme_problem)
    # `rotaq run` sets it from quantize.act_clip_ratio, so what is trained is what is deployed.
    qat_act_clip_ratio: float | None = setting(None, "with qat: clip per-token activations as the quantize stage's "
                                                     "act_clip_ratio will", check=clip_ratio_problem)
    lor2c_changes: int | None = setting(None, "merge-lor2c merges / inject-lor2c injections (null: 4 / 2)",
                                        minimum=0)
    lor2c_interval: int | None = setting(None, "steps between LoR2C merges / injections (null: spread evenly)",
                                         minimum=1)
    lor2c_score: str = setting("mean", "LoR2C path score from the singular values of s·B·A: mean (grows with the "
                                       "update) or top-share (share of the top-k)", choices=lambda: SCORE_METHODS)
    lor2c_top_k: int = setting(1, "singular values counted by the top-share score", minimum=1)
    training: TrainConfig = field(default_factory=TrainConfig)
    data: str | None = None
    seq_len: int = 256
    eval_tokens: int = setting(4096, "held-out tokens scored before and after training", minimum=2)
    device: str = setting(AUTO, "auto (accelerate's choice: the GPUs when there are any, one per `accelerate "
                                "launch` process), cpu or cuda", check=training_device_problem)
    resume: bool = False
    checkpoint_dir: Path | None = None  # default: <out>.checkpoints
    progress: bool = True

    @property
    def checkpoint_folder(self) -> Path:
        return Path(self.checkpoint_dir) if self.checkpoint_dir else Path(f"{self.out}.checkpoints")


def run_finetune(options: FinetuneOptions) -> Path:
    """Train adapters on the train split and write the finetune folder (from the main process)."""
    from accelerate import Accelerator

    refuse_output_over_input(options.out, options.model)
    _refuse_unreplaceable_out(Path(options.out))
    # Without CUDA, accelerate only sets up multi-process (gloo) training when told it runs on the CPU.
    if options.device != AUTO:
        torch_device(options.device)  # a missing GPU is refused here, in one line
    accelerator = Accelerator(cpu=options.device == CPU or not torch.cuda.is_available())
    loaded = load_model(options.model)
    _refuse_unsuitable_parent(loaded, options.model)
    config = adapter_config(options, loaded)
    installed = install_adapter(loaded.model, loaded.family, config, seed=options.training.seed)
    installed.change_steps(options.training.steps)  # a schedule that cannot fit fails here, before training
    train_windows = load_split_windows(DataSpec(options.data, options.seq_len), loaded.tokenizer, "train")
    eval_windows = load_split_windows(DataSpec(options.data, options.seq_len, options.eval_tokens), loaded.tokenizer,
                                      "evaluation")
    settings = _trajectory_settings(options, config, loaded, train_windows, accelerator.num_processes)
    checkpoints = CheckpointFolder(options.checkpoint_folder, settings, accelerator)
    resume_from = checkpoints.checkpoint_to_resume(options.resume)
    if resume_from is not None:
        logger.info("resuming from %s", resume_from)
    result = train_adapters(loaded.model, train_windows, eval_windows, options.training, checkpoints, resume_from,
                            accelerator, progress=options.progress)
    if accelerator.is_main_process:
        _write_folder(options, loaded, config, result, eval_windows)
    accelerator.wait_for_everyone()
    return Path(options.out)


def adapter_config(options: FinetuneOptions, loaded: LoadedModel) -> AdapterConfig | Lor2cConfig:
    """The configuration of the adapter kind `options.adapter` names, from the fine-tune options."""
    return adapter_kind(options.adapter).resolve("config").from_options(options, loaded.family)


def _refuse_unreplaceable_out(out: Path) -> None:
    """Fail before training, not after it, when --out could not be written."""
    if out.exists() and not is_artifact(out) and (not out.is_dir() or any(out.iterdir())):
        raise ArtifactError(f"refusing to overwrite {out}: it exists and is not a rotaq output folder")


def _refuse_unsuitable_parent(loaded: LoadedModel, reference: str | None) -> None:
    manifest = loaded.manifest or {}
    if "adapters" in manifest:
        raise RotaqError(f"{reference} already has adapters; merge them first (rotaq merge), then fine-tune again")
    if "side_paths" in manifest:
        raise RotaqError(f"{reference} carries LoR2C side paths from an earlier fine-tune; fine-tune its parent "
                         "instead")
    if "quantization" in manifest:
        raise RotaqError(f"{reference} is quantized; fine-tune the rotated float model and quantize afterwards "
                         "(use --qat to train for the quantized deployment)")


def _trajectory_settings(options: FinetuneOptions, config: AdapterConfig | Lor2cConfig, loaded: LoadedModel,
                         train_windows: Any, processes: int) -> dict[str, Any]:
    """Everything that determines the trained adapters; a checkpoint only resumes under the same values."""
    manifest = loaded.manifest or {}
    base = {"weights_sha256": manifest.get("files", {}).get(WEIGHTS_NAME)} if manifest else loaded.source
    return {"adapter": config.to_section(), "training": options.training.trajectory_settings(),
            "data": {"source": options.data or "default", "seq_len": options.seq_len,
                     "train_windows_sha256": windows_fingerprint(train_windows)},
            "base_model": base, "processes": processes}


def _write_folder(options: FinetuneOptions, loaded: LoadedModel, config: AdapterConfig | Lor2cConfig,
                  result: TrainResult, eval_windows: Any) -> None:
    parent = loaded.manifest or {}
    option_values = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()}
    manifest = new_manifest("finetune", option_values, loaded.source, loaded.manifest)
    if "rotation" in parent:
        manifest["rotation"] = parent["rotation"]
    tensors = {name: tensor.contiguous().cpu() for name, tensor in adapter_state_dict(loaded.model).items()}
    manifest["adapters"] = {**config.to_section(), "file": ADAPTERS_FILE,
                            "trainable_parameters": sum(tensor.numel() for tensor in tensors.values()),
                            "input_norm_ratios": result.input_norm_ratios, "input_norm_batches": NORM_BATCHES,
                            "training": training_summary(result.log, eval_windows)}
    if structure := required_adapter(loaded.model).describe():
        manifest["adapters"].update(structure, structure_changes=result.log.get("structure_changes", []))
    write_model_artifact(options.out, loaded.model, loaded.tokenizer, manifest, extra_writers={
        ADAPTERS_FILE: lambda path: save_file(tensors, str(path), metadata={"format": "pt"}),
        TRAINING_LOG_FILE: lambda path: path.write_text(json.dumps(result.log, indent=1) + "\n"),
    })


def training_summary(log: dict[str, Any], eval_windows: Any) -> dict[str, Any]:
    """The numbers a reader of the manifest wants first; the full curves are in training_log.json."""
    evaluations = log["evaluations"]
    return {"steps": len(log["steps"]), "final_loss": log["steps"][-1]["loss"] if log["steps"] else None,
            "eval_perplexity_before": evaluations[0]["perplexity"] if evaluations else None,
            "eval_perplexity_after": evaluations[-1]["perplexity"] if evaluations else None,
            "eval_windows_sha256": windows_fingerprint(eval_windows), "tokens_per_s": log.get("tokens_per_s"),
            "wall_time_s": log["wall_time_s"], "processes": log.get("processes")}
