"""Tensor-level quantizer arithmetic: schemes, RTN weights, per-token activations, GPTQ."""

from __future__ import annotations

import pytest
import torch

from rotaq.pipeline.errors import NonFiniteError, RotaqError
from rotaq.quantizers.activations import fake_quantize_per_block, fake_quantize_per_token, quantize_per_token
from rotaq.quantizers.gptq import HessianAccumulator, gptq_quantize
from rotaq.quantizers.rtn import fake_quantize_weight, qrange, quantize_weight_rtn
from rotaq.quantizers.schemes import QuantScheme, parse_scheme, validate_group


def _weight(out: int = 48, inn: int = 128, seed: int = 0) -> torch.Tensor:
    """Heavy-tailed weights (Student-t), where outliers make clipping worthwhile."""
    gen = torch.Generator().manual_seed(seed)
    normal = torch.randn(out, inn, generator=gen)
    chi2 = torch.randn(out, inn, 3, generator=gen).square().sum(-1)
    return normal / (chi2 / 3).sqrt()


def _expand(groups: torch.Tensor, width: int) -> torch.Tensor:
    """Per-group values ``[out, n_groups]`` broadcast back to ``[out, width]``."""
    return groups.repeat_interleave(width // groups.shape[1], dim=1)


def _rtn_reference_fp64(w: torch.Tensor, bits: int, group: int, symmetric: bool) -> torch.Tensor:
    """Textbook min/max RTN in float64, no clipping: the dequantized weight."""
    wg = w.double().reshape(w.shape[0], -1, group)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = (wg.abs().amax(-1, keepdim=True) / qmax).clamp_min(1e-300)
        return (torch.round(wg / scale).clamp(-qmax - 1, qmax) * scale).reshape(w.shape)
    qmax = 2**bits - 1
    lo, hi = wg.amin(-1, keepdim=True).clamp(max=0), wg.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / qmax).clamp_min(1e-300)
    zero = torch.round(-lo / scale)
    return ((torch.round(wg / scale) + zero).clamp(0, qmax) - zero).mul(scale).reshape(w.shape)


# ----------------------------------------------------------------------------------------- schemes


@pytest.mark.parametrize(
    ("name", "wbits", "abits", "group"),
    [
        ("w8a8", 8, 8, None),
        ("w4a8", 4, 8, None),
        ("w4a4", 4, 4, None),
        ("w4a16", 4, 16, None),
        ("w4a16-g128", 4, 16, 128),
        ("w4a4-g64", 4, 4, 64),
        ("W8A8-G32", 8, 8, 32),
    ],
)
def test_parse_scheme_accepts_and_round_trips(name: str, wbits: int, abits: int, group: int | None) -> None:
    scheme = parse_scheme(name)
    assert (scheme.weight_bits, scheme.act_bits, scheme.weight_group_size) == (wbits, abits, group)
    assert scheme.name == name.lower()
    assert parse_scheme(scheme.name) == scheme
    assert scheme.lm_head_bits == 8 and scheme.weight_symmetric and scheme.weight_clip_search
    assert scheme.quantizes_activations == (abits < 16)


def test_w4a8_activations_follow_onnx_runtimes_int8_kernel() -> None:
    """W4A8 quantizes activations per block of 128 along K, as MatMulNBits accuracy_level 4 does."""
    assert parse_scheme("w4a8").act_block_size == 128 and parse_scheme("w8a8").act_block_size == 64
    assert all(parse_scheme(name).act_block_size is None for name in ("w4a4", "w4a16-g128"))
    from rotaq.quantizers.quantize_model import activation_block

    assert activation_block(parse_scheme("w8a8-g32")) == 32 and activation_block(parse_scheme("w8a8-g48")) == 16
    assert activation_block(parse_scheme("w4a8-g40")) is None  # no kernel block fits: per token
    with pytest.raises(RotaqError, match="act_block_size=32.*--act-block-size 0"):
        QuantScheme(weight_bits=4, act_bits=4, act_block_size=32)
    with pytest.raises(RotaqError, match="act_block_size=32"):
        QuantScheme(weight_bits=4, act_bits=8, act_block_size=32, act_clip_ratio=0.9)


@pytest.mark.parametrize("name", ["w3a8", "w4a2", "w16a16", "w8a16", "fp8", "w4a16-g0", "w4a16-gx", "w4a16g128", ""])
def test_parse_scheme_rejects_with_valid_names(name: str) -> None:
    with pytest.raises(RotaqError, match="w4a16"):
        parse_scheme(name)


