"""The fused decoder layout: the operators onnxruntime-genai's model builder uses, built straight from a
`DecoderGraph` (its weights, kernels, online rotations and side paths), with rotaq's own parts in between.

Why built and not traced: at 135M parameters a decode step costs per node, not per FLOP, and the
traced graph spells attention, RoPE, the norms and the cache concatenation in ~2400 primitive ops
(and takes minutes to trace). Here each layer is

    [Skip]SimplifiedLayerNormalization              residual add fused into the norm
    q/k/v projections                                one kernel when their codes share a format
    [q/k RMSNorm per head]                           Qwen3
    GroupQueryAttention                              RoPE inside (cos/sin caches), cache updated in place
                                                     when onnxruntime-genai shares the past/present buffer
    online Hadamard → o_proj                         A·X·B on the [heads, head_dim]-shaped input
    SkipSimplifiedLayerNormalization
    gate/up (one kernel) → SiLU · up → online Hadamard → down_proj
    [+ LoR2C side paths ending here]

with the quantized kernels emitted by the same `LinearEmitter`s the traced graph uses, so the
per-layer numerics checks hold unchanged. This is the only module that knows the fused layout;
`DecoderGraph` stays the PyTorch reference the export checks hold the graph against.

Limits of the layout: slots (past + new tokens, padding included) must stay below the RoPE caches'
length, the model's context length.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from rotaq.export.emitters import MS_DOMAIN, Emission, LinearEmitter, NodeBuilder, stacked_emitter
from rotaq.export.graph_module import DecoderGraph, DecoderLayer, ExportLinear, RMSNorm
from rotaq.export.layout import ATTENTION_MASK, INPUT_IDS, LOGITS, OPSET, io_spec
from rotaq.rotations.online import OnlineRotation

FUSED_LAYOUT = "fused"
TRACED_LAYOUT = "traced"
LAYOUTS = (FUSED_LAYOUT, TRACED_LAYOUT)
_DTYPES = {"int64": TensorProto.INT64, "float32": TensorProto.FLOAT}


def fused_layout_problem(graph: DecoderGraph) -> str | None:
    """Why the fused layout cannot express `graph` (then the traced one is exported), or None."""
    shape = graph.shape
    if shape.head_dim % 16:
        return f"head_dim {shape.head_dim} is not a multiple of 16, which GroupQueryAttention's rotary kernel requires"
    if shape.num_heads % shape.num_kv_heads:
        return f"{shape.num_heads} query heads do not group over {shape.num_kv_heads} KV heads"
    for module in graph.modules():
        if not isinstance(module, ExportLinear):
            continue
        spec = module.output_spec
        if spec is not None and spec.output_bits and spec.output_bits < 16:
            return (f"{module.path} fake-quantizes its output for the KV cache (--kv-bits), which "
                    "GroupQueryAttention's float cache does not express")
        # Every linear wrapper's matmul_input is its input_rotation, or the identity without one.
        if module.input_rotation is not None and not isinstance(module.input_rotation, OnlineRotation):
            return f"{module.path} transforms its input in a way the fused layout does not know"
    return None


def build_fused_model(graph: DecoderGraph, context_length: int) -> onnx.ModelProto:
    """The whole decoder in the fused layout, with the I/O contract of `rotaq.export.layout`."""
    return FusedBuilder(graph, context_length).build()


def two_factor_hadamard(factors: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A, B with A ⊗ B = F1 ⊗ F2 ⊗ ...: x·(A ⊗ B) is then Aᵀ·X·B for x viewed as X [a, b], two small
    MatMuls costing n·(a + b) multiply-adds a token. Factors go to A in order while that lowers a + b;
    a Sylvester factor (order 2^k, Sylvester-ordered) may be split exactly as H_2^i ⊗ H_2^(k-i) to
    bring a closer to √n."""
    import scipy.linalg

    n = math.prod(f.shape[0] for f in factors)
    left: list[np.ndarray] = []
    rest = list(factors)
    while rest:
        size, order = math.prod(f.shape[0] for f in left), rest[0].shape[0]
        if not left or size * order + n // (size * order) <= size + n // size:
            left.append(rest.pop(0))
            continue
        splits = [2 ** i for i in range(1, order.bit_length() - 1)] if order >= 4 and not order & (order - 1) else []
        best = min(splits, key=lambda s: size * s + n // (size * s), default=None)
        if best is not None and size * best + n // (size * best) < size + n // size:
            first = scipy.linalg.hadamard(best).astype(np.float64)
            second = scipy.linalg.hadamard(order // best).astype(np.float64)
            if np.array_equal(np.kron(first, second), rest[0]):
                left.append(first)
                rest[0] = second
        break
    return _kron(left), (_kron(rest) if rest else np.ones((1, 1)))


def _kron(factors: list[np.ndarray]) -> np.ndarray:
    dense = np.ones((1, 1))
    for factor in factors:
        dense = np.kron(dense, factor)
    return dense


class FusedBuilder:
    """Appends the graph's nodes and initializers to one Emission, block by block, named by module."""

    def __init__(self, graph: DecoderGraph, context_length: int) -> None:
        self.graph = graph
        self.context_length = context_length
        self.emission = Emission(domains={MS_DOMAIN: 1})
        self.b = NodeBuilder("model", self.emission)
        self.embed_table = ""  # the float embedding initializer, which a tied head reads too
        self.padding_bias = ""
        self.shared_downs: dict[int, str] = {}

    def at(self, prefix: str) -> NodeBuilder:
        return NodeBuilder(prefix, self.emission)

    def build(self) -> onnx.ModelProto:
        """The whole graph from the graph's own layers."""
        self.begin()
        for index, layer in enumerate(self.graph.layers):
            self.add_layer(index, layer)
        self.add_head()
        return self.model_proto()

    # The steps of `build`, also called one by one by `rotaq.export.streamed`, which hands each step the
    # one decoder layer it has loaded and spills the step's initializers to disk before loading the next.

    def begin(self) -> None:
        """The attention-mask inputs, the RoPE caches and the embedding lookup."""
        self.seqlens_k, self.total_length = self._attention_lengths()
        self.cos_cache, self.sin_cache = self._rope_caches()
        self.hidden = self._embed()
        self.residual = self.hidden
        self.pending: str | None = None  # the previous layer's MLP output, not yet added to the residual stream
        self.path_inputs: dict[int, str] = {}

    def add_layer(self, index: int, layer: DecoderLayer) -> None:
        b = self.at(f"layers.{index}")
        if self.pending is None:
            normed = self._norm(b, layer.input_norm, self.hidden, "input_norm")
        else:
            normed, self.residual = self._skip_norm(b, layer.input_norm, self.pending, self.residual, "input_norm")
        self.path_inputs[index] = self.residual
        attn_output = self._attention(b, layer, index, normed, self.seqlens_k, self.total_length, self.cos_cache,
                                      self.sin_cache)
        normed, self.residual = self._skip_norm(b, layer.post_attention_norm, attn_output, self.residual,
                                                "post_attention_norm")
        self.pending = self._mlp(b, layer, normed)
        for number, path in enumerate(self.graph.side_paths):
            if path.last == index:
                self.pending = self._side_path(self.at(f"side_paths.{number}"), path, self.path_inputs[path.first],
                                               self.pending)

    def add_head(self) -> None:
        """The final norm and the head."""
        normed, _ = self._skip_norm(self.at("final"), self.graph.norm, self.pending, self.residual, "norm")
        self._lm_head(normed)

    # --- inputs -------------------------------------------------------------------------------------

    def _attention_lengths(self) -> tuple[str, str]:
        """GroupQueryAttention's seqlens_k (int32 [B]) and total length (int32 scalar), plus the padding bias
        that makes left padding work: every row counts all P + S slots (the new tokens sit in slots
        P..P+S-1 in every row, as in the traced graph), padded slots get a -max bias, and a token's RoPE
        position is its slot. RoPE scores depend only on position differences, so a left-padded row
        computes what it computes alone; only its cached keys are rotated by its padding's length more."""
        b = self.at("attention_mask")
        shape = b.node("Shape", [ATTENTION_MASK], "shape")
        width = b.node("Gather", [shape, b.constant("axis_1", np.array(1, np.int64))], "width", axis=0)
        batch = b.node("Slice", [shape, b.constant("start_0", np.array([0], np.int64)),
                                 b.constant("end_1", np.array([1], np.int64))], "batch")
        last = b.node("Sub", [width, b.constant("one_scalar", np.array(1, np.int64))], "last")
        seqlens = b.node("Cast", [b.node("Expand", [last, batch], "last_per_row")], "seqlens_k", to=TensorProto.INT32)
        sequence = b.node("Gather", [b.node("Shape", [INPUT_IDS], "ids_shape"),
                                     b.constant("axis_1_ids", np.array(1, np.int64))], "sequence", axis=0)
        real = b.node("Cast", [ATTENTION_MASK], "real", to=TensorProto.FLOAT)
        bias = b.node("Mul", [b.node("Sub", [real, b.constant("one_float", np.array(1.0, np.float32))], "minus_one"),
                              b.constant("big", np.array(np.finfo(np.float32).max, np.float32))], "bias_rows")
        bias = b.node("Unsqueeze", [bias, b.constant("axes12", np.array([1, 2], np.int64))], "bias_4d")
        # GroupQueryAttention wants the bias [B, 1, S, P + S], not broadcast along S.
        bias_shape = b.node("Concat", [batch, b.constant("one_1d", np.array([1], np.int64)),
                                       b.node("Unsqueeze", [sequence, b.constant("axes0_s", np.array([0], np.int64))], "sequence_1d"),
                                       b.node("Unsqueeze", [width, b.constant("axes0_b", np.array([0], np.int64))], "width_1d_b")],
                            "bias_shape", axis=0)
        self.padding_bias = b.node("Expand", [bias, bias_shape], "padding_bias")
        return seqlens, b.node("Cast", [width], "total_length", to=TensorProto.INT32)

    def _rope_caches(self) -> tuple[str, str]:
        """cos/sin [context, head_dim / 2], computed as `DecoderGraph.rope_tables` computes them."""
        graph = self.graph
        positions = torch.arange(self.context_length, dtype=torch.long)
        freqs = positions[:, None].float() * graph.inv_freq
        cos = (freqs.cos() * graph.attention_scaling).numpy()
        sin = (freqs.sin() * graph.attention_scaling).numpy()
        return self.b.constant("cos_cache", cos), self.b.constant("sin_cache", sin)

    def _embed(self) -> str:
        graph, b = self.graph, self.at("embed_tokens")
        if graph.embed_codes is None:
            self.embed_table = b.constant("weight", _array(graph.embed_weight))
            return b.node("Gather", [self.embed_table, INPUT_IDS], "rows")
        codes = b.node("Gather", [b.constant("code_table", _array(graph.embed_codes)), INPUT_IDS], "codes")
        scales = b.node("Gather", [b.constant("scale_table", _array(graph.embed_scales)), INPUT_IDS], "row_scales")
        return b.node("Mul", [b.node("Cast", [codes], "codes_float", to=TensorProto.FLOAT), scales], "rows")

    # --- blocks -------------------------------------------------------------------------------------

    def _norm(self, b: NodeBuilder, norm: RMSNorm, x: str, suffix: str, axis: int = -1) -> str:
        return b.node("SimplifiedLayerNormalization", [x, b.constant(f"{suffix}.weight", _array(norm.weight))], suffix,
                      axis=axis, epsilon=norm.eps, stash_type=1)

    def _skip_norm(self, b: NodeBuilder, norm: RMSNorm, x: str, skip: str, suffix: str) -> tuple[str, str]:
        """norm(x + skip) and x + skip in one node."""
        normed, total = b.name(suffix), b.name(f"{suffix}.residual")
        b.multi_output_node("SkipSimplifiedLayerNormalization", [x, skip, b.constant(f"{suffix}.weight", _array(norm.weight))],
                            suffix, [normed, "", "", total], domain=MS_DOMAIN, epsilon=norm.eps)
        return normed, total

    def _attention(self, b: NodeBuilder, layer: DecoderLayer, index: int, x: str, seqlens_k: str, total_length: str,
                   cos_cache: str, sin_cache: str) -> str:
        attn = layer.attn
        projections = self._projections(b, [attn.q_proj, attn.k_proj, attn.v_proj], x, "qkv")
        if attn.q_norm is not None:
            if len(projections) == 1:
                widths = [m.weight_t.shape[1] for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
                projections = b.multi_output_node("Split", [projections[0], b.constant("qkv_widths", np.array(widths, np.int64))],
                                                  "qkv_split", [b.name(n) for n in ("q", "k", "v")], axis=-1)
            query, key, value = projections
            projections = [self._head_norm(b, attn.q_norm, query, "q_norm", attn.head_dim),
                           self._head_norm(b, attn.k_norm, key, "k_norm", attn.head_dim), value]
        inputs = [*projections, *([""] * (3 - len(projections))),
                  f"past_key_values.{index}.key", f"past_key_values.{index}.value", seqlens_k, total_length,
                  cos_cache if attn.use_rope else "", sin_cache if attn.use_rope else "",
                  "", self.padding_bias]  # no position_ids: GroupQueryAttention uses the slots
        window = layer.sliding_window
        output = b.name("attention")
        b.multi_output_node("GroupQueryAttention", inputs, "attention",
                            [output, f"present.{index}.key", f"present.{index}.value"], domain=MS_DOMAIN,
                            num_heads=attn.num_heads, kv_num_heads=attn.num_kv_heads, scale=attn.scaling,
                            do_rotary=int(attn.use_rope), rotary_interleaved=0,
                            # Measured against DecoderGraph's mask (HF: keys at distance < window).
                            local_window_size=-1 if window is None else window)
        return self._projections(b, [attn.o_proj], output, "o_proj")[0]

    def _head_norm(self, b: NodeBuilder, norm: RMSNorm, x: str, suffix: str, head_dim: int) -> str:
        """RMSNorm over each head's slice of [B, S, heads · head_dim]."""
        heads = b.node("Reshape", [x, b.constant(f"{suffix}.heads_shape", np.array([0, 0, -1, head_dim], np.int64))], f"{suffix}.heads")
        normed = self._norm(b, norm, heads, suffix)
        return b.node("Reshape", [normed, b.constant(f"{suffix}.flat_shape", np.array([0, 0, -1], np.int64))], f"{suffix}.flat")

    def _mlp(self, b: NodeBuilder, layer: DecoderLayer, x: str) -> str:
        mlp = layer.mlp
        projections = self._projections(b, [mlp.gate_proj, mlp.up_proj], x, "gate_up")
        if len(projections) == 1:
            width = mlp.gate_proj.weight_t.shape[1]
            projections = b.multi_output_node("Split", [projections[0], b.constant("gate_up_widths", np.array([width, width], np.int64))],
                                              "gate_up_split", [b.name("gate"), b.name("up")], axis=-1)
        gate, up = projections
        activated = b.node("Mul", [gate, b.node("Sigmoid", [gate], "gate_sigmoid")], "gate_silu")
        return self._projections(b, [mlp.down_proj], b.node("Mul", [activated, up], "gated"), "down_proj")[0]

    def _side_path(self, b: NodeBuilder, path: torch.nn.Module, path_input: str, pending: str) -> str:
        # Paths sharing one A share its initializer, as in the traced graph.
        if id(path.down_t) not in self.shared_downs:
            self.shared_downs[id(path.down_t)] = b.constant("down_t", _array(path.down_t))
        down = b.node("MatMul", [path_input, self.shared_downs[id(path.down_t)]], "down")
        return b.node("Add", [pending, b.node("MatMul", [down, b.constant("up_t", _array(path.up_t))], "up")], "added")

    def _lm_head(self, x: str) -> None:
        graph, b = self.graph, self.at("lm_head")
        if graph.lm_head is not None:
            self._projections(b, [graph.lm_head], x, "lm_head", output=LOGITS)
            return
        # A tied head reads the embedding table [V, H] as Gemm's transposed B: no second copy of it.
        rows = b.node("Reshape", [x, b.constant("rows_shape", np.array([-1, graph.shape.hidden_size], np.int64))], "rows")
        logits = b.node("Gemm", [rows, self.embed_table], "gemm", transB=1)
        leading = b.node("Slice", [b.node("Shape", [INPUT_IDS], "ids_shape"), b.constant("zero", np.array([0], np.int64)),
                                   b.constant("two", np.array([2], np.int64))], "leading")
        out_shape = b.node("Concat", [leading, b.constant("vocab", np.array([graph.shape.vocab_size], np.int64))],
                           "out_shape", axis=0)
        b.node("Reshape", [logits, out_shape], "logits", output=LOGITS)

    # --- linears ------------------------------------------------------------------------------------

    def _projections(self, b: NodeBuilder, modules: list[ExportLinear], x: str, suffix: str,
                     output: str | None = None) -> list[str]:
        """The outputs of linears reading the same `x`: one stacked kernel (one output) when they share
        a kernel and have no input rotation, else one kernel each."""
        if len(modules) > 1 and all(m.input_rotation is None for m in modules):
            stacked = self._stacked(b, modules, x, suffix)
            if stacked is not None:
                return [stacked]
        return [self._linear(b, module, x, module.path.rpartition(".")[2] if len(modules) > 1 else suffix,
                             output if len(modules) == 1 else None) for module in modules]

    def _stacked(self, b: NodeBuilder, modules: list[ExportLinear], x: str, suffix: str) -> str | None:
        if all(m.emitter is None for m in modules):
            weight = np.concatenate([_array(m.weight_t) for m in modules], axis=1)
            product = b.node("MatMul", [x, b.constant(f"{suffix}.weight_t", weight)], suffix)
        elif all(m.emitter is not None for m in modules) and (emitter := stacked_emitter([m.emitter for m in modules])):
            product = self._kernel(b, emitter, x, suffix)
        else:
            return None
        if all(m.bias is None for m in modules):
            return product
        bias = np.concatenate([_array(m.bias) if m.bias is not None else np.zeros(m.weight_t.shape[1], np.float32)
                               for m in modules])
        return b.node("Add", [product, b.constant(f"{suffix}.bias", bias)], f"{suffix}.biased")

    def _linear(self, b: NodeBuilder, module: ExportLinear, x: str, suffix: str, output: str | None) -> str:
        if module.input_rotation is not None:
            x = self._online_rotation(b, module.input_rotation, x, f"{suffix}.rotation")
        if module.emitter is None:
            product_name = output if module.bias is None else None
            product = b.node("MatMul", [x, b.constant(f"{suffix}.weight_t", _array(module.weight_t))], suffix,
                             output=product_name)
        else:
            product = self._kernel(b, module.emitter, x, suffix, output if module.bias is None else None)
        if module.bias is None:
            return product
        return b.node("Add", [product, b.constant(f"{suffix}.bias", _array(module.bias))], f"{suffix}.biased", output=output)

    def _kernel(self, b: NodeBuilder, emitter: LinearEmitter, x: str, suffix: str, output: str | None = None) -> str:
        output = output or b.name(suffix)
        emission = emitter.emit(x, output, prefix=b.name(suffix))
        self.emission.nodes.extend(emission.nodes)
        self.emission.initializers.extend(emission.initializers)
        self.emission.domains.update(emission.domains)
        return output

    def _online_rotation(self, b: NodeBuilder, rotation: OnlineRotation, x: str, suffix: str) -> str:
        """x · R: a Kronecker-factored Hadamard as Aᵀ·X·B with 1/√n folded into A and B, a block-diagonal one
        as one MatMul of the [n / block, block]-shaped input by H_block/√block, or a dense MatMul."""
        factors = [f.double().numpy() for f in rotation.factor_tensors()]
        if not factors:
            return b.node("MatMul", [x, b.constant(f"{suffix}.dense", _array(rotation.dense))], suffix)
        n = rotation.width
        if rotation.block < n:
            # One block's matrix is at most a few hundred wide: one dense MatMul costs less than a second node.
            block = (_kron(factors) / math.sqrt(rotation.block)).astype(np.float32)
            return self._grid_product(b, x, suffix, rotation.block, n, [("right", block, False)])
        left, right = two_factor_hadamard(factors)
        a = left.shape[0]
        right = (right / math.sqrt(right.shape[0])).astype(np.float32)
        if a == 1:
            return b.node("MatMul", [x, b.constant(f"{suffix}.matrix", right)], suffix)
        left_t = (left.T / math.sqrt(a)).astype(np.float32)
        return self._grid_product(b, x, suffix, n // a, n, [("right", right, False), ("left", left_t, True)])

    def _grid_product(self, b: NodeBuilder, x: str, suffix: str, columns: int, n: int,
                      products: list[tuple[str, np.ndarray, bool]]) -> str:
        """x [B, S, n] viewed as [B, S, n / columns, columns], multiplied by each named matrix (on the left when
        its flag says so, stored transposed as `<name>_t`), and flattened back."""
        grid = b.node("Reshape", [x, b.constant(f"{suffix}.grid_shape", np.array([0, 0, n // columns, columns], np.int64))],
                      f"{suffix}.grid")
        for name, matrix, on_left in products:
            constant = b.constant(f"{suffix}.{name}_t" if on_left else f"{suffix}.{name}", matrix)
            grid = b.node("MatMul", [constant, grid] if on_left else [grid, constant], f"{suffix}.{name}_product")
        return b.node("Reshape", [grid, b.constant(f"{suffix}.flat_shape", np.array([0, 0, n], np.int64))], suffix)

    # --- model --------------------------------------------------------------------------------------

    def model_proto(self) -> onnx.ModelProto:
        """The model around the nodes and initializers emitted so far."""
        shape = self.graph.shape
        spec = io_spec(shape.num_layers, shape.num_kv_heads, shape.head_dim, shape.vocab_size)
        inputs = [helper.make_tensor_value_info(e["name"], _DTYPES[e["dtype"]], e["shape"]) for e in spec["inputs"]]
        outputs = [helper.make_tensor_value_info(e["name"], _DTYPES[e["dtype"]], e["shape"]) for e in spec["outputs"]]
        graph = helper.make_graph(self.emission.nodes, "rotaq_decoder", inputs, outputs,
                                  initializer=self.emission.initializers)
        opsets = [helper.make_opsetid("", OPSET), *(helper.make_opsetid(d, v) for d, v in self.emission.domains.items())]
        # IR version 10 is what ONNX Runtime 1.20+ reads; onnx's newest default may be ahead of it.
        return helper.make_model(graph, opset_imports=opsets, ir_version=10, producer_name="rotaq")


def _array(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()
