"""Hadamard matrices for the widths of decoder LLMs, kept as small Kronecker factors.

Rotating activations and weights by a Hadamard matrix spreads outlier channels evenly before
quantization. LLM widths are rarely powers of two (Qwen2.5-0.5B's MLP is 4864 = 76 * 64), so a
width n is written as a product of orders that each have a classical construction (Sylvester,
Paley I, Paley II); the Kronecker product of those factors is a Hadamard matrix of order n.
Applying the rotation then costs one small matmul per factor instead of one n x n product.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import scipy.linalg
import torch

from rotaq.pipeline.errors import NoHadamardError

# Widths read from each model's config.json: (hidden, intermediate, head_dim, kv_heads * head_dim).
# num_heads * head_dim equals hidden for every model below, so the query width is not repeated.
LLM_WIDTHS: dict[str, tuple[int, ...]] = {
    "Llama-2-7B": (4096, 11008, 128, 4096),
    "Llama-2-13B": (5120, 13824, 128, 5120),
    "Llama-2-70B": (8192, 28672, 128, 1024),
    "Llama-3-8B": (4096, 14336, 128, 1024),
    "Llama-3.1-8B": (4096, 14336, 128, 1024),
    "Llama-3-70B": (8192, 28672, 128, 1024),
    "Llama-3.1-70B": (8192, 28672, 128, 1024),
    "Llama-3.2-1B": (2048, 8192, 64, 512),
    "Llama-3.2-3B": (3072, 8192, 128, 1024),
    "Mistral-7B": (4096, 14336, 128, 1024),
    "Qwen2.5-0.5B": (896, 4864, 64, 128),
    "Qwen2.5-1.5B": (1536, 8960, 128, 256),
    "Qwen2.5-3B": (2048, 11008, 128, 256),
    "Qwen2.5-7B": (3584, 18944, 128, 512),
    "Qwen2.5-14B": (5120, 13824, 128, 1024),
    "Qwen2.5-32B": (5120, 27648, 128, 1024),
    "Qwen2.5-72B": (8192, 29568, 128, 1024),
    "SmolLM2-135M": (576, 1536, 64, 192),
    "SmolLM2-360M": (960, 2560, 64, 320),
    "SmolLM2-1.7B": (2048, 8192, 64, 2048),
}

# Sylvester factors are capped at 2**7 = 128: H_4096 alone would be a 128 MiB float64 matrix and
# a 4096-wide matmul per token, while H_64 (x) H_64 is the same matrix at a fraction of the cost.
_MAX_SYLVESTER_LOG2 = 7


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p**k, p prime, or None: Paley constructions need a field of order q."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)
    k = 0
    while q % p == 0:
        q //= p
        k += 1
    return (p, k) if q == 1 else None


def _direct_construction(order: int) -> str | None:
    """Which single construction builds a Hadamard matrix of this order, if any."""
    if order & (order - 1) == 0:
        return "sylvester"
    if (order - 1) % 4 == 3 and _prime_power(order - 1):
        return "paley_i"
    if order % 2 == 0 and (order // 2 - 1) % 4 == 1 and _prime_power(order // 2 - 1):
        return "paley_ii"
    return None


def _core_orders(m: int) -> tuple[int, ...] | None:
    """Orders whose Kronecker product has order m: m itself, else the most balanced split a * b."""
    if m == 1:
        return ()
    if _direct_construction(m):
        return (m,)
    for a in range(math.isqrt(m), 1, -1):
        if m % a == 0 and _direct_construction(a) and _direct_construction(m // a):
            return (a, m // a)
    return None


def _sylvester_orders(power: int) -> tuple[int, ...]:
    """Split a power of two into near-equal powers of two of at most 2**_MAX_SYLVESTER_LOG2."""
    k = power.bit_length() - 1
    if k == 0:
        return ()
    chunks = -(-k // _MAX_SYLVESTER_LOG2)
    return tuple(2 ** (k // chunks + (i < k % chunks)) for i in range(chunks))


@functools.lru_cache(maxsize=None)
def _factor_orders(n: int) -> tuple[int, ...] | None:
    """Factor orders for width n = m * 2**k with the smallest constructible m, or None."""
    if n < 1:
        return None
    power_of_two = n & -n
    m = n // power_of_two
    while m <= n:
        core = _core_orders(m)
        if core is not None:
            return (core + _sylvester_orders(n // m)) or (1,)
        m *= 2
    return None


def _poly_rem(a: np.ndarray, b: np.ndarray, p: int) -> np.ndarray:
    """Remainder of a modulo the monic b over GF(p); coefficients lowest degree first."""
    a = a % p
    degree = len(b) - 1
    for d in range(len(a) - 1, degree - 1, -1):
        a[d - degree : d + 1] = (a[d - degree : d + 1] - a[d] * b) % p
    return a[:degree]


def _is_irreducible(f: np.ndarray, p: int) -> bool:
    """True if no monic polynomial of degree 1..deg(f)/2 divides f over GF(p) (a complete test)."""
    for degree in range(1, (len(f) - 1) // 2 + 1):
        for low in itertools.product(range(p), repeat=degree):
            if not _poly_rem(f, np.array(low + (1,)), p).any():
                return False
    return True


@functools.lru_cache(maxsize=None)
def _irreducible_polynomial(p: int, k: int) -> np.ndarray:
    """The first monic irreducible polynomial of degree k over GF(p), found by brute force."""
    for low in itertools.product(range(p), repeat=k):
        f = np.array(low + (1,))
        if _is_irreducible(f, p):
            return f
    raise AssertionError(f"GF({p}) has irreducible polynomials of every degree, none found for {k}")


def _field_elements(p: int, k: int) -> np.ndarray:
    """All q = p**k elements of GF(p**k) as coefficient rows; row i holds the base-p digits of i."""
    return (np.arange(p**k)[:, None] // p ** np.arange(k)) % p


def _element_index(coefficients: np.ndarray, p: int) -> np.ndarray:
    """Inverse of `_field_elements`: the row index of each coefficient row."""
    return coefficients @ p ** np.arange(coefficients.shape[-1])


def _squares(elements: np.ndarray, p: int, k: int) -> np.ndarray:
    """Each element squared in GF(p**k) = GF(p)[x] / (f), f irreducible of degree k."""
    f = _irreducible_polynomial(p, k)
    product = np.zeros((len(elements), 2 * k - 1), dtype=np.int64)
    for i, j in itertools.product(range(k), repeat=2):
        product[:, i + j] += elements[:, i] * elements[:, j]
    for d in range(2 * k - 2, k - 1, -1):
        product[:, d - k : d + 1] = (product[:, d - k : d + 1] - product[:, d : d + 1] * f) % p
    return product[:, :k] % p


def _jacobsthal(q: int) -> np.ndarray:
    """Q[i, j] = chi(a_i - a_j) over GF(q); chi is 0 at 0, +1 on squares, -1 on non-squares."""
    p, k = _prime_power(q)
    elements = _field_elements(p, k)
    chi = -np.ones(q, dtype=np.int64)
    chi[_element_index(_squares(elements, p, k), p)] = 1
    chi[0] = 0
    # Subtraction is digit-wise mod p; accumulating the index digit by digit keeps memory at q x q.
    differences = sum(((elements[:, None, i] - elements[None, :, i]) % p) * p**i for i in range(k))
    return chi[differences]


def _paley_i(q: int) -> np.ndarray:
    """Hadamard matrix of order q + 1 for a prime power q = 3 mod 4: H = I + [[0, 1^T], [-1, Q]]."""
    skew = np.zeros((q + 1, q + 1), dtype=np.int64)
    skew[0, 1:] = 1
    skew[1:, 0] = -1
    skew[1:, 1:] = _jacobsthal(q)
    return np.eye(q + 1, dtype=np.int64) + skew


def _paley_ii(q: int) -> np.ndarray:
    """Hadamard matrix of order 2(q + 1) for a prime power q = 1 mod 4, via a conference matrix."""
    conference = np.zeros((q + 1, q + 1), dtype=np.int64)
    conference[0, 1:] = 1
    conference[1:, 0] = 1
    conference[1:, 1:] = _jacobsthal(q)
    identity = np.eye(q + 1, dtype=np.int64)
    return np.kron(conference, [[1, -1], [-1, -1]]) + np.kron(identity, [[1, 1], [1, -1]])


@functools.lru_cache(maxsize=None)
def _factor(order: int) -> torch.Tensor:
    """The ±1 float64 Hadamard matrix of one directly constructible order (cached, read-only)."""
    construction = _direct_construction(order)
    if construction == "sylvester":
        matrix = scipy.linalg.hadamard(order)
    elif construction == "paley_i":
        matrix = _paley_i(order - 1)
    else:
        matrix = _paley_ii(order // 2 - 1)
    return torch.from_numpy(np.asarray(matrix, dtype=np.float64))


def has_hadamard(n: int) -> bool:
    """Whether `hadamard_factors(n)` succeeds, without building any matrix."""
    return _factor_orders(n) is not None


def hadamard_factors(n: int) -> list[torch.Tensor]:
    """Small ±1 float64 matrices whose Kronecker product F1 (x) F2 (x) ... is Hadamard of order n.

    The first factor covers the smallest constructible m with n = m * 2**k (split in two when m has
    no single construction); the Sylvester part follows in factors of at most 128.
    """
    orders = _factor_orders(n)
    if orders is None:
        raise NoHadamardError(
            f"no Hadamard matrix of order {n} can be built here (orders must be 1, 2 or a multiple "
            "of 4 with a Paley/Sylvester factorisation); use --rotation random for a seeded random "
            "orthogonal matrix"
        )
    return [_factor(order).clone() for order in orders]


def hadamard_matrix(n: int) -> torch.Tensor:
    """The dense ±1 float64 Hadamard matrix of order n, for tests and offline weight folding."""
    return functools.reduce(torch.kron, hadamard_factors(n))


def random_hadamard_matrix(n: int, seed: int) -> torch.Tensor:
    """Orthonormal H D / sqrt(n), D a seeded random ±1 diagonal: a distinct Hadamard per seed."""
    generator = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=generator).to(torch.float64) * 2 - 1
    return hadamard_matrix(n) * signs / math.sqrt(n)


def random_orthogonal_matrix(n: int, seed: int) -> torch.Tensor:
    """Seeded Haar-random orthogonal float64 matrix, for widths that have no Hadamard matrix."""
    generator = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    # QR alone is biased by its sign convention; making diag(R) positive gives the Haar measure.
    return q * torch.sign(torch.diagonal(r))


def apply_hadamard(x: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """x @ (F1 (x) F2 (x) ...) / sqrt(n) over the last dim of x, one small matmul per factor.

    The last axis is viewed as (n1, n2, ...) in row-major order, on which the Kronecker product acts
    axis by axis. Each step contracts the leading factor axis and moves the result to the back, so
    after all factors the axes are in order again. Each factor is scaled by 1 / sqrt(n_i) first, so
    every intermediate keeps the norm of x and float16 cannot overflow half-way.
    """
    lead, n = x.shape[:-1], x.shape[-1]
    if math.prod(factor.shape[0] for factor in factors) != n:
        orders = [factor.shape[0] for factor in factors]
        raise ValueError(f"factors of orders {orders} do not multiply to width {n}")
    for factor in factors:
        size = factor.shape[0]
        scaled = (factor / math.sqrt(size)).to(device=x.device, dtype=x.dtype)
        x = (x.reshape(*lead, size, n // size).transpose(-1, -2) @ scaled).reshape(*lead, n)
    return x
