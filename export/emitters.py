"""How one quantized linear becomes ONNX nodes: one emitter per kernel, each with the PyTorch function
its nodes compute, so a graph can be held against its own reference at a tight tolerance.

Weights are the quantize stage's `QuantizedWeight` codes/scales/zero points written as they are
(`rotaq.quantizers.rtn` layout: codes [out, in], scales [out, n_groups]). Activations are quantized as the
stage's `LayerQuantSpec` says: per token (`rotaq.quantizers.activations.fake_quantize_per_token`), or per
block of K (`fake_quantize_per_block`, what ONNX Runtime's MatMulNBits does at accuracy_level 4).
`choose_emitter` only picks kernels that compute the stage's own fake-quant function.

| emitter | ONNX | computes |
|---|---|---|
| `QDQLinear` | act fake-quant subgraph + MatMulNBits acc 0 (or DequantizeLinear(INT4/INT8 codes) + MatMul where MatMulNBits cannot hold the codes) | F.linear(fake_quantize_per_token(x), W_deq) |
| `MatMulIntegerLinear` | per-token int8 codes + MatMulInteger + two scale Muls | float32(Σ_k qx·qw) · s_x · s_w, the sum exact in int32 |
| `MatMulNBitsLinear` acc 0 | com.microsoft MatMulNBits, float32 A | x · W_deqᵀ |
| `MatMulNBitsLinear` acc 4 | com.microsoft MatMulNBits, A → int8 per block | fake_quantize_per_block(x, 8, block) · W_deqᵀ |
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor
from torch.nn import functional as F

from rotaq.pipeline.errors import RotaqError
from rotaq.quantizers.activations import fake_quantize_per_block, fake_quantize_per_token, quantize_per_token
from rotaq.quantizers.rtn import QuantizedWeight, qrange

MS_DOMAIN = "com.microsoft"
# MatMulNBits block sizes MLAS has kernels for (powers of two); a per-channel scale is repeated per block.
_NBITS_BLOCK_SIZES = (128, 64, 32, 16)


@dataclass(frozen=True)
class ActQuant:
    """Dynamic activation quantization of a linear's matmul input (the stage's act_* layer fields);
    `block_size` None means one scale per token, else one per block of K."""

    bits: int
    symmetric: bool = True
    clip_ratio: float = 1.0
    block_size: int | None = None

    @property
    def active(self) -> bool:
        return self.bits < 16


@dataclass
class Emission:
    """Nodes and initializers that replace one float MatMul, plus the operator domains they need."""

    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    domains: dict[str, int] = field(default_factory=dict)


class LinearEmitter(Protocol):
    """Emits y = x · Wᵀ for one layer (bias is added by the graph) and says what that computes."""

    kind: str

    def reference(self, x: Tensor) -> Tensor:
        """The PyTorch function the emitted nodes compute, for x [..., in] float32."""

    def emit(self, x: str, y: str, prefix: str) -> Emission:
        """Nodes reading tensor `x` and writing `y`; every new name starts with `prefix`."""

    def describe(self) -> dict[str, Any]:
        """The kernel and its numerics, for export.json."""

    def numerics(self) -> tuple:
        """Everything but the weight that fixes what the kernel computes: equal tuples may share a node."""

    def with_weight(self, weight: QuantizedWeight) -> LinearEmitter:
        """The same kernel over other codes (see `stacked_emitter`)."""


class NodeBuilder:
    """Collects nodes and initializers under one name prefix (into `emission`, shared or its own)."""

    def __init__(self, prefix: str, emission: Emission | None = None) -> None:
        self.prefix = prefix
        self.emission = emission if emission is not None else Emission()

    def name(self, suffix: str) -> str:
        return f"{self.prefix}/{suffix}"

    def node(self, op: str, inputs: list[str], suffix: str, output: str | None = None, domain: str = "",
             **attributes: Any) -> str:
        output = output or self.name(suffix)
        self.multi_output_node(op, inputs, suffix, [output], domain, **attributes)
        return output

    def multi_output_node(self, op: str, inputs: list[str], suffix: str, outputs: list[str], domain: str = "",
                          **attributes: Any) -> list[str]:
        """A node with several outputs (an empty name leaves that output unused)."""
        self.emission.nodes.append(helper.make_node(op, inputs, outputs, name=self.name(f"{suffix}_{op}"),
                                                    domain=domain, **attributes))
        if domain:
            self.emission.domains[domain] = 1
        return outputs

    def constant(self, suffix: str, value: np.ndarray) -> str:
        self.emission.initializers.append(numpy_helper.from_array(np.asarray(value), self.name(suffix)))
        return self.name(suffix)

    def tensor(self, tensor: onnx.TensorProto) -> str:
        self.emission.initializers.append(tensor)
        return tensor.name


def _float(value: float) -> np.ndarray:
    return np.array(value, dtype=np.float32)


def _emit_activation_codes(b: NodeBuilder, x: str, act: ActQuant) -> tuple[str, str, str | None]:
    """Per-token codes (float, integer-valued), scale [..., 1] and zero point, op for op as
    `rotaq.quantizers.activations` computes them in float32 (so rounding ties break the same way)."""
    qmin, qmax = qrange(act.bits, act.symmetric)
    last_axis = b.constant("last_axis", np.array([-1], dtype=np.int64))
    if act.symmetric:
        absmax = b.node("ReduceMax", [b.node("Abs", [x], "abs"), last_axis], "absmax", keepdims=1)
        scale = b.node("Mul", [absmax, b.constant("clip_over_qmax", _float(act.clip_ratio / qmax))], "raw_scale")
    else:
        zero_f = b.constant("zero", _float(0.0))
        clip = b.constant("clip", _float(act.clip_ratio))
        xmin = b.node("ReduceMin", [x, last_axis], "rowmin", keepdims=1)
        xmax = b.node("ReduceMax", [x, last_axis], "rowmax", keepdims=1)
        xmin = b.node("Mul", [b.node("Min", [xmin, zero_f], "min0"), clip], "xmin")
        xmax = b.node("Mul", [b.node("Max", [xmax, zero_f], "max0"), clip], "xmax")
        scale = b.node("Div", [b.node("Sub", [xmax, xmin], "range"), b.constant("levels", _float(qmax - qmin))],
                       "raw_scale")
    # An all-zero token has range 0: scale 1 quantizes it to zeros instead of dividing by 0.
    positive = b.node("Greater", [scale, b.constant("zero_scale", _float(0.0))], "positive")
    scale = b.node("Where", [positive, scale, b.constant("unit_scale", _float(1.0))], "scale")
    qmin_c, qmax_c = b.constant("qmin", _float(qmin)), b.constant("qmax", _float(qmax))
    codes = b.node("Round", [b.node("Div", [x, scale], "scaled")], "rounded")
    zero = None
    if not act.symmetric:
        neg_min = b.node("Neg", [xmin], "neg_min")
        zero = b.node("Clip", [b.node("Round", [b.node("Div", [neg_min, scale], "zero_scaled")], "zero_rounded"),
                               qmin_c, qmax_c], "zero_point")
        codes = b.node("Add", [codes, zero], "shifted")
    return b.node("Clip", [codes, qmin_c, qmax_c], "act_codes"), scale, zero


def _container_type(bits: int, signed: bool) -> int:
    if bits <= 4:
        return TensorProto.INT4 if signed else TensorProto.UINT4
    return TensorProto.INT8 if signed else TensorProto.UINT8


def integer_tensor(name: str, values: np.ndarray, bits: int, signed: bool) -> onnx.TensorProto:
    """An INT4/UINT4 (two per byte, low nibble first) or INT8/UINT8 initializer holding `values` exactly."""
    data_type = _container_type(bits, signed)
    flat = values.astype(np.int8 if signed else np.uint8).reshape(-1)
    if data_type in (TensorProto.INT8, TensorProto.UINT8):
        return numpy_helper.from_array(flat.reshape(values.shape), name)
    nibbles = flat.view(np.uint8) & 0x0F
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    packed = (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8)
    return helper.make_tensor(name, data_type, list(values.shape), packed.tobytes(), raw=True)


def _weight_dequantize(b: NodeBuilder, weight: QuantizedWeight) -> str:
    """DequantizeLinear of the codes laid out [in, out] (MatMul's B): per-axis for one group per row,
    blocked along `in` otherwise."""
    codes_t = weight.codes.numpy().T
    signed = weight.symmetric
    inputs = [b.tensor(integer_tensor(b.name("weight_codes"), codes_t, weight.bits, signed))]
    per_channel = weight.n_groups == 1
    scales = weight.scales.numpy()
    inputs.append(b.constant("scales", scales[:, 0] if per_channel else scales.T.copy()))
    if weight.zero_points is not None:
        zeros = weight.zero_points.numpy()
        zeros = zeros[:, 0] if per_channel else zeros.T.copy()
        inputs.append(b.tensor(integer_tensor(b.name("zero_points"), zeros, weight.bits, signed=False)))
    attributes = {"axis": 1} if per_channel else {"axis": 0, "block_size": weight.effective_group_size}
    return b.node("DequantizeLinear", inputs, "weight", **attributes)


class QDQLinear:
    """Weights as INT4/INT8 DequantizeLinear; activations fake-quantized per token in float ops.

    Computes exactly what the quantize stage's PyTorch model computes:
    F.linear(fake_quantize_per_token(x, act), W_deq), up to float32 summation order in the MatMul.
    """

    kind = "qdq"

    def __init__(self, weight: QuantizedWeight, act: ActQuant) -> None:
        if act.active and act.block_size is not None:
            raise RotaqError("QDQ export quantizes activations per token, not per block")
        self.weight, self.act = weight, act
        self._dequantized = weight.dequantize()

    def reference(self, x: Tensor) -> Tensor:
        if self.act.active:
            x = fake_quantize_per_token(x, self.act.bits, self.act.symmetric, self.act.clip_ratio)
        return F.linear(x, self._dequantized)

    def emit(self, x: str, y: str, prefix: str) -> Emission:
        b = NodeBuilder(prefix)
        if self.act.active:
            codes, scale, zero = _emit_activation_codes(b, x, self.act)
            if zero is not None:
                codes = b.node("Sub", [codes, zero], "centered")
            x = b.node("Mul", [codes, scale], "act_dequantized")
        if nbits_block_size(self.weight):
            # MatMulNBits at accuracy level 0 (float32 A) is the kernel ORT would fuse DequantizeLinear +
            # MatMul into; written out, the graph no longer depends on the session's fusion setting.
            kernel = MatMulNBitsLinear(self.weight, 0).emit(x, y, b.name("kernel"))
            b.emission.nodes += kernel.nodes
            b.emission.initializers += kernel.initializers
            b.emission.domains.update(kernel.domains)
            return b.emission
        b.node("MatMul", [x, _weight_dequantize(b, self.weight)], "matmul", output=y)
        return b.emission

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, **_weight_fields(self.weight), "activations": _act_text(self.act),
                "computes": ("MatMulNBits(fake_quantize_per_token(x), packed codes), accuracy_level 0"
                             if nbits_block_size(self.weight) else
                             "MatMul(fake_quantize_per_token(x), DequantizeLinear(codes))")}

    def numerics(self) -> tuple:
        return (self.act,)

    def with_weight(self, weight: QuantizedWeight) -> QDQLinear:
        return QDQLinear(weight, self.act)


class MatMulIntegerLinear:
    """Per-token symmetric integer activations times per-channel integer weights in MatMulInteger.

    Computes float32(Σ_k qx·(qw − zw)) · s_x · s_w with the integer sum exact in int32: the quantize
    stage's fake-quant product, rounded once instead of per term.
    """

    kind = "matmul_integer"

    def __init__(self, weight: QuantizedWeight, act: ActQuant) -> None:
        if (weight.n_groups != 1 or weight.bits > 8 or act.block_size is not None
                or not (act.active and act.symmetric and act.bits <= 8)):
            raise RotaqError("MatMulInteger needs per-channel weights of at most 8 bits and symmetric "
                             "per-token activations of at most 8 bits")
        self.weight, self.act = weight, act

    def reference(self, x: Tensor) -> Tensor:
        codes, scale, _ = quantize_per_token(x, self.act.bits, True, self.act.clip_ratio)
        weight_codes = self.weight.codes.double()
        if self.weight.zero_points is not None:
            weight_codes = weight_codes - self.weight.zero_points.double()
        # float64 holds every int32 sum exactly, so this rounds to float32 once, as the Cast does.
        accumulated = (codes.double() @ weight_codes.T).float()
        return accumulated * scale * self.weight.scales[:, 0]

    def emit(self, x: str, y: str, prefix: str) -> Emission:
        b = NodeBuilder(prefix)
        codes, scale, _ = _emit_activation_codes(b, x, self.act)
        codes = b.node("Cast", [codes], "codes_int8", to=TensorProto.INT8)
        weight_codes = self.weight.codes.numpy().T
        inputs = [codes, b.tensor(integer_tensor(b.name("weight_codes"), weight_codes, 8, self.weight.symmetric))]
        if self.weight.zero_points is not None:
            inputs += ["", b.tensor(integer_tensor(b.name("zero_points"), self.weight.zero_points.numpy()[:, 0], 8,
                                                   signed=False))]
        accumulated = b.node("Cast", [b.node("MatMulInteger", inputs, "accumulated")], "accumulated_float",
                             to=TensorProto.FLOAT)
        scaled = b.node("Mul", [accumulated, scale], "act_scaled")
        b.node("Mul", [scaled, b.constant("weight_scales", self.weight.scales.numpy()[:, 0])], "output", output=y)
        return b.emission

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, **_weight_fields(self.weight), "activations": _act_text(self.act),
                "computes": "MatMulInteger(per-token codes, weight codes) * act_scale * weight_scale"}

    def numerics(self) -> tuple:
        return (self.act,)

    def with_weight(self, weight: QuantizedWeight) -> MatMulIntegerLinear:
        return MatMulIntegerLinear(weight, self.act)


class MatMulNBitsLinear:
    """ONNX Runtime's com.microsoft MatMulNBits with the stage's codes packed as it expects.

    Signed symmetric codes c become unsigned c + 2^(bits-1) with MatMulNBits' default zero point
    2^(bits-1); asymmetric codes and zero points go in as they are. A group is split into blocks of
    `block_size` (a power of two, 16-128) that repeat its scale. accuracy_level 0 computes
    x · W_deqᵀ in float32; accuracy_level 4 lets MLAS quantize x to int8 symmetric per block of
    `block_size` along K (scale = absmax / 127), i.e. fake_quantize_per_block(x, 8, block_size).
    """

    kind = "matmul_nbits"

    def __init__(self, weight: QuantizedWeight, accuracy_level: int, block_size: int | None = None) -> None:
        block_size = block_size or nbits_block_size(weight)
        # Every block must sit inside one weight group; a per-channel row takes any block (K is padded).
        if (block_size not in _NBITS_BLOCK_SIZES or weight.bits not in (4, 8) or accuracy_level not in (0, 4)
                or (weight.n_groups > 1 and weight.effective_group_size % block_size)):
            raise RotaqError(f"MatMulNBits cannot hold {weight.bits}-bit weights with groups of "
                             f"{weight.effective_group_size} in blocks of {block_size} at accuracy_level "
                             f"{accuracy_level}")
        self.weight, self.accuracy_level, self.block_size = weight, accuracy_level, block_size
        self._dequantized = weight.dequantize()

    @property
    def check_tolerance(self) -> float:
        """8-bit weights at level 4: MLAS sums qa·(qw + 128) in int32, then subtracts 128·Σqa·scales in
        float32; when the activations have a large mean that subtraction cancels and costs up to
        ~1e-4 of the output range (measured on a rotated model's lm_head input), beyond 1e-5."""
        return 1e-3 if self.weight.bits == 8 and self.accuracy_level == 4 else 1e-5

    def reference(self, x: Tensor) -> Tensor:
        if self.accuracy_level == 4:
            x = fake_quantize_per_block(x, 8, self.block_size)
        return F.linear(x, self._dequantized)

    def emit(self, x: str, y: str, prefix: str) -> Emission:
        b = NodeBuilder(prefix)
        weight, bits, block = self.weight, self.weight.bits, self.block_size
        out_features, in_features = weight.shape
        n_blocks = -(-in_features // block)  # K padded up to whole blocks, as MatMulNBits stores it
        group_of_block = np.arange(n_blocks) * block // weight.effective_group_size
        codes = weight.codes.numpy().astype(np.int16)
        unsigned = (codes + 2 ** (bits - 1) if weight.symmetric else codes).astype(np.uint8)
        # Padding columns hold the zero point, so they dequantize to 0 whatever the scale.
        padding = np.full((out_features, n_blocks * block - in_features), 2 ** (bits - 1), np.uint8)
        if weight.zero_points is not None:
            padding = np.repeat(weight.zero_points.numpy()[:, -1:], padding.shape[1], axis=1)
        unsigned = np.concatenate([unsigned, padding], axis=1)
        scales = weight.scales.numpy()[:, group_of_block]
        inputs = [x, b.constant("packed_weight", _pack_rows(unsigned, bits).reshape(out_features, n_blocks, -1)),
                  b.constant("scales", scales.reshape(-1))]
        if weight.zero_points is not None:
            zeros = weight.zero_points.numpy()[:, group_of_block]
            inputs.append(b.constant("zero_points", _pack_rows(zeros, bits).reshape(-1)))
        b.node("MatMulNBits", inputs, "matmul", output=y, domain=MS_DOMAIN, K=in_features, N=out_features,
               bits=bits, block_size=block, accuracy_level=self.accuracy_level)
        return b.emission

    def describe(self) -> dict[str, Any]:
        activations = (f"int8 symmetric per block of {self.block_size} along K (ONNX Runtime MLAS)"
                       if self.accuracy_level == 4 else "float32")
        return {"kind": self.kind, **_weight_fields(self.weight), "block_size": self.block_size,
                "accuracy_level": self.accuracy_level, "activations": activations,
                "computes": "MatMulNBits(x, packed codes)"}

    def numerics(self) -> tuple:
        return (self.accuracy_level, self.block_size)

    def with_weight(self, weight: QuantizedWeight) -> MatMulNBitsLinear:
        return MatMulNBitsLinear(weight, self.accuracy_level, self.block_size)


def single_layer_model(emitter: LinearEmitter, in_features: int, out_features: int, opset: int) -> onnx.ModelProto:
    """A graph holding just this layer, x [batch, sequence, in] → y [batch, sequence, out]: what the
    export's per-layer check and the emitter tests run in ONNX Runtime."""
    emission = emitter.emit("x", "y", "layer")
    graph = helper.make_graph(
        emission.nodes, "layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", in_features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", out_features])],
        initializer=emission.initializers)
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, v) for d, v in emission.domains.items())]
    # IR version 10 is what ONNX Runtime 1.20+ reads; onnx's newest default may be ahead of it.
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def nbits_block_size(weight: QuantizedWeight) -> int | None:
    """The largest MatMulNBits block size that tiles the weight's groups (any, for per-channel rows,
    whose K MatMulNBits pads), or None if none does."""
    if weight.bits not in (4, 8):
        return None
    if weight.n_groups == 1:
        return next(size for size in _NBITS_BLOCK_SIZES if weight.shape[1] % size == 0 or size == _NBITS_BLOCK_SIZES[-1])
    return next((size for size in _NBITS_BLOCK_SIZES if weight.effective_group_size % size == 0), None)