def test_scheme_rejects_bad_fields() -> None:
    with pytest.raises(RotaqError, match="weight_bits"):
        QuantScheme(weight_bits=16, act_bits=16)
    with pytest.raises(RotaqError, match="act_bits"):
        QuantScheme(weight_bits=4, act_bits=2)
    with pytest.raises(RotaqError, match="act_clip_ratio"):
        QuantScheme(weight_bits=4, act_bits=4, act_clip_ratio=1.5)


def test_validate_group_names_layer() -> None:
    validate_group(None, 100, "layers.0.mlp.down_proj")
    validate_group(32, 128, "layers.0.mlp.down_proj")
    with pytest.raises(RotaqError, match=r"layers\.0\.mlp\.down_proj.*48.*100"):
        validate_group(48, 100, "layers.0.mlp.down_proj")


# --------------------------------------------------------------------------------------------- RTN


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [None, 32])
@pytest.mark.parametrize("clip_search", [True, False])
def test_rtn_codes_in_range_and_layout(bits: int, symmetric: bool, group: int | None, clip_search: bool) -> None:
    w = _weight()
    w[3] = 0.0  # all-zero row
    qw = quantize_weight_rtn(w, bits, group, symmetric, clip_search)
    n_groups = 1 if group is None else w.shape[1] // group
    assert qw.codes.shape == w.shape
    assert qw.scales.shape == (w.shape[0], n_groups) and qw.scales.dtype == torch.float32
    assert (qw.scales > 0).all()
    if symmetric:
        assert qw.codes.dtype == torch.int8 and qw.zero_points is None
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        assert qw.codes.dtype == torch.uint8 and qw.zero_points.dtype == torch.uint8
        assert qw.zero_points.shape == qw.scales.shape
        lo, hi = 0, 2**bits - 1
        assert (qw.zero_points.int() >= lo).all() and (qw.zero_points.int() <= hi).all()
    codes = qw.codes.int()
    assert codes.min() >= lo and codes.max() <= hi
    deq = qw.dequantize()
    assert deq.dtype == torch.float32 and torch.isfinite(deq).all()
    assert (deq[3] == 0).all()
    assert torch.equal(fake_quantize_weight(w, bits, group, symmetric, clip_search), deq)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [None, 16])
def test_rtn_error_bounded_by_half_step(bits: int, symmetric: bool, group: int | None) -> None:
    w = _weight()
    qw = quantize_weight_rtn(w, bits, group, symmetric, clip_search=False)
    scale = _expand(qw.scales, w.shape[1])
    assert ((w - qw.dequantize()).abs() <= scale * (0.5 + 1e-4)).all()
    reference = _rtn_reference_fp64(w, bits, group or w.shape[1], symmetric)
    assert torch.allclose(qw.dequantize().double(), reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [None, 32])
def test_clip_search_never_increases_error(bits: int, symmetric: bool, group: int | None) -> None:
    w = _weight(seed=1)
    plain = (w - quantize_weight_rtn(w, bits, group, symmetric, clip_search=False).dequantize()).square()
    clipped = (w - quantize_weight_rtn(w, bits, group, symmetric, clip_search=True).dequantize()).square()
    g = group or w.shape[1]
    per_group_plain = plain.view(w.shape[0], -1, g).sum(-1)
    per_group_clipped = clipped.view(w.shape[0], -1, g).sum(-1)
    assert (per_group_clipped <= per_group_plain).all()
    if bits == 4:  # heavy tails: clipping must actually help at 4 bits
        assert clipped.mean() < plain.mean()


