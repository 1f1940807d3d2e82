"""Swap quantized kernels into an exported float graph, like ONNX Runtime's matmul_nbits_quantizer.

Every linear of `DecoderGraph` exports as MatMul(x, `<module>.weight_t`), so a layer is found by
its weight initializer's name alone; its MatMul is replaced in place by the layer's emitter nodes
(writing the same output name, so the bias Add and everything downstream are untouched) and the
float weight initializer is dropped.
"""

from __future__ import annotations

import onnx
from onnx import helper

from rotaq.export.emitters import LinearEmitter
from rotaq.pipeline.errors import RotaqError


def rewrite_linears(model: onnx.ModelProto, emitters: dict[str, LinearEmitter]) -> None:
    """Replace MatMul(x, name) by `emitters[name]` for every weight initializer name in `emitters`.

    Raises if a name is not the B input of exactly one MatMul, so a renamed or folded weight can
    never leave a layer silently in float.
    """
    if not emitters:
        return
    graph = model.graph
    matches = {name: [n for n in graph.node if n.op_type == "MatMul" and n.domain in ("", "ai.onnx")
                      and n.input[1] == name] for name in emitters}
    unmatched = sorted(name for name, nodes in matches.items() if len(nodes) != 1)
    if unmatched:
        raise RotaqError(f"cannot place quantized kernels: no single float MatMul reads {', '.join(unmatched)}")
    replaced: dict[int, list[onnx.NodeProto]] = {}
    for name, emitter in emitters.items():
        node = matches[name][0]
        emission = emitter.emit(node.input[0], node.output[0], prefix=name.removesuffix(".weight_t"))
        replaced[id(node)] = emission.nodes
        graph.initializer.extend(emission.initializers)
        _import_domains(model, emission.domains)
    new_nodes = [new for node in graph.node for new in replaced.get(id(node), [node])]
    graph.ClearField("node")
    graph.node.extend(new_nodes)
    kept = [tensor for tensor in graph.initializer if tensor.name not in emitters]
    graph.ClearField("initializer")
    graph.initializer.extend(kept)


def _import_domains(model: onnx.ModelProto, domains: dict[str, int]) -> None:
    present = {opset.domain for opset in model.opset_import}
    for domain, version in domains.items():
        if domain not in present:
            model.opset_import.append(helper.make_opsetid(domain, version))