def _pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned values [rows, cols] → bytes per row: 8-bit as is, 4-bit two per byte, low nibble first."""
    values = values.astype(np.uint8)
    if bits == 8:
        return values
    if values.shape[1] % 2:
        values = np.concatenate([values, np.zeros((values.shape[0], 1), np.uint8)], axis=1)
    return (values[:, 0::2] & 0x0F) | ((values[:, 1::2] & 0x0F) << 4)


def stacked_weights(weights: list[QuantizedWeight]) -> QuantizedWeight | None:
    """The codes of several layers that read the same input, stacked along the output rows (q/k/v into
    one qkv), or None when their formats differ: each output row keeps its own codes and scales, so
    the stacked layer computes the layers' outputs side by side, exactly."""
    first = weights[0]
    formats = {(w.bits, w.symmetric, w.group_size, w.n_groups, w.shape[1], w.zero_points is None) for w in weights}
    if len(formats) != 1:
        return None
    zero_points = None if first.zero_points is None else torch.cat([w.zero_points for w in weights])
    return QuantizedWeight(codes=torch.cat([w.codes for w in weights]), scales=torch.cat([w.scales for w in weights]),
                           zero_points=zero_points, group_size=first.group_size, bits=first.bits,
                           symmetric=first.symmetric)


def stacked_emitter(emitters: list[LinearEmitter]) -> LinearEmitter | None:
    """One kernel for several same-input layers with the same kernel and activation numerics (the fused
    graph's packed q/k/v), or None when they differ: then each keeps its own node."""
    first = emitters[0]
    if len({type(e) for e in emitters}) != 1 or len({e.numerics() for e in emitters}) != 1:
        return None
    weight = stacked_weights([e.weight for e in emitters])
    return None if weight is None else first.with_weight(weight)