def test_groups_are_independent_per_channel_quantizations() -> None:
    w = _weight()
    grouped = quantize_weight_rtn(w, 4, 32, symmetric=False)
    for j in range(w.shape[1] // 32):
        part = quantize_weight_rtn(w[:, j * 32 : (j + 1) * 32], 4, None, symmetric=False)
        assert torch.equal(grouped.codes[:, j * 32 : (j + 1) * 32], part.codes)
        assert torch.equal(grouped.scales[:, j], part.scales[:, 0])
        assert torch.equal(grouped.zero_points[:, j], part.zero_points[:, 0])
    assert grouped.effective_group_size == 32 and grouped.n_groups == 4


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [None, 32, 48])
def test_rtn_in_row_chunks_is_one_pass(monkeypatch: pytest.MonkeyPatch, symmetric: bool, group: int | None) -> None:
    """Codes and dequantized weights computed a few rows at a time (how a vocabulary-sized head is rounded)
    are bit-for-bit those of one pass over the matrix; dequantizing into the layer's own weight too."""
    from rotaq.quantizers import rtn

    w = _weight(out=37, inn=80)
    whole = quantize_weight_rtn(w, 4, group, symmetric, clip_search=True, allow_ragged=True)
    monkeypatch.setattr(rtn, "_ROUNDING_CHUNK_ELEMENTS", 3 * 80)  # 3 rows a chunk, a ragged last chunk
    chunked = quantize_weight_rtn(w, 4, group, symmetric, clip_search=True, allow_ragged=True)
    assert torch.equal(chunked.codes, whole.codes) and chunked.codes.dtype == whole.codes.dtype
    assert torch.equal(chunked.scales, whole.scales)
    into = torch.empty_like(w)
    assert chunked.dequantize(out=into) is into
    monkeypatch.setattr(rtn, "_ROUNDING_CHUNK_ELEMENTS", 1 << 24)
    assert torch.equal(into, whole.dequantize())
    # The one-pass reference: the rounding formula applied to the whole padded matrix at once.
    n_groups = whole.n_groups
    width = n_groups * whole.effective_group_size
    grid = rtn.pad_columns(w, width).view(37, n_groups, -1)
    zero = None if symmetric else whole.zero_points.float().unsqueeze(-1)
    codes = rtn.quantize_to_codes(grid, whole.scales.unsqueeze(-1), zero, 4, symmetric)
    assert torch.equal(codes.reshape(37, -1)[:, :80].to(whole.codes.dtype), whole.codes)
    assert torch.equal(rtn.dequantize_codes(codes, whole.scales.unsqueeze(-1), zero).reshape(37, -1)[:, :80], into)
    with pytest.raises(RotaqError, match="cannot dequantize"):
        whole.dequantize(out=torch.empty(37, 81))


def test_rtn_rejects_bad_group_and_non_finite() -> None:
    with pytest.raises(RotaqError, match=r"model\.layers\.2\.self_attn\.q_proj.*48"):
        quantize_weight_rtn(_weight(inn=128), 4, 48, layer_name="model.layers.2.self_attn.q_proj")
    w = _weight()
    w[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="mlp.up_proj"):
        quantize_weight_rtn(w, 4, layer_name="mlp.up_proj")


# ----------------------------------------------------------------------------------------- activations


def _tokens(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 7, 64, generator=gen) * torch.rand(3, 7, 1, generator=gen) * 4
    x[..., 5] *= 20.0  # an outlier channel, as in real activations
    x[1, 2] = 0.0  # all-zero token
    return x


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_per_token_error_bounded_and_matches_codes(bits: int, symmetric: bool) -> None:
    x = _tokens()
    y = fake_quantize_per_token(x, bits, symmetric)
    codes, scales, zeros = quantize_per_token(x, bits, symmetric)
    assert scales.shape == (3, 7, 1) and (scales > 0).all()
    assert ((x - y).abs() <= scales * (0.5 + 1e-4)).all()
    assert (y[1, 2] == 0).all() and torch.isfinite(y).all()
    if symmetric:
        assert codes.dtype == torch.int8 and zeros is None
        assert codes.int().abs().max() <= 2 ** (bits - 1)
        deq = codes.float() * scales
    else:
        assert codes.dtype == torch.uint8 and zeros.shape == (3, 7, 1)
        deq = (codes.float() - zeros.float()) * scales
    assert torch.equal(deq, y)


def test_per_token_matches_float64_reference() -> None:
    x = _tokens()
    xd = x.double()
    scale = xd.abs().amax(-1, keepdim=True) / 7
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    reference = torch.round(xd / scale).clamp(-8, 7) * scale
    assert torch.allclose(fake_quantize_per_token(x, 4).double(), reference, rtol=0, atol=1e-5)


def test_per_token_clip_ratio_clips_largest_values() -> None:
    x = _tokens()
    y = fake_quantize_per_token(x, 8, clip_ratio=0.5)
    step = 0.5 * x.abs().amax(-1, keepdim=True) / 127
    assert (y.abs() <= 128 * step * (1 + 1e-5)).all()  # the signed grid reaches -128 steps
    nonzero = x.abs().amax(-1) > 0
    assert (y.abs().amax(-1)[nonzero] < x.abs().amax(-1)[nonzero]).all()


@pytest.mark.parametrize("symmetric", [True, False])
def test_ste_gradient_is_identity(symmetric: bool) -> None:
    x = _tokens().requires_grad_(True)
    upstream = torch.randn_like(x)
    fake_quantize_per_token(x, 4, symmetric).backward(upstream)
    assert torch.equal(x.grad, upstream)
    x.grad = None
    fake_quantize_per_block(x, 8, 16, symmetric).backward(upstream)
    assert torch.equal(x.grad, upstream)


