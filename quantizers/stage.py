"""The quantize stage: a float (usually rotated) stage folder in, a quantized stage folder out.

The folder holds the fake-quant model (`model.safetensors`, dequantized weights, loadable by every
stage) and the integer codes with scales and zero points (`quantized.safetensors`), which export
writes into ONNX as they are.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from rotaq.pipeline.artifacts import (WEIGHTS_NAME, finish_model_folder, new_manifest, refuse_output_over_input,
                                     staged_folder, write_model_artifact)
from rotaq.pipeline.devices import CPU, device_problem, torch_device
from rotaq.pipeline.data import DataSpec, load_split_windows, windows_fingerprint
from rotaq.pipeline.errors import RotaqError
from rotaq.pipeline.families import family_for_model_type
from rotaq.pipeline.loading import WeightsFolder, load_model, model_files_explained, weights_folder
from rotaq.pipeline.options import setting
from rotaq.pipeline.tensor_files import TensorFiles
from rotaq.quantizers.quantize_model import WEIGHT_METHODS, QuantizeSettings, quantize_model
from rotaq.quantizers.rtn import QuantizedWeight
from rotaq.quantizers.schemes import QuantScheme, clip_ratio_problem, parse_scheme, scheme_problem
from rotaq.quantizers.streamed import quantize_streamed, streamable_model, streaming_problem

logger = logging.getLogger(__name__)
CODES_NAME = "quantized.safetensors"
DEFAULT_CALIBRATION = DataSpec(seq_len=512, max_tokens=32 * 512)


@dataclass(frozen=True)
class QuantizeOptions:
    model: str | None
    out: Path
    scheme: str = setting("w4a4", "w8a8, w4a8, w4a4, w4a16, each with an optional group: w4a16-g128",
                          check=scheme_problem)
    weights: str = setting("gptq", "weight quantizer: rtn or gptq", choices=lambda: WEIGHT_METHODS)
    group: int | None = setting(None, "weight group size along the input (null: the scheme's)", minimum=1)
    act_clip_ratio: float | None = setting(
        None, "clip per-token activation ranges to this fraction of max|x|, in the schemes with per-token "
              "activations (w4a4; the A8 schemes keep ONNX Runtime's per-block int8); null: no clipping",
        check=clip_ratio_problem)
    ragged_groups: bool = setting(False, "allow a shorter last weight group where the group size does not divide a "
                                         "width (e.g. -g128 on 576: groups of 128 and a last one of 64, as "
                                         "MatMulNBits pads K)")
    act_block_size: int | None = setting(None, "int8 activations per block of N along K, as ONNX Runtime's "
                                               "MatMulNBits accuracy_level 4 computes them (null: the scheme's, "
                                               "w4a8 128, w8a8 64); 0: per token", minimum=0)
    kv_bits: int | None = setting(None, "also quantize the KV cache (k_proj/v_proj outputs per token and head, "
                                        "symmetric) to 4 or 8 bits; null: a float cache", choices=lambda: (4, 8))
    act_order: bool = setting(True, "GPTQ: visit columns in order of decreasing Hessian diagonal")
    layer_by_layer: bool = setting(True, "quantize one decoder layer at a time from the memory-mapped safetensors "
                                         "(peak memory: one layer, the embeddings and GPTQ's calibration inputs); "
                                         "false, or .bin weights, LoR2C side paths or a tied lm_head: "
                                         "load the whole model in float32")
    device: str = setting(CPU, "where RTN, GPTQ and the calibration forward passes run: cpu, cuda or cuda:N "
                               "(weights are read and written on the CPU)", check=device_problem)
    calibration: DataSpec = DEFAULT_CALIBRATION
    progress: bool = True


def resolve_scheme(options: QuantizeOptions) -> QuantScheme:
    """The named scheme with command-line overrides (group size, activation clipping) applied."""
    scheme = parse_scheme(options.scheme)
    overrides: dict[str, Any] = {}
    if options.group is not None:
        overrides["weight_group_size"] = options.group
    if options.act_clip_ratio is not None:
        overrides["act_clip_ratio"] = options.act_clip_ratio
        if options.act_clip_ratio != 1.0:
            # ONNX Runtime's per-block kernel does not clip: a clipped scheme quantizes per token.
            overrides["act_block_size"] = None
    if options.act_block_size is not None:
        overrides["act_block_size"] = options.act_block_size or None
    if options.kv_bits is not None:
        overrides["kv_bits"] = options.kv_bits
    if options.ragged_groups:
        overrides["ragged_groups"] = True
    return dataclasses.replace(scheme, **overrides) if overrides else scheme


def codes_tensors(codes: dict[str, QuantizedWeight]) -> dict[str, Any]:
    tensors: dict[str, Any] = {}
    for path, quantized in codes.items():
        tensors[f"{path}.codes"] = quantized.codes.cpu().contiguous()
        tensors[f"{path}.scales"] = quantized.scales.cpu().contiguous()
        if quantized.zero_points is not None:
            tensors[f"{path}.zero_points"] = quantized.zero_points.cpu().contiguous()
    return tensors


def run_quantize(options: QuantizeOptions) -> Path:
    scheme = resolve_scheme(options)
    settings = QuantizeSettings(scheme=scheme, weights=options.weights, act_order=options.act_order,
                                progress=options.progress)
    refuse_output_over_input(options.out, options.model)
    device = torch_device(options.device)
    if options.layer_by_layer:
        weights = weights_folder(options.model)
        if weights is not None:
            _refuse_parent(options.model, weights.manifest)
            family = family_for_model_type(weights.config.model_type)
            model = streamable_model(weights.config, family, weights.manifest)
            problem = streaming_problem(model, family, weights.manifest)
            if problem is None:
                return _quantize_layer_by_layer(options, settings, weights, model, family, device)
            logger.info("quantizing the whole model in memory: %s", problem)
    loaded = load_model(options.model)
    _refuse_parent(options.model, loaded.manifest)
    windows = (load_split_windows(options.calibration, loaded.tokenizer, "calibration")
               if settings.weights == "gptq" else None)
    started = time.perf_counter()
    codes, layer_specs = quantize_model(loaded.model.to(device), loaded.family, settings, windows)
    loaded.model.cpu()
    manifest = _quantize_manifest(options, settings, loaded.source, loaded.manifest, windows, layer_specs, started)
    tensors = codes_tensors(codes)
    return write_model_artifact(options.out, loaded.model, loaded.tokenizer, manifest,
                                extra_writers={CODES_NAME: lambda path: save_file(tensors, str(path))})


def _quantize_layer_by_layer(options: QuantizeOptions, settings: QuantizeSettings, weights: WeightsFolder,
                             model: Any, family: Any, device: torch.device) -> Path:
    """quantize_streamed into a staged folder: the fake-quant weights (float32) and the codes, layer by layer."""
    tokenizer = weights.tokenizer()
    windows = (load_split_windows(options.calibration, tokenizer, "calibration")
               if settings.weights == "gptq" else None)
    with model_files_explained(weights.folder):
        files = TensorFiles(weights.folder)
    started = time.perf_counter()
    with staged_folder(options.out) as tmp:
        with model_files_explained(weights.folder):
            layer_specs = quantize_streamed(files, model, family, settings, windows, tmp / WEIGHTS_NAME,
                                            tmp / CODES_NAME, codes_tensors, device)
        manifest = _quantize_manifest(options, settings, weights.source, weights.manifest, windows, layer_specs,
                                      started)
        weights.config.dtype = torch.float32  # what the fake-quant weights are, as the whole-model path writes
        finish_model_folder(tmp, weights.config.to_dict(), tokenizer, manifest)
    return Path(options.out)


def _refuse_parent(model: str | None, manifest: dict | None) -> None:
    if manifest and manifest.get("quantization"):
        raise RotaqError(f"{model} is already quantized; quantize its float parent instead")
    if manifest and manifest.get("adapters"):
        raise RotaqError(f"{model} still has adapters; run `rotaq merge` first")


def _quantize_manifest(options: QuantizeOptions, settings: QuantizeSettings, source: dict, parent: dict | None,
                       windows: Any, layer_specs: dict, started: float) -> dict[str, Any]:
    manifest = new_manifest("quantize", _options_dict(options), source, parent)
    for carried in ("rotation", "side_paths"):
        if parent and carried in parent:
            manifest[carried] = parent[carried]
    manifest["quantization"] = {
        "scheme": {**dataclasses.asdict(settings.scheme), "name": settings.scheme.name},
        "weights": settings.weights,
        "act_order": settings.act_order,
        "calibration": None if windows is None else {
            "windows": int(windows.shape[0]), "seq_len": int(windows.shape[1]),
            "sha256": windows_fingerprint(windows)},
        "seconds": round(time.perf_counter() - started, 2),
        "codes_file": CODES_NAME,
        "layers": layer_specs,
    }
    if parent and "side_paths" in parent:
        # LoR2C side paths are rank-r matmuls on the float residual stream; they stay float32.
        manifest["quantization"]["side_paths"] = "float32"
    return manifest


def _options_dict(options: QuantizeOptions) -> dict[str, Any]:
    values = dataclasses.asdict(options)
    values["out"] = str(options.out)
    return values
