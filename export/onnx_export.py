"""Trace a `DecoderGraph` with torch's dynamo exporter and write it as ONNX with external weights."""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import onnx
import torch

from rotaq.export.graph_module import DecoderGraph, DecoderShape
from rotaq.export.layout import ATTENTION_MASK, DATA_NAME, EXTERNAL_DATA_THRESHOLD, GRAPH_NAME, INPUT_IDS, LOGITS, OPSET, io_spec, past_names, present_names
from rotaq.export.rewrite import rewrite_linears
from rotaq.pipeline.errors import RotaqError
from rotaq.pipeline.streamed_model import return_freed_memory

# Example sizes for tracing: all distinct and >= 2, because torch.export specializes sizes 0 and 1
# and would unify equal ones; the graph itself accepts any batch, sequence and past length (incl. 0).
_EXAMPLE_BATCH, _EXAMPLE_SEQUENCE, _EXAMPLE_PAST = 2, 3, 5


def example_inputs(shape: DecoderShape) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    input_ids = torch.zeros(_EXAMPLE_BATCH, _EXAMPLE_SEQUENCE, dtype=torch.long)
    attention_mask = torch.ones(_EXAMPLE_BATCH, _EXAMPLE_PAST + _EXAMPLE_SEQUENCE, dtype=torch.long)
    past = tuple(torch.zeros(_EXAMPLE_BATCH, shape.num_kv_heads, _EXAMPLE_PAST, shape.head_dim)
                 for _ in range(2 * shape.num_layers))
    return input_ids, attention_mask, past


def export_onnx(graph: DecoderGraph, folder: Path, opset: int = OPSET) -> Path:
    """Write folder/model.onnx (+ model.onnx.data) with dynamic batch, sequence and past length."""
    if opset < OPSET:
        raise RotaqError(f"opset {opset} is too old: INT4 QuantizeLinear/DequantizeLinear need opset {OPSET}")
    shape = graph.shape
    auto = torch.export.Dim.AUTO
    dynamic_shapes = {"input_ids": {0: auto, 1: auto}, "attention_mask": {0: auto, 1: auto},
                      "past_key_values": tuple({0: auto, 2: auto} for _ in range(2 * shape.num_layers))}
    with _quiet_exporter(), torch.inference_mode(False), torch.no_grad():
        program = torch.onnx.export(
            graph.eval(), example_inputs(shape), dynamo=True, opset_version=opset, dynamic_shapes=dynamic_shapes,
            input_names=[INPUT_IDS, ATTENTION_MASK, *past_names(shape.num_layers)],
            output_names=[LOGITS, *present_names(shape.num_layers)], optimize=True, verbose=False)
    model = program.model_proto
    rewrite_linears(model, graph.quantized_linears())
    _name_axes(model, io_spec(shape.num_layers, shape.num_kv_heads, shape.head_dim, shape.vocab_size))
    return save_graph(model, folder)


def save_graph(model: onnx.ModelProto, folder: Path) -> Path:
    """folder/model.onnx with the weights in model.onnx.data, for either layout."""
    path = Path(folder) / GRAPH_NAME
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_NAME, size_threshold=EXTERNAL_DATA_THRESHOLD)
    return path


class SpilledInitializers:
    """Moves a graph's large initializers into folder/model.onnx.data while the graph is still being built, so
    a layer-streamed export never holds more than one layer's tensors. Each tensor goes through onnx's own
    `set_external_data` / `save_external_data`, in the order `save_graph` would write it, so the data file and
    the graph's references are byte-for-byte those of saving the whole graph at once; `save_graph` then writes
    only the remaining small tensors inline."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        (self.folder / DATA_NAME).write_bytes(b"")
        self.spilled = 0  # initializers handled so far

    def spill(self, initializers: list[onnx.TensorProto]) -> None:
        """Write every initializer after the ones handled already; they keep their names, lose their bytes."""
        from onnx.external_data_helper import save_external_data, set_external_data

        for index in range(self.spilled, len(initializers)):
            tensor = initializers[index]
            if tensor.HasField("raw_data") and sys.getsizeof(tensor.raw_data) >= EXTERNAL_DATA_THRESHOLD:
                set_external_data(tensor, DATA_NAME)
                save_external_data(tensor, str(self.folder))
                tensor.ClearField("raw_data")
                # A cleared field keeps its bytes in the message's arena (measured: 200 MB of cleared tensors
                # stayed resident); a fresh copy without them lets the old message and its arena go.
                initializers[index] = onnx.TensorProto()
                initializers[index].CopyFrom(tensor)
        self.spilled = len(initializers)
        return_freed_memory()


def _name_axes(model: onnx.ModelProto, spec: dict[str, list[dict]]) -> None:
    """Give the graph's dynamic axes the manifest's names (the tracer calls them s0, s1 + s2, ...)."""
    values = {value.name: value for value in (*model.graph.input, *model.graph.output)}
    for entry in (*spec["inputs"], *spec["outputs"]):
        dims = values[entry["name"]].type.tensor_type.shape.dim
        for dim, size in zip(dims, entry["shape"], strict=True):
            if isinstance(size, str):
                dim.dim_param = size
            elif dim.dim_value != size:
                raise RotaqError(f"exported {entry['name']} has size {dim.dim_value or dim.dim_param} "
                                 f"where {size} was expected")


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The dynamo exporter logs optional-package notices and deprecation warnings that mean nothing here."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            logger.setLevel(level)