def choose_emitter(weight: QuantizedWeight, act: ActQuant) -> LinearEmitter:
    """The fastest kernel that computes exactly the stage's fake-quant function for this layer:
    float activations → MatMulNBits acc 0; int8 per block of K → MatMulNBits acc 4 with that block;
    int8 per token with per-channel 8-bit weights → MatMulInteger; any other per-token case → QDQ."""
    if not act.active:
        return MatMulNBitsLinear(weight, 0) if nbits_block_size(weight) else QDQLinear(weight, act)
    if act.block_size is not None:
        if act.bits != 8 or not act.symmetric or act.clip_ratio != 1.0:
            raise RotaqError(f"per-block activations export only as ONNX Runtime's int8 symmetric blocks; "
                             f"got {_act_text(act)}")
        return MatMulNBitsLinear(weight, 4, act.block_size)
    if weight.bits == 8 and weight.n_groups == 1 and act.bits == 8 and act.symmetric:
        return MatMulIntegerLinear(weight, act)
    return QDQLinear(weight, act)


def _weight_fields(weight: QuantizedWeight) -> dict[str, Any]:
    return {"weight_bits": weight.bits, "weight_group_size": weight.group_size,
            "weight_symmetric": weight.symmetric}


def _act_text(act: ActQuant) -> str:
    if not act.active:
        return "float32"
    kind = "symmetric" if act.symmetric else "asymmetric"
    unit = "token" if act.block_size is None else f"block of {act.block_size} along K"
    return f"int{act.bits} {kind} per {unit}, clip ratio {act.clip_ratio}"

