"""Read a quantized stage folder's integer weights and pick each linear's ONNX kernel.

The folder's manifest section `quantization.layers` holds one `LayerQuantSpec` per quantized module
and its codes file (`quantized.safetensors`) holds `<path>.codes`, `<path>.scales` and, for
asymmetric weights, `<path>.zero_points`. Only linears get an emitter; the embedding's codes go to
`DecoderGraph`, which looks rows up as int8 codes times their scale.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import nn

from rotaq.export.emitters import ActQuant, LinearEmitter, choose_emitter
from rotaq.pipeline.errors import ArtifactError
from rotaq.pipeline.tensor_files import TensorFiles
from rotaq.quantizers.linear import LayerQuantSpec
from rotaq.quantizers.rtn import QuantizedWeight

DEFAULT_CODES_NAME = "quantized.safetensors"


def quantized_emitters(folder: Path, section: dict[str, Any], model: nn.Module) -> dict[str, LinearEmitter]:
    """Module path → emitter for every quantized linear of a quantized stage folder."""
    return emitters_for(quantized_weights(folder, section), section.get("layers", {}), model)


def quantized_weights(folder: Path, section: dict[str, Any],
                      paths: Iterable[str] | None = None) -> dict[str, QuantizedWeight]:
    """Module path → the integer codes of every quantized module of a quantized stage folder (of the named
    `paths` only, read from the memory-mapped file: one layer's codes for a layer-streamed export)."""
    codes_path = Path(folder) / section.get("codes_file", DEFAULT_CODES_NAME)
    if not codes_path.is_file():
        raise ArtifactError(f"{folder} is quantized but has no {codes_path.name} with the integer weights")
    layers = section.get("layers", {})
    wanted = list(layers) if paths is None else [path for path in paths if path in layers]
    files = TensorFiles(codes_path.parent, codes_path.name)
    stored = set(files.names())
    missing = [f"{path}.{field}" for path in wanted for field in ("codes", "scales") if f"{path}.{field}" not in stored]
    if missing:
        raise ArtifactError(f"{codes_path.name} lacks {', '.join(missing)}")
    tensors = files.read(name for path in wanted for name in (f"{path}.codes", f"{path}.scales",
                                                                f"{path}.zero_points") if name in stored)
    weights: dict[str, QuantizedWeight] = {}
    for path in wanted:
        spec = LayerQuantSpec.from_dict(layers[path])
        weights[path] = QuantizedWeight(codes=tensors[f"{path}.codes"], scales=tensors[f"{path}.scales"],
                                        zero_points=tensors.get(f"{path}.zero_points"), group_size=spec.group_size,
                                        bits=spec.weight_bits, symmetric=spec.weight_symmetric)
    return weights


def emitters_for(weights: dict[str, QuantizedWeight], layer_specs: dict[str, dict[str, Any]],
                 model: nn.Module) -> dict[str, LinearEmitter]:
    """Module path → emitter for every quantized linear, from the quantize stage's codes and specs
    (what `rotaq.quantizers.quantize_model.quantize_model` returns, or what a folder holds)."""
    emitters: dict[str, LinearEmitter] = {}
    for path, values in layer_specs.items():
        if path not in weights or not isinstance(model.get_submodule(path), nn.Linear):
            continue
        spec = LayerQuantSpec.from_dict(values)
        act = ActQuant(bits=spec.act_bits, symmetric=spec.act_symmetric, clip_ratio=spec.act_clip_ratio,
                       block_size=spec.act_block_size)
        emitters[path] = choose_emitter(weights[path], act)
    return emitters
