"""The checks an export must pass before it is moved into place.

Float graphs:
1. The export forward reproduces the HF model (max|a-b|/max|b| < 1e-5).
2. onnx.checker accepts the graph (full check, with shape inference).
3. ONNX Runtime reproduces the PyTorch export forward on a prefill (< 1e-4).
4. Prefill followed by single-token decode steps gives the logits of one long prefill (< 1e-4).

Quantized graphs: a float32 rounding difference anywhere (HF's SDPA vs the export's attention, ORT's
MatMul order) can move an activation across a rounding tie, and a 4-bit code step then spreads
through every later layer, so whole-model logits of two correct implementations can differ a lot.
The exactness check is therefore per layer: each quantized linear alone in ONNX Runtime, on the
activations it sees in the check sequences, against its emitter's PyTorch reference (< 1e-5).
Whole-model errors (1, 3, 4) are measured and recorded, not enforced.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from rotaq.eval.metrics import compare_logits
from rotaq.export.emitters import single_layer_model
from rotaq.export.graph_module import DecoderGraph, ExportLinear
from rotaq.export.layout import OPSET
from rotaq.export.runtime import OnnxDecoder, create_session
from rotaq.pipeline.errors import RotaqError

GRAPH_TOLERANCE = 1e-5
RUNTIME_TOLERANCE = 1e-4
LAYER_TOLERANCE = 1e-5


def max_relative_error(actual: torch.Tensor | np.ndarray, expected: torch.Tensor | np.ndarray) -> float:
    """max|a - b| / max|b| over all positions and the vocabulary."""
    return compare_logits(actual, expected)["max_rel_error"]


def graph_prefill_logits(graph: DecoderGraph, input_ids: torch.Tensor) -> torch.Tensor:
    """The export forward's logits for unpadded sequences [B, T], with an empty cache."""
    shape = graph.shape
    past = tuple(torch.zeros(input_ids.shape[0], shape.num_kv_heads, 0, shape.head_dim)
                 for _ in range(2 * shape.num_layers))
    with torch.inference_mode():
        return graph(input_ids, torch.ones_like(input_ids), past)[0]


