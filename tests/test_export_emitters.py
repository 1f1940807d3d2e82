"""Each quantized-linear emitter on a single layer: ONNX Runtime computes the emitter's PyTorch reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

from rotaq.export.emitters import (
    ActQuant,
    LinearEmitter,
    MatMulIntegerLinear,
    MatMulNBitsLinear,
    QDQLinear,
    choose_emitter,
    integer_tensor,
    single_layer_model,
)
from rotaq.export.layout import OPSET
from rotaq.export.runtime import create_session
from rotaq.pipeline.errors import RotaqError
from rotaq.quantizers.activations import fake_quantize_per_token
from rotaq.quantizers.rtn import quantize_weight_rtn

IN, OUT = 128, 40
A16, A8, A4 = ActQuant(16), ActQuant(8), ActQuant(4)
A4_ASYM_CLIP = ActQuant(4, symmetric=False, clip_ratio=0.9)


def _weight(bits: int, group: int | None, symmetric: bool):
    generator = torch.Generator().manual_seed(bits * 100 + (group or 0))
    return quantize_weight_rtn(torch.randn(OUT, IN, generator=generator), bits, group, symmetric)


def _activations() -> torch.Tensor:
    x = torch.randn(2, 5, IN, generator=torch.Generator().manual_seed(0))
    x[0, 1] = 0.0  # an all-zero token takes the scale-1 branch
    x[1, 2, 7] = 25.0  # an outlier token
    return x


def run_emitter(emitter: LinearEmitter, x: torch.Tensor, folder: Path) -> np.ndarray:
    """One-layer graph x → emitter → y, checked, saved and run with the export's session settings."""
    model = single_layer_model(emitter, IN, OUT, OPSET)
    onnx.checker.check_model(model, full_check=True)
    path = folder / "layer.onnx"
    onnx.save_model(model, str(path))
    return create_session(path).run(None, {"x": x.numpy()})[0]


def relative_error(actual: np.ndarray, expected: torch.Tensor) -> float:
    expected = expected.numpy()
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize(("bits", "group", "symmetric", "act"), [
    (4, None, True, A4), (4, 32, True, A4), (4, 32, False, A4_ASYM_CLIP),
    (4, None, True, A8), (8, None, False, A8), (8, 64, True, A16)],
    ids=["w4a4", "w4a4-g32", "w4a4-g32-asym-clip", "w4a8", "w8a8-asym", "w8a16-g64"])
def test_qdq_matches_per_token_fake_quant(bits: int, group: int | None, symmetric: bool, act: ActQuant,
                                          tmp_path: Path) -> None:
    weight, x = _weight(bits, group, symmetric), _activations()
    emitter = QDQLinear(weight, act)
    expected = torch.nn.functional.linear(
        fake_quantize_per_token(x, act.bits, act.symmetric, act.clip_ratio), weight.dequantize())
    torch.testing.assert_close(emitter.reference(x), expected, rtol=0, atol=0)
    assert relative_error(run_emitter(emitter, x, tmp_path), expected) < 1e-6


@pytest.mark.parametrize(("bits", "symmetric", "act"), [(8, True, A8), (8, False, ActQuant(8, clip_ratio=0.8)),
                                                   (4, True, A4)], ids=["w8a8", "w8a8-asym-clip", "w4a4"])
def test_matmul_integer_is_exact(bits: int, symmetric: bool, act: ActQuant, tmp_path: Path) -> None:
    weight, x = _weight(bits, None, symmetric), _activations()
    emitter = MatMulIntegerLinear(weight, act)
    produced = run_emitter(emitter, x, tmp_path)
    np.testing.assert_array_equal(produced, emitter.reference(x).numpy())
    fake_quant = torch.nn.functional.linear(fake_quantize_per_token(x, act.bits, True, act.clip_ratio),
                                            weight.dequantize())
    assert relative_error(produced, fake_quant) < 1e-6


@pytest.mark.parametrize(("bits", "group", "symmetric", "accuracy_level"), [
    (4, None, True, 0), (4, 32, False, 0), (8, None, False, 0), (8, 64, True, 0), (4, 32, True, 4), (8, None, True, 4)],
    ids=["w4", "w4-g32-asym", "w8-asym", "w8-g64", "w4-g32-acc4", "w8-acc4"])
