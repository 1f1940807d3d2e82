"""Hadamard constructions are checked exactly (H H^T = n I, entries ±1), not trusted by belief."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from rotaq.pipeline.errors import NoHadamardError
from rotaq.rotations.hadamard import (
    LLM_WIDTHS,
    _irreducible_polynomial,
    _is_irreducible,
    _paley_i,
    _paley_ii,
    apply_hadamard,
    hadamard_factors,
    hadamard_matrix,
    has_hadamard,
    random_hadamard_matrix,
    random_orthogonal_matrix,
)

ALL_WIDTHS = sorted({width for widths in LLM_WIDTHS.values() for width in widths})
# Above this a dense n x n check is slow; checking each factor is an exact equivalent proof.
DENSE_CHECK_MAX = 4096


def assert_hadamard(h: torch.Tensor) -> None:
    """Entries are ±1 and H H^T = n I exactly.

    The product runs in float32, twice as fast as float64 and still exact: every partial sum is an
    integer of magnitude at most n < 2**24.
    """
    n = h.shape[0]
    assert h.shape == (n, n)
    assert torch.all(h.abs() == 1)
    h = h.float()
    assert torch.equal(h @ h.T, n * torch.eye(n))


def assert_orthonormal(q: torch.Tensor) -> None:
    n = q.shape[0]
    assert q.dtype == torch.float64
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-10)


def test_every_llm_model_lists_hidden_intermediate_head_and_kv_widths() -> None:
    assert LLM_WIDTHS["Llama-2-7B"] == (4096, 11008, 128, 4096)
    assert LLM_WIDTHS["Qwen2.5-0.5B"][:2] == (896, 4864)
    assert LLM_WIDTHS["Qwen2.5-72B"][:2] == (8192, 29568)
    assert LLM_WIDTHS["SmolLM2-135M"][:2] == (576, 1536)
    assert all(len(widths) == 4 for widths in LLM_WIDTHS.values())


@pytest.mark.parametrize("n", ALL_WIDTHS)
def test_llm_width_has_exact_hadamard(n: int) -> None:
    assert has_hadamard(n)
    factors = hadamard_factors(n)
    assert math.prod(f.shape[0] for f in factors) == n
    for factor in factors:
        assert factor.dtype == torch.float64
        assert_hadamard(factor)
    if n <= DENSE_CHECK_MAX:
        assert_hadamard(hadamard_matrix(n))


@pytest.mark.parametrize(
    ("n", "orders"),
    [
        (1, [1]),
        (2, [2]),
        (128, [128]),
        (1536, [12, 128]),
        (3072, [12, 16, 16]),
        (4096, [64, 64]),
        (4864, [76, 64]),
        (11008, [344, 32]),
        (14336, [28, 32, 16]),
        (18944, [148, 128]),
        (29568, [924, 32]),
        (1904, [28, 68]),  # 119 * 2**j has no single construction up to 1904 = 28 * 68
    ],
)
def test_factorisation_takes_smallest_core_then_small_sylvester(n: int, orders: list[int]) -> None:
    assert [f.shape[0] for f in hadamard_factors(n)] == orders


def test_split_core_is_hadamard() -> None:
    assert_hadamard(hadamard_matrix(1904))


@pytest.mark.parametrize("q", [3, 7, 11, 19, 27, 243, 343])
def test_paley_i_on_primes_and_prime_powers(q: int) -> None:
    assert_hadamard(torch.from_numpy(_paley_i(q).astype(np.float64)))


@pytest.mark.parametrize("q", [5, 9, 13, 17, 25, 49, 81, 125])
def test_paley_ii_on_primes_and_prime_powers(q: int) -> None:
    h = torch.from_numpy(_paley_ii(q).astype(np.float64))
    assert h.shape[0] == 2 * (q + 1)
    assert_hadamard(h)


def test_irreducibility_rejects_products_without_roots() -> None:
    # x^4 + x^2 + 1 = (x^2 + x + 1)^2 over GF(2): no root, yet reducible.
    assert not _is_irreducible(np.array([1, 0, 1, 0, 1]), 2)
    assert _is_irreducible(np.array([1, 1, 0, 0, 1]), 2)  # x^4 + x + 1
    assert _irreducible_polynomial(2, 2).tolist() == [1, 1, 1]
    for p, k in [(3, 3), (7, 3), (3, 5), (5, 4)]:
        assert _is_irreducible(_irreducible_polynomial(p, k), p)


@pytest.mark.parametrize("n", [8, 12, 20, 36, 48, 144, 576, 1536, 3072])
def test_apply_hadamard_matches_dense_product(n: int) -> None:
    x = torch.randn(2, 3, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    expected = x @ hadamard_matrix(n) / math.sqrt(n)
    torch.testing.assert_close(apply_hadamard(x, hadamard_factors(n)), expected, rtol=0, atol=1e-10)


def test_apply_hadamard_with_three_factors_of_different_orders() -> None:
    factors = [hadamard_matrix(20), hadamard_matrix(12), hadamard_matrix(8)]
    n = 20 * 12 * 8
    dense = functools.reduce(torch.kron, factors)
    x = torch.randn(2, 3, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = x @ dense / math.sqrt(n)
    torch.testing.assert_close(apply_hadamard(x, factors), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_apply_hadamard_keeps_dtype_and_norm(dtype: torch.dtype) -> None:
    x = torch.randn(4, 1536, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = apply_hadamard(x, hadamard_factors(1536))
    assert y.dtype == dtype
    expected = x.double() @ hadamard_matrix(1536) / math.sqrt(1536)
    atol = 1e-5 if dtype == torch.float32 else 0.05
    torch.testing.assert_close(y.double(), expected, rtol=0, atol=atol)


def test_apply_hadamard_rejects_factors_of_the_wrong_width() -> None:
    with pytest.raises(ValueError, match="do not multiply"):
        apply_hadamard(torch.zeros(3, 100), hadamard_factors(96))


def test_apply_hadamard_exports_to_onnx() -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")

    class Rotate(torch.nn.Module):
        def __init__(self, factors: list[torch.Tensor]) -> None:
            super().__init__()
            self.factors = factors

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return apply_hadamard(x, self.factors)

    n = 1536
    module = Rotate(hadamard_factors(n)).eval()
    x = torch.randn(2, 7, n)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    program = torch.onnx.export(
        module, (x,), dynamo=True, dynamic_shapes=({0: batch, 1: seq},), verbose=False
    )
    session = onnxruntime.InferenceSession(program.model_proto.SerializeToString())
    ops = {node.op_type for node in program.model.graph}
    assert "MatMul" in ops
    x_other = torch.randn(3, 5, n)
    (y,) = session.run(None, {session.get_inputs()[0].name: x_other.numpy()})
    expected = apply_hadamard(x_other, hadamard_factors(n))
    torch.testing.assert_close(torch.from_numpy(y), expected, rtol=0, atol=1e-5)


def test_random_hadamard_is_orthonormal_and_seeded() -> None:
    q = random_hadamard_matrix(48, seed=3)
    assert_orthonormal(q)
    assert torch.equal(q, random_hadamard_matrix(48, seed=3))
    assert not torch.equal(q, random_hadamard_matrix(48, seed=4))
    assert torch.all((q * math.sqrt(48)).abs() == 1)


def test_random_orthogonal_is_orthonormal_and_seeded() -> None:
    q = random_orthogonal_matrix(50, seed=3)
    assert_orthonormal(q)
    assert torch.equal(q, random_orthogonal_matrix(50, seed=3))
    assert not torch.allclose(q, random_orthogonal_matrix(50, seed=4))


def test_hadamard_factors_are_copies() -> None:
    hadamard_factors(12)[0].zero_()
    assert_hadamard(hadamard_factors(12)[0])


@pytest.mark.parametrize("n", [0, 3, 6, 10, 92, 116, 156, 1100])
def test_width_without_construction_points_to_random_rotation(n: int) -> None:
    assert not has_hadamard(n)
    with pytest.raises(NoHadamardError, match="--rotation random") as error:
        hadamard_factors(n)
    assert f"order {n} " in str(error.value)
    assert "\n" not in str(error.value)