def graph_greedy_ids(graph: DecoderGraph, prompt_ids: list[int], new_tokens: int) -> list[int]:
    """Greedy continuation of `prompt_ids` by the PyTorch export forward (no cache: a reference, not fast)."""
    ids = list(prompt_ids)
    for _ in range(new_tokens):
        ids.append(int(graph_prefill_logits(graph, torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt_ids):]


def _require(name: str, error: float, tolerance: float) -> None:
    if not error < tolerance:
        raise RotaqError(f"export check {name} failed (relative error {error:.2e} > {tolerance}); "
                         "nothing was written")


def check_graph_matches_model(graph: DecoderGraph, model: nn.Module, input_ids: torch.Tensor) -> dict[str, Any]:
    """Logit agreement of the export forward with the HF model; enforced for float graphs."""
    with torch.inference_mode():
        expected = model(input_ids=input_ids).logits
    return compare_graph_logits(graph_prefill_logits(graph, input_ids), expected, bool(graph.quantized_linears()))


def compare_graph_logits(graph_logits: torch.Tensor, model_logits: torch.Tensor, quantized: bool) -> dict[str, Any]:
    comparison = compare_logits(graph_logits, model_logits)
    if not quantized:
        _require("export forward vs model", comparison["max_rel_error"], GRAPH_TOLERANCE)
    return comparison


def register_runtime_schemas() -> None:
    """Teach onnx.checker ONNX Runtime's SimplifiedLayerNormalization, which ORT registers in the default
    domain (as onnxruntime-genai's builder graphs use it) but onnx itself does not define; the
    com.microsoft operators are not checked by onnx at all."""
    from onnx import defs

    if defs.has("SimplifiedLayerNormalization"):
        return
    schema = defs.OpSchema
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"]
    defs.register_schema(schema(
        "SimplifiedLayerNormalization", "", 1,
        inputs=[schema.FormalParameter("X", "T"), schema.FormalParameter("scale", "V")],
        outputs=[schema.FormalParameter("Y", "V"),
                 schema.FormalParameter("inv_std_var", "U", param_option=schema.FormalParameterOption.Optional)],
        type_constraints=[("T", floats, ""), ("V", floats, ""), ("U", ["tensor(float)", "tensor(double)"], "")],
        attributes=[schema.Attribute(name, kind, "", required=False) for name, kind in
                    (("axis", schema.AttrType.INT), ("epsilon", schema.AttrType.FLOAT),
                     ("stash_type", schema.AttrType.INT))]))


def check_onnx_file(path: Path) -> None:
    """onnx.checker on the saved file (by path, so external data and >2 GB graphs are handled)."""
    register_runtime_schemas()
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise RotaqError(f"onnx.checker rejects {path.name}: {str(exc).splitlines()[0]}") from exc


def check_runtime(decoder: OnnxDecoder, expected: torch.Tensor, input_ids: torch.Tensor, decode_steps: int,
                  quantized: bool) -> dict[str, dict[str, Any]]:
    """ORT prefill vs the PyTorch export forward's prefill logits of `input_ids` (`expected`), and prefill +
    `decode_steps` cached single-token steps vs one long ORT prefill; enforced (< 1e-4) for float graphs."""
    tokens = input_ids.numpy()
    runtime_logits = decoder.logits(tokens)
    comparisons = {"ort_vs_torch": compare_logits(runtime_logits, expected),
                   "decode_vs_prefill": compare_logits(decode_logits(decoder, tokens, decode_steps),
                                                       runtime_logits[:, -decode_steps:])}
    if not quantized:
        for name, comparison in comparisons.items():
            _require(name, comparison["max_rel_error"], RUNTIME_TOLERANCE)
    return comparisons


def check_quantized_layers(graph: DecoderGraph, input_ids: torch.Tensor) -> float:
    """Worst relative error of any quantized linear run alone in ONNX Runtime against its emitter's
    PyTorch reference, on the matmul inputs the check sequences produce; refuses > 1e-5."""
    modules = quantized_modules(graph)
    with captured_matmul_inputs(modules) as inputs:
        graph_prefill_logits(graph, input_ids)
    return check_quantized_modules(modules, inputs)


def quantized_modules(module: nn.Module) -> list[ExportLinear]:
    return [m for m in module.modules() if isinstance(m, ExportLinear) and m.emitter is not None]


@contextlib.contextmanager
def captured_matmul_inputs(modules: list[ExportLinear]) -> Iterator[dict[str, torch.Tensor]]:
    """Path → what each module's weight multiplies, recorded while the block runs."""
    inputs: dict[str, torch.Tensor] = {}

    def capture(module: ExportLinear, args: tuple[torch.Tensor]) -> None:
        inputs[module.path] = module.matmul_input(args[0])

    hooks = [module.register_forward_pre_hook(capture) for module in modules]
    try:
        yield inputs
    finally:
        for hook in hooks:
            hook.remove()


def check_quantized_modules(modules: list[ExportLinear], inputs: dict[str, torch.Tensor]) -> float:
    """Each quantized linear alone in ONNX Runtime on its captured input against its emitter's reference."""
    worst = 0.0
    for module in modules:
        in_features, out_features = module.weight_t.shape
        model = single_layer_model(module.emitter, in_features, out_features, OPSET)
        x = inputs[module.path].float()
        produced = create_session(model.SerializeToString()).run(None, {"x": x.numpy()})[0]
        with torch.inference_mode():
            error = max_relative_error(produced, module.emitter.reference(x))
        _require(f"quantized layer {module.path} (ONNX Runtime vs reference)", error,
                 getattr(module.emitter, "check_tolerance", LAYER_TOLERANCE))
        worst = max(worst, error)
    return worst


def decode_logits(decoder: OnnxDecoder, tokens: np.ndarray, steps: int) -> np.ndarray:
    """Logits of the last `steps` positions, fed one token at a time after a prefill of the rest."""
    batch, length = tokens.shape
    prefix = length - steps
    _, past = decoder.step(tokens[:, :prefix], np.ones((batch, prefix), np.int64), decoder.empty_past(batch))
    logits = []
    for position in range(prefix, length):
        step_logits, past = decoder.step(tokens[:, position:position + 1],
                                         np.ones((batch, position + 1), np.int64), past)
        logits.append(step_logits)
    return np.concatenate(logits, axis=1)