def test_sixteen_bits_is_identity() -> None:
    x = _tokens()
    assert fake_quantize_per_token(x, 16) is x
    assert fake_quantize_per_block(x, 16, 32) is x


def test_low_precision_input_keeps_dtype() -> None:
    x = _tokens().to(torch.bfloat16)
    y = fake_quantize_per_token(x, 8)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


def _mlas_int8_reference(x):
    """ONNX Runtime's MLAS activation quantizer (QuantizeARow_CompInt8) in numpy float32, per row:
    scale = amax / 127, codes = round-half-even(x * (127 / amax))."""
    import numpy as np

    amax = np.abs(x).max(axis=-1, keepdims=True).astype(np.float32)
    inverse = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    return (np.rint(x * inverse) * (amax / np.float32(127))).astype(np.float32)


def test_per_block_activations_round_like_mlas_at_ties() -> None:
    """Inputs that are dequantized codes put x * 127 / amax exactly on .5: the kernel's arithmetic
    (multiply by 127 / amax, round half to even) decides, and dividing by the scale would not agree."""
    codes = torch.tensor([126.0, 63.0, -63.0, 21.0, 1.0, -105.0, 35.0, 7.0] * 4)
    x = (codes * 0.0173).reshape(1, 32)
    expected = torch.from_numpy(_mlas_int8_reference(x.numpy()))
    assert torch.equal(fake_quantize_per_block(x, 8, 32), expected)


def test_per_block_equals_per_token_on_blocks() -> None:
    x = _tokens()
    y = fake_quantize_per_block(x, 8, 16, symmetric=False)
    blocks = x.reshape(3, 7, 4, 16)
    assert torch.equal(y, fake_quantize_per_token(blocks, 8, symmetric=False).reshape(3, 7, 64))
    ragged = fake_quantize_per_block(x, 8, 24)  # blocks of 24, 24 and a last one of 16, as MLAS pads K
    parts = [torch.from_numpy(_mlas_int8_reference(part.numpy())) for part in x.split(24, dim=-1)]
    assert torch.equal(ragged, torch.cat(parts, dim=-1))
    with pytest.raises(RotaqError, match="block_size=0"):
        fake_quantize_per_block(x, 8, 0)


def test_activation_fake_quant_exports_to_onnx(tmp_path) -> None:
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")

    class FakeQuant(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return fake_quantize_per_token(x, 4, True, 0.9), fake_quantize_per_block(x, 8, 32, False)

    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}
    program = torch.onnx.export(FakeQuant().eval(), (_tokens(),), dynamo=True, dynamic_shapes=(dims,))
    path = tmp_path / "fake_quant.onnx"
    program.save(str(path))
    session = ort.InferenceSession(str(path))
    x = _tokens(seed=3)[:2, :5]
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    for onnx_out, torch_out in zip(got, FakeQuant()(x)):
        assert torch.allclose(torch.from_numpy(onnx_out), torch_out, rtol=0, atol=1e-6)


# -------------------------------------------------------------------------------------------- GPTQ


def _correlated_inputs(n: int = 512, width: int = 128, seed: int = 0) -> torch.Tensor:
    """X = Z @ L: mixing makes features correlate, which is where GPTQ beats RTN."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(width, width, generator=gen) / width**0.5
    return torch.randn(n, width, generator=gen) @ mixing


def _output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return (x @ w.T - x @ w_hat.T).square().mean().item()


def test_hessian_accumulator_matches_batch_formula() -> None:
    x = _correlated_inputs(n=300, width=32)
    acc = HessianAccumulator(32, "blk.0.attn")
    acc.add_batch(x[:100])
    acc.add_batch(x[100:].reshape(2, 100, 32))
    assert acc.count == 300
    expected = 2.0 / 300 * x.double().T @ x.double()
    assert torch.allclose(acc.hessian.double(), expected, rtol=1e-5, atol=1e-5)
    bad = x[:4].clone()
    bad[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="blk.0.attn"):
        acc.add_batch(bad)
    with pytest.raises(RotaqError, match="blk.1.mlp"):
        HessianAccumulator(32, "blk.1.mlp").hessian


@pytest.mark.parametrize("group", [None, 32])
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_beats_rtn_on_correlated_inputs(group: int | None, act_order: bool) -> None:
    x = _correlated_inputs()
    w = _weight(out=64, inn=128, seed=2)
    acc = HessianAccumulator(128)
    acc.add_batch(x)
    gptq = gptq_quantize(w, acc.hessian, 4, group, act_order=act_order, block_size=64)
    rtn = quantize_weight_rtn(w, 4, group)
    assert gptq.codes.dtype == torch.int8 and gptq.codes.shape == w.shape
    assert gptq.codes.int().min() >= -8 and gptq.codes.int().max() <= 7
    assert gptq.scales.shape == rtn.scales.shape and (gptq.scales > 0).all()
    assert _output_error(x, w, gptq.dequantize()) < 0.8 * _output_error(x, w, rtn.dequantize())


def test_gptq_act_order_keeps_original_group_layout() -> None:
    """Static groups: the scales are RTN's clip-searched scales of each group in original order."""
    x = _correlated_inputs()
    w = _weight(out=32, inn=128, seed=3)
    hessian = 2.0 / x.shape[0] * x.T @ x
    gptq = gptq_quantize(w, hessian, 4, 32, symmetric=False, act_order=True)
    rtn = quantize_weight_rtn(w, 4, 32, symmetric=False)
    assert torch.equal(gptq.scales, rtn.scales) and torch.equal(gptq.zero_points, rtn.zero_points)
    assert _output_error(x, w, gptq.dequantize()) < _output_error(x, w, rtn.dequantize())