def test_matmul_nbits_matches_its_reference(bits: int, group: int | None, symmetric: bool, accuracy_level: int,
                                            tmp_path: Path) -> None:
    """Level 0 is the float product with dequantized weights; level 4 quantizes x to int8 per block."""
    weight, x = _weight(bits, group, symmetric), _activations()
    emitter = MatMulNBitsLinear(weight, accuracy_level)
    assert emitter.block_size == min(group or 128, 128)
    assert relative_error(run_emitter(emitter, x, tmp_path), emitter.reference(x)) < 1e-6


def test_matmul_nbits_takes_the_stages_activation_block(tmp_path: Path) -> None:
    weight, x = _weight(4, 64, True), _activations()
    emitter = choose_emitter(weight, ActQuant(8, block_size=32))
    assert isinstance(emitter, MatMulNBitsLinear) and emitter.block_size == 32 and emitter.accuracy_level == 4
    assert relative_error(run_emitter(emitter, x, tmp_path), emitter.reference(x)) < 1e-6


@pytest.mark.parametrize(("bits", "group", "act", "kind"), [
    (4, None, A16, "matmul_nbits"),      # W4A16
    (4, 128, A16, "matmul_nbits"),       # W4A16-g128
    (8, None, A16, "matmul_nbits"),      # lm_head: 8-bit weights, float activations
    (8, None, A8, "matmul_integer"),     # W8A8
    (8, 32, A8, "qdq"),                  # W8A8 with groups: no integer kernel takes group scales
    (4, None, A8, "qdq"),                # W4A8, per-token activations
    (4, None, ActQuant(8, block_size=128), "matmul_nbits"),  # W4A8, ORT's per-block activations
    (4, None, A4, "qdq"),                # W4A4
])
def test_choose_emitter_per_scheme(bits: int, group: int | None, act: ActQuant, kind: str) -> None:
    assert choose_emitter(_weight(bits, group, True), act).kind == kind


def test_emitters_refuse_what_their_kernel_cannot_compute() -> None:
    with pytest.raises(RotaqError, match="per block"):
        QDQLinear(_weight(4, None, True), ActQuant(4, block_size=32))
    with pytest.raises(RotaqError, match="per-channel"):
        MatMulIntegerLinear(_weight(8, 32, True), A8)
    with pytest.raises(RotaqError, match="MatMulNBits cannot"):
        MatMulNBitsLinear(_weight(4, 32, True), 4, block_size=64)
    with pytest.raises(RotaqError, match="int8 symmetric blocks"):
        choose_emitter(_weight(4, None, True), ActQuant(4, block_size=32))


@pytest.mark.parametrize(("bits", "signed"), [(4, True), (4, False), (8, True), (8, False)])
def test_integer_tensors_hold_codes_exactly(bits: int, signed: bool) -> None:
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1)) if signed else (0, 2**bits)
    values = np.random.default_rng(0).integers(low, high, size=(7, 5))  # odd count: a padded last nibble
    tensor = integer_tensor("codes", values, bits, signed)
    assert tensor.data_type == {(4, True): TensorProto.INT4, (4, False): TensorProto.UINT4,
                                (8, True): TensorProto.INT8, (8, False): TensorProto.UINT8}[(bits, signed)]
    np.testing.assert_array_equal(numpy_helper.to_array(tensor).astype(np.int64), values)


@pytest.mark.parametrize(("make", "symmetric"), [
    (lambda w: MatMulNBitsLinear(w, 0), True), (lambda w: MatMulNBitsLinear(w, 0), False),
    (lambda w: MatMulNBitsLinear(w, 4), True), (lambda w: QDQLinear(w, A4), True)],
    ids=["nbits-acc0", "nbits-acc0-asym", "nbits-acc4", "qdq-a4"])
def test_ragged_last_group_exports(make, symmetric: bool, tmp_path: Path) -> None:
    """Width 96 in groups of 64: ONNX Runtime pads K to whole blocks, and computes the same layer."""
    width = 96
    weight = quantize_weight_rtn(torch.randn(OUT, width, generator=torch.Generator().manual_seed(3)), 4, 64,
                                 symmetric, allow_ragged=True)
    x = torch.randn(2, 5, width, generator=torch.Generator().manual_seed(4))
    emitter = make(weight)
    model = single_layer_model(emitter, width, OUT, OPSET)
    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, str(tmp_path / "layer.onnx"))
    produced = create_session(tmp_path / "layer.onnx").run(None, {"x": x.numpy()})[0]
    assert relative_error(produced, emitter.reference(x)) < 1e-6