def test_gptq_dead_columns_become_zero() -> None:
    x = _correlated_inputs(width=64)
    x[:, [5, 40]] = 0.0
    w = _weight(out=16, inn=64)
    hessian = 2.0 / x.shape[0] * x.T @ x
    for act_order in (True, False):
        qw = gptq_quantize(w, hessian, 4, 16, act_order=act_order)
        assert (qw.dequantize()[:, [5, 40]] == 0).all()
        assert torch.isfinite(qw.dequantize()).all()


def test_gptq_rejects_non_finite_hessian_and_bad_shapes() -> None:
    w = _weight(out=8, inn=32)
    hessian = torch.eye(32)
    hessian[3, 3] = float("nan")
    with pytest.raises(NonFiniteError, match=r"model\.layers\.7\.mlp\.down_proj"):
        gptq_quantize(w, hessian, 4, layer_name="model.layers.7.mlp.down_proj")
    with pytest.raises(RotaqError, match="o_proj.*Hessian shape"):
        gptq_quantize(w, torch.eye(16), 4, layer_name="o_proj")
    with pytest.raises(RotaqError, match="o_proj.*group size 24"):
        gptq_quantize(w, torch.eye(32), 4, group_size=24, layer_name="o_proj")


def test_ragged_last_group_is_its_own_grid() -> None:
    """A group size that does not divide the width: whole groups as usual, then one shorter group."""
    w = _weight(out=12, inn=80)
    with pytest.raises(RotaqError, match="group size 32 does not divide input width 80.*--ragged-groups"):
        quantize_weight_rtn(w, 4, 32, layer_name="down_proj")
    ragged = quantize_weight_rtn(w, 4, 32, allow_ragged=True)
    assert ragged.scales.shape == (12, 3) and ragged.codes.shape == (12, 80) and ragged.ragged
    whole = quantize_weight_rtn(w[:, :64], 4, 32)
    tail = quantize_weight_rtn(w[:, 64:], 4, None)
    torch.testing.assert_close(ragged.codes, torch.cat([whole.codes, tail.codes], dim=1), rtol=0, atol=0)
    torch.testing.assert_close(ragged.scales, torch.cat([whole.scales, tail.scales], dim=1), rtol=0, atol=0)
    torch.testing.assert_close(ragged.dequantize(), torch.cat([whole.dequantize(), tail.dequantize()], dim=1))


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_with_a_ragged_last_group(symmetric: bool) -> None:
    x = _correlated_inputs(width=80)
    w = _weight(out=16, inn=80)
    hessian = 2.0 / x.shape[0] * x.T @ x
    with pytest.raises(RotaqError, match="--ragged-groups"):
        gptq_quantize(w, hessian, 4, 32, symmetric=symmetric)
    rtn = quantize_weight_rtn(w, 4, 32, symmetric=symmetric, allow_ragged=True)
    for act_order in (True, False):
        qw = gptq_quantize(w, hessian, 4, 32, symmetric=symmetric, act_order=act_order, allow_ragged=True)
        assert qw.scales.shape == (16, 3) and qw.codes.shape == (16, 80)
        lo, hi = qrange(4, symmetric)
        assert int(qw.codes.min()) >= lo and int(qw.codes.max()) <= hi
        gptq_error = _output_error(x, w, qw.dequantize())
        assert gptq_error < _output_error(x, w, rtn.dequantize())
